"""The one place that knows what the default "bundled" model is, where it lives, and what to ask it.

The bundled model is the reference model trained here on procedural scenes (`reference/`, built by
`jobs/train_reference.py`), shipped inside the package, so a job runs offline with no download. Its
tokenizer is word level over the scenes' words, so its default prompts are its own (`reference.model`).
"""
from __future__ import annotations

from reference.model import DEFAULT_PROMPTS as BUNDLED_PROMPTS
from reference.model import REFERENCE_MODEL_DIR as BUNDLED_MODEL_DIR

BUNDLED_MODEL = "bundled"
# Default instructions: the bundled model's own, and plain English for every other model.
GENERIC_PROMPTS = {"prompt": "Write a short caption for the image.", "question": "What is shown in the image?"}


def resolve_model(model: str) -> str:
    """The path or hub id to give `from_pretrained` for the --model setting."""
    return str(BUNDLED_MODEL_DIR) if model == BUNDLED_MODEL else model


def default_prompts(model: str) -> dict[str, str]:
    """The --prompt and --question defaults for `model`."""
    return BUNDLED_PROMPTS if model == BUNDLED_MODEL else GENERIC_PROMPTS
