"""Measures what one row of a batch adds to a process's peak memory, for tests/test_memory_rule.py.

Run in a fresh process (`python tests/memory_probe.py REDUCER RATIO`): it builds a small random-weight LLaVA-1.5,
captions batches of growing size with the reducer attached, and prints as JSON the model config, the prompt's text
tokens and the process's peak resident set during each batch. tracemalloc does not see torch's CPU allocations, so
the kernel's high-water mark of the resident set is what is measured (VmHWM, reset before each batch by writing 5 to
/proc/self/clear_refs), and the slope between two batch sizes is the per-row memory without the weights, the
interpreter or the thread pools, which every batch shares. Run it with MALLOC_MMAP_THRESHOLD_ set (the test does), so
that freed large blocks leave the resident set at once.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from PIL import Image

import reducers
from reference.test_models import LlavaSpec, build_model, build_processor

SPEC = LlavaSpec(family="llava", vision_hidden=64, vision_layers=4, vision_heads=4, vision_intermediate=128,
                 llm_hidden=128, llm_layers=8, llm_heads=4, llm_kv_heads=4, llm_intermediate=256)
BATCHES = (2, 10)
NEW_TOKENS = 8
INSTRUCTION = "Write a short caption for the image."


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """The resident set's high-water mark since the last reset_peak_rss."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024


def main(reducer: str, ratio: float) -> None:
    torch.set_num_threads(1)
    processor = build_processor(SPEC)
    model = build_model(processor.tokenizer, SPEC)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
    budget = {} if reducer == "none" else {"ratio": ratio}
    g = torch.Generator().manual_seed(0)
    peaks = {}
    with reducers.attach(model, reducer, **budget), torch.inference_mode():
        for rows in (1, *BATCHES):  # batch 1 first: one-off allocations (kernels, thread pools) land before batch 2
            images = [Image.fromarray((torch.rand(336, 336, 3, generator=g) * 255).to(torch.uint8).numpy())
                      for _ in range(rows)]
            batch = processor(images=images, text=[prompt] * rows, padding=True, return_tensors="pt")
            reset_peak_rss()
            model.generate(**batch, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, do_sample=False)
            peaks[rows] = peak_rss_bytes()
    text_tokens = len(processor.tokenizer(prompt)["input_ids"]) - 1  # the one <image> placeholder
    print(json.dumps({"config": model.config.to_dict(), "text_tokens": text_tokens, "new_tokens": NEW_TOKENS,
                      "peaks": peaks}))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
