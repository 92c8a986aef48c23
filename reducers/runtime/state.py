"""What the tower, prefill and decode parts of the runtime share: the model's parts, the attached method and budget,
and the state of the current run (the pass, its cache layouts and its images), plus the one way a method's
reduction becomes the entries a row keeps."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..methods import Method
from ..rows import scatter_rows
from ..shape import ModelShape
from ..stats import Stats
from ..step import Reduction, Step


@dataclass
class Layout:
    """The cache layout shared by a run of LLM layers: what each entry is, per row."""
    valid: Tensor       # [B, S] real entries (False: padding)
    visual: Tensor      # [B, S] visual entries
    positions: Tensor   # [B, S] RoPE position of each entry
    rope: tuple[Tensor, Tensor] | None = None  # prefill (cos, sin) [B, S, d]; None: the LLM's own tables
    mask: object = None                        # the 4-D mask built for the current forward
    mask_forward: int = -1


@dataclass
class Images:
    """The images of a batch: per image its full count, per crop its share, and what survived."""
    full: Tensor                # [I] placeholder (= full visual token) count
    placeholder_patch: Tensor   # [sum(full)] crop * P + patch of each placeholder, -1 for a NeXT newline
    crop_eligible: Tensor       # [C, P] patches that reach the LLM at all (AnyRes unpadding removes some)
    crop_keep: Tensor           # [C] patches each crop hands the LLM
    placeholder_keep: Tensor | None = None  # [sum(full)] placeholders that survive the tower
    vision_tokens: list[tuple[int, int]] = field(default_factory=list)  # (from tower layer, total tokens)
    seconds: float = 0.0        # tower time (generate runs the tower before the first forward)
    scoring_seconds: float = 0.0


@dataclass
class Tower:
    """The crops' sequences inside the vision tower while sites shorten them."""
    slots: Tensor               # [C, T] patch index of each token (-1: CLS)
    valid: Tensor | None        # [C, T] (None: all real)
    targets: list[Tensor]       # per site, [C] patches kept after it
    site: int = 0


@dataclass
class Pass:
    """State of one generate call (or one plain forward), from prefill to the last decode step."""
    image_mask: Tensor                  # [B, S_in] <image> placeholders of the prompt
    stats: Stats
    pixels: bool = False                # the forward was given pixel_values
    images: Images | None = None
    llm_keep: dict[int, Tensor] = field(default_factory=dict)  # LLM site -> [B] visual tokens kept from there on
    kv: list[Layout] = field(default_factory=list)  # per LLM layer: what its cache holds
    processed: list[Layout] = field(default_factory=list)  # per LLM layer: the tokens it ran on in prefill
    input_layout: Layout | None = None  # the layout the LLM itself built this forward's mask and RoPE from
    received: list[Tensor] = field(default_factory=list)  # per layer [B, S_l]: decode attention paid to each entry
    after_prefill_visual: Tensor | None = None  # [L, B] visual entries per layer after prefill
    next_position: Tensor | None = None  # [B]
    prefill: bool = True
    forward: int = 0
    step: int = 0
    evicting: bool = True  # the method may still evict: decode queries' attention is accumulated
    score_rope: tuple[Tensor, Tensor] | None = None
    timer: float = 0.0


@dataclass
class Captured:
    """The projections of the one layer whose attention scores the next site, held until that site takes them."""
    layer: int = -1
    q: Tensor | None = None    # [N, S, H*d] as q_proj returned it
    k: Tensor | None = None    # [N, S, Hkv*d] as k_proj returned it
    lse: Tensor | None = None  # [N, H, S] fp32: the layer's own softmax normalisers (tower sites on CPU)

    def put(self, layer: int, **projections: Tensor) -> None:
        if layer != self.layer:  # a new scoring layer: what an earlier one left is stale
            self.layer, self.q, self.k, self.lse = layer, None, None, None
        for name, value in projections.items():
            setattr(self, name, value)

    def take(self, layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """q, k (and the log-sum-exp, if kept) of `layer`, handed over once."""
        if layer != self.layer or self.q is None or self.k is None:
            raise RuntimeError(f"the q / k of layer {layer} were not captured (holding layer {self.layer})")
        taken = self.q, self.k, self.lse
        self.clear()
        return taken

    def clear(self) -> None:
        self.layer, self.q, self.k, self.lse = -1, None, None, None


class State:
    """The attached method on its model, and the run in progress."""

    def __init__(self, model: nn.Module, method: Method, visual_tokens: int | None, ratio: float | None):
        self.model, self.method = model, method
        self.visual_tokens, self.ratio = visual_tokens, ratio
        self.shape = ModelShape.from_config(model.config)
        self.base = model.model
        self.tower_module = self.base.vision_tower
        self.lm = self.base.language_model
        self.vision_sites = method.vision_sites(self.shape) if method.vision_share > 0 else []
        self.llm_sites = method.llm_sites(self.shape)
        self.evicts = type(method).decode_keep is not Method.decode_keep
        self.generating = False  # inside a generate call: every forward after its prefill must be a decode step
        self.pass_: Pass | None = None
        self.images: Images | None = None  # set by the tower run, taken by the next prefill
        self.tower: Tower | None = None
        self.captured = Captured()
        self.newest_query: Tensor | None = None  # [B, 1, H*d] decoding: the layer's newest query, for eviction
        self.last: Stats | None = None  # of the last forward (a whole generate: its passes share one Stats)

    def now(self) -> float:
        """Wall time, after the device has finished queued work (so GPU timings are real)."""
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def note_kv_bytes(self) -> None:
        """Track the peak bytes the K/V cache holds (padding included: it is allocated)."""
        config = self.lm.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        entries = sum(layout.valid.numel() for layout in self.pass_.kv)
        kv_bytes = entries * 2 * config.num_key_value_heads * head_dim * self.lm.dtype.itemsize
        self.pass_.stats.kv_bytes_peak = max(self.pass_.stats.kv_bytes_peak, kv_bytes)

    def reduce(self, fn: Callable[[Step], Reduction], step: Step, others: Tensor,
               pack: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor | None, float]:
        """Run the method's reduction at one site and turn it into the entries each row keeps.

        others [N, S]: the non-candidate entries that stay; `pack` lays the kept entries out ([N, S] mask ->
        [N, W] index + validity). Returns the index, its validity, the hidden states [N, S, D] with merged states
        written back (None at a decode site) and the seconds the method took."""
        start = self.now()
        with torch.no_grad():
            reduction = fn(step)
        seconds = self.now() - start
        kept_pos = step.cand.gather(1, reduction.kept)  # [N, K] sequence positions
        hidden = step.hidden
        if reduction.hidden is not None:
            hidden = scatter_rows(hidden, kept_pos, reduction.hidden, reduction.kept_valid)
        keep = scatter_rows(others, kept_pos, reduction.kept_valid, reduction.kept_valid)
        index, valid = pack(keep)
        return index, valid, hidden, seconds
