"""The reference model: a small LLaVA-1.5-shaped model trained here on `reference.scenes`, its weights and prompts.

Built by the shared `reference.llava_parts` builder (real transformers classes; only the widths and the
vocabulary are small). The tokenizer is word level over the words the scene generator can emit. The shipped
weights live in `REFERENCE_MODEL_DIR` (built by `jobs/train_reference.py`, its recipe beside them in
`recipe.json`); the job runner ships them as its "bundled" model, with `DEFAULT_PROMPTS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from reference.llava_parts import SPECIAL_TOKENS, LlavaSpec, build_llava_processor, build_model, wrap_tokenizer
from reference.scenes import CAPTION_QUESTION, COUNT_QUESTION, vocabulary

__all__ = ["REFERENCE_MODEL_DIR", "DEFAULT_PROMPTS", "Architecture", "build_tokenizer", "build_processor",
           "build_model", "prompt", "load_reference"]

REFERENCE_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "reference_model"
# What to ask the model when the caller does not say: the caption prompt it was trained on, a count question.
DEFAULT_PROMPTS = {"prompt": CAPTION_QUESTION, "question": COUNT_QUESTION}


@dataclass(frozen=True)
class Architecture(LlavaSpec):
    """Shape of the reference model. Depth is LLaVA-like in proportion: LLM-side methods that prune at an
    early layer can still reach 1/9 of the visual tokens on average over the layers."""
    image_size: int = 168
    vision_hidden: int = 128
    vision_intermediate: int | None = None  # 4 x vision_hidden
    vision_layers: int = 5          # the feature layer is the penultimate one (-2), as in LLaVA-1.5
    llm_hidden: int = 128
    llm_intermediate: int = 256
    llm_layers: int = 12
    max_positions: int = 1024
    # Llama 3's base rather than LLaMA-2's 1e4: more rotary pairs turn slowly enough over the ~300-token
    # sequence that a question can find a patch by content wherever it is.
    rope_theta: float = 1e6


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the scene vocabulary plus the chat template's words."""
    words = list(SPECIAL_TOKENS) + ["USER", "ASSISTANT", ":"] + vocabulary()
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return wrap_tokenizer(raw)


def build_processor(arch: Architecture = Architecture()) -> LlavaProcessor:
    return build_llava_processor(arch, build_tokenizer())


def prompt(processor: LlavaProcessor, question: str) -> str:
    """The single-turn prompt of a question about one image."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)


def load_reference(path: str | Path = REFERENCE_MODEL_DIR) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The model and processor saved at `path` (the shipped model by default), offline, in eval mode."""
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True, use_kernels=False).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"  # generation needs left padding; not restored by from_pretrained
    return model, processor
