"""Cost accounting: FLOPs and KV-cache bytes of a LLaVA run, from the model config and per-layer token counts.

Everything here is arithmetic on shapes: no model is built or run, so the planner and the benchmarks can price a
reduction schedule before running it, and `batch_cost` prices a finished generate from `Attachment.last`.

Conventions (one place, so every number in the project means the same thing):

* One multiply-add is 2 FLOPs.
* Only matrix products are counted: linear layers, the patch-embedding convolution and the two attention products
  (Q·Kᵀ and P·V). Norms, activations, softmax, rotary embeddings and residual adds are O(tokens × width) and stay
  below 1 % of the total at LLaVA shapes. This is the scope of `torch.utils.flop_counter.FlopCounterMode`,
  which the tests compare against. Biases are not counted (an add, not a multiply-add).
* Attention is counted as the **full** rectangle: n_query × n_key for both products, not the causal half. In
  batched prefill with left padding (what this project runs), transformers passes an explicit 4-D mask to SDPA,
  and a masked kernel computes every block and masks afterwards. Eager attention and FlopCounterMode's SDPA
  formula count the full product too, and so do the papers' FLOPs formulas (FastV: 4nd² + 2n²d + 2ndm), so budgets
  compare like with like. A batch without padding may run an is_causal kernel that skips the upper triangle; its
  attention then costs about half of what is priced here.
* Grouped-query attention: K and V projections are priced at num_key_value_heads × head_dim outputs; the attention
  products run over all query heads (each K/V head is shared by num_attention_heads / num_key_value_heads queries).
* lm_head: prefill prices it for the **last position of each row only**, because `generate` calls the model with
  `logits_to_keep=1`; every decode step prices it for its one new token.
* Padding is not a cost of the method: every count is of a row's non-pad tokens (what `Stats` reports). What a
  padded batch really spends can be priced by passing the padded length as the row's count.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from transformers import LlavaConfig, LlavaNextConfig

from .stats import Stats

CONFIG_DIR = Path(__file__).parent / "configs"

# Decoders priced by `TextDims`: pre-norm blocks with Q/K/V/O projections and a gated MLP (gate, up, down).
GATED_MLP_DECODERS = ("llama", "mistral", "qwen2")
# Vision towers priced by `VisionDims`: ViT blocks with Q/K/V/O projections, a 2-layer MLP and one CLS token.
CLIP_TOWERS = ("clip_vision_model",)
CONFIG_CLASSES = {"llava": LlavaConfig, "llava_next": LlavaNextConfig}


@dataclass(frozen=True)
class VisionDims:
    """The widths of a CLIP vision tower that its FLOPs depend on."""
    hidden: int
    intermediate: int
    layers: int
    channels: int
    patch_size: int
    patches_per_crop: int  # (image_size / patch_size)², the CLS token not included


@dataclass(frozen=True)
class TextDims:
    """The widths of a gated-MLP decoder (Llama family) that its FLOPs and cache size depend on."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class ProjectorDims:
    """LLaVA's multi-modal projector: Linear(in_features → hidden), GELU, Linear(hidden → hidden)."""
    in_features: int  # vision hidden × number of feature layers concatenated
    hidden: int


@dataclass(frozen=True)
class ModelDims:
    vision: VisionDims
    projector: ProjectorDims
    text: TextDims
    projected_per_crop: int  # feature tokens per crop: the patch grid, plus CLS unless the strategy is "default"


@dataclass(frozen=True)
class Cost:
    """What one batch cost. FLOPs as 2 per multiply-add; `flops_total` is the sum of the four parts."""
    flops_vision: int
    flops_projector: int
    flops_prefill: int    # LLM prefill only (vision tower and projector are separate fields)
    flops_decode: int     # all decode steps together
    flops_total: int
    kv_bytes_peak: int    # valid (non-pad) cache entries at their largest, in bytes


