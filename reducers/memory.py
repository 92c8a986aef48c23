"""The memory rule: how many rows of a batch fit a given memory, for a model config and a reduction configuration.

    memory needed = weights + batch x (peak KV cache per row + peak activations per row)

Everything is computed from the config (no weights are loaded): the weights are counted on the meta device, the KV
cache from `reducers.schedule`'s visual entries per LLM layer (a layer-wise method such as FastV keeps the full cache
up to its layer K) priced by `reducers.accounting.kv_bytes`, and the activations as the prefill's largest transient,
summed over its parts as an upper bound (see `activation_bytes_per_row`). Fewer visual tokens kept means a smaller
cache and smaller activations, so a reduced configuration fits a larger batch at the same memory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from reducers.accounting import ModelDims, as_llava_config, kv_bytes, model_dims

SCORE_BYTES = 4       # attention scores, where a layer materialises them, are fp32
LOGIT_BYTES = 4       # generate keeps the last position's logits in fp32
MARGIN = 0.10         # share of the memory left free for the allocator's fragmentation, the runtime and the stats
MAX_AUTO_BATCH = 256  # a bound on auto batches: beyond it a batch no longer raises a device's throughput (vLLM's
                      # max_num_seqs default) and the first results of a shard wait for too many rows
UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
         "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(text: str | int) -> int:
    """'24GiB', '4G', '512MiB', '1.5GB', 1000 -> bytes. Decimal units (k, M, G, T, with or without B) are powers of
    1000, binary ones (KiB, MiB, GiB, TiB) of 1024. ValueError for anything else or a size below one byte."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in UNITS:
            raise ValueError(f"cannot read {text!r} as a size: write e.g. 24GiB, 4G, 512MiB or a number of bytes")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * UNITS[unit])
    if size < 1:
        raise ValueError(f"size {text!r} is below one byte")
    return size


def format_size(size: int) -> str:
    """Bytes as the largest binary unit that keeps a number >= 1: 25769803776 -> '24.0 GiB'."""
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def weight_bytes(model_config: Any, dtype_bytes: int) -> int:
    """Every parameter of the model at `dtype_bytes` each, counted on the meta device (no memory, no weights)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(as_llava_config(model_config))
    return dtype_bytes * sum(p.numel() for p in model.parameters())


def images_crops(model_config: Any) -> int:
    """Crops per image at most: 1 for LLaVA-1.5; the base image plus the largest AnyRes grid for LLaVA-NeXT."""
    config = as_llava_config(model_config)
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        return 1
    side = config.vision_config.image_size
    return 1 + max((h // side) * (w // side) for h, w in pinpoints)


@dataclass(frozen=True)
class RowMemory:
    """What one row of a batch adds to the memory at its peak, in bytes."""
    kv: int           # the cache at its largest: prompt, kept visual entries per layer and every generated token
    activations: int  # the prefill's largest transient (upper bound)

    @property
    def total(self) -> int:
        return self.kv + self.activations


def row_memory(model_config: Any, reducer: str, budget: dict[str, Any], text_tokens: int, new_tokens: int,
               dtype_bytes: int) -> RowMemory:
    """Peak bytes one row adds at this configuration. text_tokens: the prompt's tokens besides the image's
    placeholders; new_tokens: the most tokens generated (every one is cached)."""
    import reducers

    dims = model_dims(model_config)
    crops = images_crops(model_config)
    schedule = reducers.schedule(as_llava_config(model_config), reducer, **budget)
    # [L] cache entries per LLM layer at the end of generate: prompt + kept visual entries + generated tokens
    cached = [text_tokens + crops * n + new_tokens for n in schedule["visual_entries_per_layer"]]
    kv = kv_bytes(dims.text, cached, dtype_bytes)
    llm_tokens = text_tokens + crops * max(schedule["visual_tokens_per_layer"])  # the longest layer in prefill
    input_tokens = text_tokens + crops * schedule["visual_tokens_in"]           # inputs_embeds before any cut
    vision_tokens = max(schedule["vision_tokens_per_layer"])                     # per crop, CLS included
    vision_heads = as_llava_config(model_config).vision_config.num_attention_heads
    return RowMemory(kv=kv, activations=activation_bytes_per_row(
        dims, vision_heads, llm_tokens, input_tokens, vision_tokens, crops, dtype_bytes))


def activation_bytes_per_row(dims: ModelDims, vision_heads: int, llm_tokens: int, input_tokens: int,
                             vision_tokens: int, crops: int, dtype_bytes: int) -> int:
    """The prefill's transient memory for one row: the larger of the vision tower's and the LLM's phase, plus the
    input embeddings (held through the whole forward) and the last position's logits.

    Each phase sums one layer's tensors as if all were alive at once (hidden state and its norm, Q/K/V/O, one fp32
    heads x n x n score matrix, the MLP's hidden activations), an upper bound: a layer frees most of them before the
    next part runs, and fused SDPA kernels never hold the scores; they are counted once because eager attention and
    the methods that rank tokens by attention (FastV, FiCoCo, VisionZip's CLS row) do hold them. The vision phase
    also holds every tower layer's output (LLaVA asks for all hidden states to pick its feature layer).
    """
    text, vision = dims.text, dims.vision
    q_width, kv_width = text.heads * text.head_dim, text.kv_heads * text.head_dim
    llm_layer = llm_tokens * (2 * text.hidden + 2 * q_width + 2 * kv_width + 3 * text.intermediate) * dtype_bytes \
        + text.heads * llm_tokens * llm_tokens * SCORE_BYTES
    vision_layer = vision_tokens * (6 * vision.hidden + 2 * vision.intermediate) * dtype_bytes \
        + vision_heads * vision_tokens * vision_tokens * SCORE_BYTES
    vision_states = (vision.layers + 1) * vision_tokens * vision.hidden * dtype_bytes
    vision_phase = crops * (vision_layer + vision_states)
    embeddings = input_tokens * text.hidden * dtype_bytes
    logits = 2 * text.vocab * LOGIT_BYTES
    return max(vision_phase, llm_layer) + embeddings + logits


@dataclass(frozen=True)
class BatchFit:
    """The memory rule's answer for one configuration."""
    batch_size: int      # rows that fit (0: not even one), at most MAX_AUTO_BATCH
    memory: int          # the memory per actor it was computed for
    usable: int          # memory minus MARGIN
    weights: int
    per_row: RowMemory

    def needed(self, batch_size: int) -> int:
        """Bytes the rule says a batch of `batch_size` rows needs."""
        return self.weights + batch_size * self.per_row.total


def largest_batch(memory: int, weights: int, per_row: RowMemory) -> BatchFit:
    """The most rows with weights + rows x per-row peak within memory x (1 - MARGIN), capped at MAX_AUTO_BATCH."""
    usable = int(memory * (1 - MARGIN))
    fits = max(0, (usable - weights) // per_row.total)
    return BatchFit(batch_size=min(fits, MAX_AUTO_BATCH), memory=memory, usable=usable, weights=weights,
                    per_row=per_row)


def default_memory(actors_per_machine: int) -> tuple[int, str]:
    """The memory per actor when none is given, and where it came from: the GPU's total memory on a GPU machine,
    else this machine's available memory shared by the actors it runs. MARGIN is taken off later, in the rule."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), f"{props.name} total memory"
    import psutil

    available = int(psutil.virtual_memory().available)
    return available // max(1, actors_per_machine), f"this machine's available memory / {actors_per_machine} actors"
