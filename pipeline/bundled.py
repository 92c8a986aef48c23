"""The one place that knows what the default "bundled" model is, where it lives, and what to ask it.

The bundled model is the reference model trained here on procedural scenes (`pipeline/reference.py`,
`jobs/train_reference.py`), shipped inside the package, so a job runs offline with no download. Its
tokenizer is word level over the scenes' words, so its default prompts are in that vocabulary.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.scenes import CAPTION_QUESTION

BUNDLED_MODEL = "bundled"
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "reference_model"
# Default instructions: the bundled model's own (the caption prompt it was trained on, a count question), and
# plain English for every other model.
BUNDLED_PROMPTS = {"prompt": CAPTION_QUESTION, "question": "how many objects are there ?"}
GENERIC_PROMPTS = {"prompt": "Write a short caption for the image.", "question": "What is shown in the image?"}


def resolve_model(model: str) -> str:
    """The path or hub id to give `from_pretrained` for the --model setting."""
    return str(BUNDLED_MODEL_DIR) if model == BUNDLED_MODEL else model


def default_prompts(model: str) -> dict[str, str]:
    """The --prompt and --question defaults for `model`."""
    return BUNDLED_PROMPTS if model == BUNDLED_MODEL else GENERIC_PROMPTS