def as_llava_config(model_config: LlavaConfig | LlavaNextConfig | Mapping[str, Any]) -> LlavaConfig | LlavaNextConfig:
    """A config object from a config object or its dict (`to_dict()` / config.json contents)."""
    if isinstance(model_config, (LlavaConfig, LlavaNextConfig)):
        return model_config
    if isinstance(model_config, Mapping):
        model_type = model_config.get("model_type", "llava")
        if model_type not in CONFIG_CLASSES:
            raise ValueError(f"unsupported model_type {model_type!r}; expected one of {sorted(CONFIG_CLASSES)}")
        return CONFIG_CLASSES[model_type].from_dict(dict(model_config))
    raise ValueError(f"expected LlavaConfig, LlavaNextConfig or a dict, got {type(model_config).__name__}")


def reference_config(name: str = "llava-1.5-7b") -> LlavaConfig | LlavaNextConfig:
    """A published model's config, written out in reducers/configs/ (no hub access needed)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"no config named {name!r}; known: {known}")
    return as_llava_config(json.loads(path.read_text()))


def model_dims(model_config: LlavaConfig | LlavaNextConfig | Mapping[str, Any]) -> ModelDims:
    """The widths the costs depend on; ValueError for towers / decoders these formulas do not describe."""
    config = as_llava_config(model_config)
    vision_cfg, text_cfg = config.vision_config, config.text_config
    if vision_cfg.model_type not in CLIP_TOWERS:
        raise ValueError(f"unsupported vision tower {vision_cfg.model_type!r}; expected one of {CLIP_TOWERS}")
    if text_cfg.model_type not in GATED_MLP_DECODERS:
        raise ValueError(f"unsupported language model {text_cfg.model_type!r}; expected one of {GATED_MLP_DECODERS}")
    feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    vision = VisionDims(hidden=vision_cfg.hidden_size, intermediate=vision_cfg.intermediate_size,
                        layers=vision_cfg.num_hidden_layers, channels=vision_cfg.num_channels,
                        patch_size=vision_cfg.patch_size,
                        patches_per_crop=(vision_cfg.image_size // vision_cfg.patch_size) ** 2)
    heads = text_cfg.num_attention_heads
    text = TextDims(hidden=text_cfg.hidden_size, intermediate=text_cfg.intermediate_size,
                    layers=text_cfg.num_hidden_layers, heads=heads,
                    kv_heads=text_cfg.num_key_value_heads or heads,
                    head_dim=getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads,
                    vocab=text_cfg.vocab_size)
    projector = ProjectorDims(in_features=vision.hidden * feature_layers, hidden=text.hidden)
    drops_cls = config.vision_feature_select_strategy == "default"
    return ModelDims(vision=vision, projector=projector, text=text,
                     projected_per_crop=vision.patches_per_crop + (0 if drops_cls else 1))


# ---------------------------------------------------------------- vision tower and projector

def patch_embedding_flops(vision: VisionDims, num_crops: int) -> int:
    """The stride-p convolution that turns each crop into patches_per_crop tokens (always the full grid)."""
    macs_per_patch = vision.channels * vision.patch_size ** 2 * vision.hidden
    return 2 * num_crops * vision.patches_per_crop * macs_per_patch


def vision_layer_flops(vision: VisionDims, tokens: int, num_crops: int) -> int:
    """One CLIP encoder layer over `tokens` tokens (CLS included) summed over `num_crops` crops of equal length.

    Attention is per crop: each crop's n = tokens / num_crops tokens attend to each other (full n × n). Crops that
    keep different counts are padded to the longest inside the tower; that padding is not priced.
    """
    d = vision.hidden
    linear_macs = tokens * (4 * d * d + 2 * d * vision.intermediate)  # q, k, v, out_proj; fc1, fc2
    # Σ over crops of n² · d for each of Q·Kᵀ and P·V, with n = tokens / num_crops.
    attention_macs = 2 * d * tokens * tokens // num_crops
    return 2 * (linear_macs + attention_macs)


def vision_tower_flops(vision: VisionDims, tokens_per_layer: Sequence[int], num_crops: int) -> int:
    """The whole tower: patch embedding plus every encoder layer that ran.

    tokens_per_layer: [vision layers], tokens (CLS included) each layer processed, summed over all crops. transformers
    runs every layer even when the feature layer is the penultimate one, so the last layer is a real cost.
    """
    if num_crops == 0:
        return 0
    return patch_embedding_flops(vision, num_crops) + sum(
        vision_layer_flops(vision, tokens, num_crops) for tokens in tokens_per_layer)


def projector_flops(projector: ProjectorDims, tokens: int) -> int:
    """The 2-layer GELU projector over `tokens` feature tokens (all crops and rows together)."""
    return 2 * tokens * (projector.in_features * projector.hidden + projector.hidden * projector.hidden)


# ---------------------------------------------------------------- language model

def decoder_layer_flops(text: TextDims, new_tokens: int, attended_tokens: int) -> int:
    """One decoder layer: `new_tokens` queries (projected, MLP'd) attending to `attended_tokens` keys.

    Prefill: new_tokens == attended_tokens == the layer's sequence length. Decode: 1 new token attending to the
    whole cache (including itself). Attention is the full new × attended rectangle, over all query heads.
    """
    d, q_width, kv_width = text.hidden, text.heads * text.head_dim, text.kv_heads * text.head_dim
    projection_macs = new_tokens * (d * q_width + 2 * d * kv_width + q_width * d)  # q, k, v, o
    attention_macs = 2 * new_tokens * attended_tokens * q_width  # Q·Kᵀ and P·V
    mlp_macs = 3 * new_tokens * d * text.intermediate  # gate, up, down
    return 2 * (projection_macs + attention_macs + mlp_macs)


def lm_head_flops(text: TextDims, positions: int) -> int:
    """Logits over the vocabulary for `positions` positions."""
    return 2 * positions * text.hidden * text.vocab


def prefill_flops(text: TextDims, tokens_per_layer: Sequence[int]) -> int:
    """LLM prefill of one row: tokens_per_layer [layers] = tokens (text + visual) each decoder layer processed.

    Includes lm_head for the last position only (what `generate` computes).
    """
    if len(tokens_per_layer) != text.layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries; the model has {text.layers} layers")
    return sum(decoder_layer_flops(text, n, n) for n in tokens_per_layer) + lm_head_flops(text, 1)


def decode_step_flops(text: TextDims, kv_lengths: Sequence[int]) -> int:
    """One decode step of one row: kv_lengths [layers] = cache entries each layer attends over, the new one included.

    Includes lm_head for the new token.
    """
    if len(kv_lengths) != text.layers:
        raise ValueError(f"kv_lengths has {len(kv_lengths)} entries; the model has {text.layers} layers")
    return sum(decoder_layer_flops(text, 1, n) for n in kv_lengths) + lm_head_flops(text, 1)


def decode_flops(text: TextDims, kv_after_prefill: Sequence[int], kv_at_end: Sequence[int], steps: int) -> int:
    """All `steps` decode steps of one row, from the cache length per layer after prefill and after the last step.

    Step s (1..steps) attends over a cache that moves linearly from kv_after_prefill to kv_at_end: exact when the
    cache only grows (kv_at_end = kv_after_prefill + steps), the straight-line estimate when entries are evicted on
    the way. Every term of a step is linear in the cache length, so the sum over steps is one step at the mean length
    times `steps`; the mean is taken in exact integer arithmetic (×2 and halved once).
    """
    if steps == 0:
        return 0
    attention_per_key = 2 * 2 * text.heads * text.head_dim  # FLOPs one extra cache entry adds to one step
    # Σ_{s=1..steps} (p + (e - p) · s / steps) = steps · p + (e - p) · (steps + 1) / 2, per layer.
    twice_total_keys = sum(2 * steps * p + (e - p) * (steps + 1) for p, e in zip(kv_after_prefill, kv_at_end))
    per_step_without_attention = decode_step_flops(text, [0] * text.layers)
    return steps * per_step_without_attention + attention_per_key * twice_total_keys // 2


def kv_bytes(text: TextDims, entries_per_layer: Sequence[int], dtype_bytes: int) -> int:
    """Bytes of K and V for entries_per_layer [layers] cache entries (one row, or summed over rows)."""
    return 2 * text.kv_heads * text.head_dim * dtype_bytes * sum(entries_per_layer)


# ---------------------------------------------------------------- one batch, from Attachment.last

def batch_cost(model_config: LlavaConfig | LlavaNextConfig | Mapping[str, Any],
               stats: Stats | Mapping[str, Any]) -> Cost:
    """The cost of the batch described by `stats` (`reducers.attach(...).last` after a generate, or its dict view
    `.stats`).

    Uses: tokens_per_layer [L][B], vision_tokens_per_layer [Lv], num_crops, kv_entries_prefill / kv_entries_end
    [L][B], decode_steps, dtype_bytes. kv_bytes_peak is computed from the valid entries (the larger of after-prefill
    and end, which bound the straight-line cache model of `decode_flops`); stats' own kv_bytes_peak measures the
    allocated cache, padding included.

    The projector is priced on every crop's full patch grid: vision-side methods drop tokens in the tower, but the
    runtime scatters the survivors back onto the grid so that LLaVA's own projector and AnyRes packing run
    unchanged, and the dropped placeholders leave at the LLM input. (At most 0.3 % of LLaVA-1.5-7B's prefill.)
    Not priced: the methods' own scoring (attention rows a method recomputes to rank tokens); it is timed
    separately as stats.scoring_seconds.
    """
    stats = Stats.of(stats)
    dims = model_dims(model_config)
    text = dims.text
    rows = range(len(stats.tokens_per_layer[0]))

    def column(per_layer_rows: Sequence[Sequence[int]], row: int) -> list[int]:  # [L][B] -> [L] of one row
        return [int(layer[row]) for layer in per_layer_rows]

    flops_vision = vision_tower_flops(dims.vision, [int(n) for n in stats.vision_tokens_per_layer], stats.num_crops)
    flops_projector = projector_flops(dims.projector, stats.num_crops * dims.projected_per_crop)
    flops_prefill = sum(prefill_flops(text, column(stats.tokens_per_layer, b)) for b in rows)
    flops_decode = sum(decode_flops(text, column(stats.kv_entries_prefill, b), column(stats.kv_entries_end, b),
                                    stats.decode_steps) for b in rows)
    kv_peak = max(kv_bytes(text, [sum(layer) for layer in entries], stats.dtype_bytes)
                  for entries in (stats.kv_entries_prefill, stats.kv_entries_end))
    return Cost(flops_vision=flops_vision, flops_projector=flops_projector, flops_prefill=flops_prefill,
                flops_decode=flops_decode, flops_total=flops_vision + flops_projector + flops_prefill + flops_decode,
                kv_bytes_peak=kv_peak)


def unreduced_cost(model_config: LlavaConfig | LlavaNextConfig | Mapping[str, Any],
                   stats: Stats | Mapping[str, Any]) -> Cost:
    """What the batch of `stats` would have cost with `none`, priced without running it: every visual token at every
    tower and LLM layer and in every cache, the same prompts and the same number of decode steps."""
    stats = Stats.of(stats)
    dims = model_dims(model_config)
    prompt = stats.prompt_tokens  # [B] real prompt tokens, every <image> placeholder included
    full_tower = stats.num_crops * (dims.vision.patches_per_crop + 1)  # patches + CLS of every crop
    return batch_cost(model_config, dataclasses.replace(
        stats, vision_tokens_per_layer=[full_tower] * dims.vision.layers,
        tokens_per_layer=[prompt] * dims.text.layers, kv_entries_prefill=[prompt] * dims.text.layers,
        kv_entries_end=[[n + stats.decode_steps for n in prompt]] * dims.text.layers))
