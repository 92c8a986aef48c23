"""Tiny LLaVA-1.5 / LLaVA-NeXT models with random weights, built offline (no hub), for tests, benchmarks and the demo.

The shape is a `LlavaSpec` (its defaults are these models': realistic depth, small widths); the tokenizer is a
small byte-level BPE trained here on a few English sentences, so prompts in plain English tokenize.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast

from reference.llava_parts import SPECIAL_TOKENS, LlavaSpec, build_llava_processor, build_model, wrap_tokenizer

__all__ = ["LlavaSpec", "build_tokenizer", "build_processor", "build_model", "save_tiny"]

_CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A cat on a red sofa.",
    "Describe the picture in detail. There is a dog in a green park near a blue lake.",
    "Is there a person? Yes. No. How many objects are there? One two three four.",
    "Write a short caption for the image. A small white boat on the sea at sunset.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        _CORPUS, trainer=trainers.BpeTrainer(vocab_size=320, special_tokens=list(SPECIAL_TOKENS),
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return wrap_tokenizer(raw)


def build_processor(spec: LlavaSpec = LlavaSpec()) -> LlavaProcessor | LlavaNextProcessor:
    return build_llava_processor(spec, build_tokenizer())


def save_tiny(path: str, spec: LlavaSpec = LlavaSpec(), seed: int = 0) -> str:
    """Build and save a tiny model + processor with `save_pretrained` (safetensors); returns `path`."""
    processor = build_processor(spec)
    build_model(processor.tokenizer, spec, seed).save_pretrained(path)
    processor.save_pretrained(path)
    return path
