"""Shared fixtures: tiny LLaVA-1.5 / LLaVA-NeXT models built offline from config, once per session."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from reference.test_models import LlavaSpec, build_model, build_processor

QUESTIONS = ["What is shown?", "Describe the picture in detail please.", "Yes or no?",
             "Write a short caption for the image of the dog in the park."]
IMAGE_SIZES = [(336, 336), (640, 480), (200, 500), (500, 300)]

SPECS = {
    "llava": LlavaSpec(family="llava"),
    "llava-gqa": LlavaSpec(family="llava", llm_kv_heads=2),
    # NeXT with 168-px crops: 144 tokens per crop keeps AnyRes inputs small on CPU.
    "next": LlavaSpec(family="next", image_size=168),
}


def sample_images(n: int = 4) -> list[Image.Image]:
    """Deterministic non-uniform RGB images of different sizes."""
    out = []
    for i, size in enumerate(IMAGE_SIZES[:n]):
        g = torch.Generator().manual_seed(i)
        pixels = (torch.rand(size[1] // 8, size[0] // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels).resize(size, Image.NEAREST))
    return out


def prompts_for(processor, questions=QUESTIONS) -> list[str]:
    return [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                          add_generation_prompt=True) for q in questions]


class Tiny:
    """A tiny model with its processor and a ready left-padded batch of 4 prompts of different lengths."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.spec, self.dtype = name, SPECS[name], dtype
        self.processor = build_processor(self.spec)
        self.model = build_model(self.processor.tokenizer, self.spec, dtype=dtype)
        self.images = sample_images()
        self.prompts = prompts_for(self.processor)

    def inputs(self, rows: slice | list[int] = slice(None)):
        idx = range(len(self.prompts))[rows] if isinstance(rows, slice) else rows
        batch = self.processor(images=[self.images[i] for i in idx], text=[self.prompts[i] for i in idx],
                               padding=True, return_tensors="pt")
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch


_CACHE: dict[tuple[str, torch.dtype], Tiny] = {}


def get_tiny(name: str, dtype: torch.dtype = torch.float32) -> Tiny:
    key = (name, dtype)
    if key not in _CACHE:
        _CACHE[key] = Tiny(name, dtype)
    return _CACHE[key]


def small_model_and_batch(spec: LlavaSpec, rows: int = 2):
    """A fresh tiny model of `spec` and a left-padded batch of the first `rows` sample prompts for it."""
    processor = build_processor(spec)
    model = build_model(processor.tokenizer, spec)
    sample = get_tiny("llava")
    batch = processor(images=sample.images[:rows], text=sample.prompts[:rows], padding=True, return_tensors="pt")
    return model, batch


@pytest.fixture(params=["llava", "next", "llava-gqa"])
def tiny(request) -> Tiny:
    return get_tiny(request.param)
