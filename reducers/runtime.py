"""The plumbing every method shares; the only file that touches transformers internals.

Hooks (no forked modeling file, SDPA kept) on an unmodified LlavaForConditionalGeneration /
LlavaNextForConditionalGeneration:

- vision tower: after each vision site layer the method's `reduce_vision` shortens the crops' sequences
  (CLS stays first); crops that keep different counts are padded and later tower layers get a key mask.
  At the tower's output the selected feature layer is scattered back to the full patch grid, so LLaVA's
  own projector and AnyRes packing run unchanged; the dropped placeholders are removed at the LLM input
  ("as if the processor had emitted fewer <image> tokens": positions are renumbered).
- LLM input: the prompt is re-packed (left padding) without the dropped placeholders; the runtime owns the
  2-D masks and positions from here on, also during decoding, where `generate` still counts the
  original prompt length.
- decoder layers: before each LLM site layer K the method's `reduce_llm` picks (and may merge) visual
  tokens, scored from the q / k captured at layer K-1; hidden states and RoPE tables are gathered per
  row (original positions kept), and layers >= K get their own cache layout: each layer's mask is built by
  transformers' `create_causal_mask` from that layout's 2-D mask, sized from that layer's cache.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from . import budget
from .methods import Method
from .scores import query_attention
from .shape import ModelShape
from .rows import gather_rows, pack, pack_right, scatter_rows
from .step import Reduction, Step


# ------------------------------------------------------------------ transformers versions
# The runtime reads transformers' forward arguments, so a release that renames one would make it silently wrong.
# It reads what changed between the tested releases under every name they use, checks the rest when it attaches, and
# raises `IncompatibleTransformers` where a forward does not look as expected, rather than generating.
TESTED_TRANSFORMERS = ("5.23.0", "5.24.0", "5.25.0")
# generate hands the model its KV cache as `cache=` from 5.24 on (`past_key_values=`, deprecated until 5.40, before)
CACHE_NAMES = ("cache", "past_key_values")


class IncompatibleTransformers(RuntimeError):
    """transformers (or the model) behaves differently from what the runtime was built for: nothing is generated."""

    def __init__(self, expected: str, seen: str):
        super().__init__(f"trimlens runtime expected {expected}, but saw {seen}. transformers "
                         f"{transformers.__version__} is installed; trimlens is tested with "
                         f"{' and '.join(TESTED_TRANSFORMERS)} (the versions in requirements.lock)")


def _cache_name(fn: Callable, what: str) -> str:
    """The name under which `fn` takes the KV cache."""
    params = inspect.signature(fn).parameters  # follows the deprecation wrappers to the real signature
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise IncompatibleTransformers(f"{what} to take the KV cache as one of {CACHE_NAMES}",
                                   f"the parameters {list(params)}")


def _cache_in(kwargs: dict, where: str) -> Cache | None:
    """The KV cache passed to a forward under either name; a Cache under any other name is an error."""
    stray = [name for name, value in kwargs.items() if isinstance(value, Cache) and name not in CACHE_NAMES]
    if stray:
        raise IncompatibleTransformers(f"the KV cache of {where} as one of {CACHE_NAMES}", f"it passed as `{stray[0]}`")
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def cache_of_output(output) -> Cache | None:
    """The KV cache a model output returns (its field was renamed with the argument)."""
    fields = getattr(output, "__dataclass_fields__", {})
    for name in CACHE_NAMES:
        if name in fields:
            return getattr(output, name)
    raise IncompatibleTransformers(f"the language model's output to hold the KV cache as one of {CACHE_NAMES}",
                                   f"{type(output).__name__} with fields {list(fields)}")


def _check_model_calls(base: nn.Module) -> None:
    """The forward signatures the hooks rely on, checked once when a method attaches."""
    lm, tower = base.language_model, base.vision_tower
    needs = [(base.forward, "pixel_values"), (base.get_image_features, "pixel_values"),
             (lm.layers[0].forward, "position_embeddings"), (lm.layers[0].self_attn.forward, "position_embeddings")]
    for fn, name in needs:
        if name not in inspect.signature(fn).parameters:
            raise IncompatibleTransformers(f"{fn.__qualname__} to take `{name}`",
                                           f"the parameters {list(inspect.signature(fn).parameters)}")
    for fn in (lm.forward, lm.layers[0].forward, lm.layers[0].self_attn.forward):
        _cache_name(fn, fn.__qualname__)
    positional = list(inspect.signature(tower.encoder.layers[0].forward).parameters)[:2]
    if positional != ["hidden_states", "attention_mask"]:  # the tower's key mask is passed positionally
        raise IncompatibleTransformers("the vision encoder layers to take (hidden_states, attention_mask, ...)",
                                       f"{positional}")
    if transformers.__version__ not in TESTED_TRANSFORMERS:
        warnings.warn(f"trimlens is tested with transformers {' and '.join(TESTED_TRANSFORMERS)}, not "
                      f"{transformers.__version__}: the runtime checks what it reads and raises if it changed",
                      stacklevel=3)


SDPA_WITH_LSE = "trimlens_sdpa"  # the vision tower's attention implementation while vision sites are attached
_lse_sinks: dict[nn.Module, Callable[[Tensor], None]] = {}  # site attention module -> who takes its log-sum-exp


def _sdpa_keeping_lse(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """The tower's SDPA. At a vision site on CPU it calls the kernel SDPA dispatches to there (same output, bit for
    bit), which also returns each query row's log-sum-exp: FiCoCo's scores need those softmax normalisers, and
    recomputing them would cost a second q k^T over every row. Elsewhere it is transformers' SDPA as it is."""
    sink = _lse_sinks.get(module)
    if sink is None or query.device.type != "cpu" or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # as SDPA turns a boolean mask additive
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attention_mask, float("-inf"))
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=attention_mask, scale=scaling)  # [B, H, S, d], [B, H, S] fp32
    sink(lse)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA_WITH_LSE, _sdpa_keeping_lse)


class _TowerKeepsLse:
    """While attached: the tower's attention is `_sdpa_keeping_lse` and its site layers hand over their
    log-sum-exp; `remove()` puts plain SDPA back."""

    def __init__(self, config, sinks: dict[nn.Module, Callable[[Tensor], None]]):
        self.config, self.sinks = config, sinks
        _lse_sinks.update(sinks)
        config._attn_implementation = SDPA_WITH_LSE

    def remove(self) -> None:
        for module in self.sinks:
            _lse_sinks.pop(module, None)
        self.config._attn_implementation = "sdpa"


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
    """The images of a batch: per image its full count and budget, per crop its share, and what survived."""
    full: Tensor                # [I] placeholder (= full visual token) count
    budget: Tensor              # [I] layer-averaged budget N
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
    stats: dict = field(default_factory=dict)
    timer: float = 0.0


class Runtime:
    """Attaches one method at one budget to one model; `remove()` takes every hook away again."""

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
        # `none` only observes: no hook of its changes an argument, so it cannot change the model's outputs
        self.observes_only = not (self.vision_sites or self.llm_sites or self.evicts)
        _check_model_calls(self.base)
        self.mask_cache_arg = _cache_name(create_causal_mask, "create_causal_mask")
        self.generating = False  # inside a generate call: every forward after its prefill must be a decode step
        self.pass_: Pass | None = None
        self.images: Images | None = None  # set by the tower run, taken by the next prefill
        self.tower: Tower | None = None
        self.captured: dict[str, Tensor] = {}  # "q{l}" / "k{l}": projections captured at a scoring layer
        self.stats: dict = {}
        self._handles: list = []
        self._install()

    # ----------------------------------------------------------------- hooks

    def _install(self) -> None:
        add = self._handles.append
        self._wrap_image_features()
        self._wrap_generate()
        add(self.base.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        add(self.base.register_forward_hook(self._end_forward))
        add(self.lm.register_forward_pre_hook(self._enter_llm, with_kwargs=True))
        add(self.lm.register_forward_hook(self._leave_llm))
        if self.vision_sites:
            add(self.tower_module.register_forward_pre_hook(self._enter_tower))
            add(self.tower_module.register_forward_hook(self._leave_tower))
            if self.tower_module.config._attn_implementation == "sdpa":
                layers = self.tower_module.encoder.layers
                add(_TowerKeepsLse(self.tower_module.config,
                                   {layers[j].self_attn: functools.partial(self._keep_lse, j) for j in self.vision_sites}))
            for j, layer in enumerate(self.tower_module.encoder.layers):
                add(layer.register_forward_pre_hook(self._tower_layer_mask))
                if j in self.vision_sites:
                    self._capture_qk(layer.self_attn, j)
                    # prepend: shorten the output before transformers records it as a hidden state
                    add(layer.register_forward_hook(self._vision_site_hook(j), prepend=True))
        if self.llm_sites or self.evicts:
            for l, layer in enumerate(self.lm.layers):
                add(layer.register_forward_pre_hook(self._decoder_layer_hook(l), with_kwargs=True))
                if l + 1 in self.llm_sites:
                    self._capture_qk(layer.self_attn, l)
                if self.evicts:
                    add(layer.self_attn.q_proj.register_forward_hook(self._capture_last_query(l)))
                    add(layer.self_attn.register_forward_hook(self._attention_received(l), with_kwargs=True))

    def _capture_qk(self, attn: nn.Module, layer: int) -> None:
        def keep(name):
            def hook(module, args, output):
                if self.tower is not None or (self.pass_ is not None and self.pass_.prefill):
                    self.captured[f"{name}{layer}"] = output
            return hook
        self._handles.append(attn.q_proj.register_forward_hook(keep("q")))
        self._handles.append(attn.k_proj.register_forward_hook(keep("k")))

    def _keep_lse(self, layer: int, lse: Tensor) -> None:
        if self.tower is not None:
            self.captured[f"lse{layer}"] = lse

    def _capture_last_query(self, layer: int):
        def hook(module, args, output):
            if self.pass_ is not None and self.pass_.evicting:
                self.captured[f"last{layer}"] = output[:, -1:]  # [B, 1, H*d]: the newest query only
        return hook

    def _attention_received(self, layer: int):
        """After layer `layer`'s attention: add what its newest query paid each cached entry (for eviction)."""
        def hook(module, args, kwargs, output):
            p = self.pass_
            cache = _cache_in(kwargs, "a decoder layer's attention")
            if p is None or cache is None or not p.evicting:
                return None
            rows = p.kv[layer].valid.shape[0]
            q = self.captured.pop(f"last{layer}").view(rows, 1, -1, module.head_dim).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
            paid = query_attention(q, cache.layers[layer].keys, p.kv[layer].valid[:, None, :])[:, 0]  # [B, S_l]
            p.received[layer] = paid if p.prefill else p.received[layer] + paid
            return None
        return hook

    def _wrap_image_features(self) -> None:
        """generate runs the tower before the first forward: wrap the model's get_image_features (per instance)."""
        original = self.base.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            given = signature.bind(*args, **kwargs).arguments  # LLaVA-NeXT's forward passes image_sizes positionally
            start = _now(self.model)
            self.images = self._locate_images(given["pixel_values"], given.get("image_sizes"))
            output = original(*args, **kwargs)
            self.images.seconds = _now(self.model) - start
            return output
        self.base.get_image_features = get_image_features

    def _wrap_generate(self) -> None:
        """Mark the span of a generate call (per instance): its first forward is the prefill, every later one must
        arrive as a decode step with the cache the prefill filled."""
        original = self.model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            if kwargs.get("use_cache") is False:
                raise ValueError("trimlens reducers need generate's KV cache: leave use_cache at its default (True)")
            self.generating, self.pass_ = True, None
            try:
                return original(*args, **kwargs)
            finally:
                self.generating = False
        self.model.generate = generate

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        del self.base.get_image_features, self.model.generate  # back to the class's methods
        self.pass_ = self.images = self.tower = None

    # ------------------------------------------------------- whole forward

    def _begin_forward(self, module, args, kwargs):
        cache = _cache_in(kwargs, "the model's forward")
        if cache is None or cache.get_seq_length() == 0:
            if self.generating and self.pass_ is not None:
                raise IncompatibleTransformers(
                    "each forward of generate after the prefill to be a decode step carrying the KV cache",
                    f"forward {self.pass_.forward + 1} with {'no' if cache is None else 'an empty'} cache "
                    f"(its arguments: {sorted(k for k, v in kwargs.items() if v is not None)})")
            input_ids = kwargs.get("input_ids", args[0] if args else None)  # LLaVA-NeXT passes it positionally
            if input_ids is None:
                raise ValueError("trimlens reducers need input_ids (with the <image> placeholders), not inputs_embeds")
            self.pass_ = self._new_pass(input_ids, kwargs.get("attention_mask"))
            self.pass_.pixels = kwargs.get("pixel_values") is not None
        elif self.pass_ is None or self.pass_.prefill:
            raise RuntimeError("a decode step arrived without its prefill; attach before calling generate")
        elif cache.get_seq_length() != self.pass_.kv[0].valid.shape[1]:
            raise IncompatibleTransformers(f"the cache of LLM layer 0 to hold the {self.pass_.kv[0].valid.shape[1]} "
                                           "entries the runtime laid out", f"{cache.get_seq_length()} entries")
        self.pass_.forward += 1
        self.pass_.timer = _now(module)

    def _end_forward(self, module, args, output):
        p = self.pass_
        elapsed = _now(module) - p.timer
        key = "prefill_seconds" if p.forward == 1 else "decode_seconds"
        p.stats[key] += elapsed
        self.stats = p.stats

    def _new_pass(self, input_ids: Tensor, attention_mask: Tensor | None) -> Pass:
        image_mask = input_ids == self.model.config.image_token_id  # [B, S]
        prompt = attention_mask.sum(1) if attention_mask is not None else torch.full_like(input_ids[:, 0], input_ids.shape[1])
        full_row = image_mask.sum(1)
        stats = {"method": self.method.name, "rows": image_mask.shape[0], "prompt_tokens": prompt.tolist(),
                 "visual_tokens_in": full_row.tolist(), "visual_tokens_budget": full_row.tolist(),
                 "decode_steps": 0, "scoring_seconds": 0.0, "prefill_seconds": 0.0, "decode_seconds": 0.0,
                 "kv_bytes_peak": 0, "dtype_bytes": self.lm.dtype.itemsize}
        return Pass(image_mask=image_mask, stats=stats)

    def _take_images(self, image_mask: Tensor) -> None:
        """Bind the images the tower just ran on to the prompt's rows; set the LLM sites' keep counts."""
        p, images = self.pass_, self.images
        self.images = None
        if images is None and bool(image_mask.any()):
            raise IncompatibleTransformers(
                f"the vision tower to run through get_image_features on the images of the prompt's "
                f"{int(image_mask.sum())} <image> placeholders", "no image located in this forward"
                + ("" if p.pixels else " (it was given no pixel_values)"))
        if images is None:
            return
        if int(images.full.sum()) != int(image_mask.sum()):
            raise ValueError(f"the prompt has {int(image_mask.sum())} <image> placeholders but the images need "
                             f"{int(images.full.sum())}; pass the processor's output unchanged")
        # placeholders are filled in row-major order: image i starts at its first placeholder
        starts = torch.cumsum(images.full, 0) - images.full
        image_row = image_mask.nonzero()[:, 0].cpu()[starts]
        full_row = image_mask.sum(1).cpu()
        budget_row = torch.zeros_like(full_row).index_add_(0, image_row, images.budget)
        entering = torch.zeros_like(full_row).index_add_(0, image_row, self._vision_target(images))
        if self.llm_sites:
            self._check_llm_budget(entering, budget_row)
            counts = budget.llm_counts(entering, budget_row, self.llm_sites, self.shape.llm_layers)
            p.llm_keep = dict(zip(self.llm_sites, counts))
        p.images = images
        p.stats["visual_tokens_budget"] = budget_row.tolist()
        p.stats["prefill_seconds"] += images.seconds
        p.stats["scoring_seconds"] += images.scoring_seconds

    def _vision_target(self, images: Images) -> Tensor:
        return budget.vision_target(images.full, images.budget, self.method.vision_share)

    def _check_llm_budget(self, entering: Tensor, budget_row: Tensor) -> None:
        first, layers = self.llm_sites[0], self.shape.llm_layers
        short = budget_row * layers < first * entering
        if short.any():
            row = int(short.nonzero()[0])
            smallest = budget.smallest_llm_budget(int(entering[row]), first, layers)
            raise ValueError(f"{self.method.name} prunes first at LLM layer {first} of {layers}, so it cannot average "
                             f"below {first}/{layers} of the {int(entering[row])} visual tokens it receives: the smallest "
                             f"budget it can meet for this image is {smallest} (asked {int(budget_row[row])})")

    # --------------------------------------------------------------- images

    def _locate_images(self, pixel_values: Tensor, image_sizes: Tensor | None) -> Images:
        """Per image: full count and budget; per placeholder: which crop patch fills it; per crop: its share."""
        patches = self.shape.patches
        if self.shape.family == "llava":
            n_images = pixel_values.shape[0]
            full = torch.full((n_images,), patches, dtype=torch.long)
            placeholder_patch = torch.arange(n_images * patches)
            crops_per_image = torch.ones(n_images, dtype=torch.long)
        else:
            placeholder_patch, full, crops_per_image = self._next_layout(image_sizes)
        no_budget = self.visual_tokens is None and self.ratio is None  # `none`: nothing is cut
        budget_ = full.clone() if no_budget else budget.resolve(full, self.visual_tokens, self.ratio)
        eligible = torch.zeros(int(crops_per_image.sum()) * patches, dtype=torch.bool)
        eligible[placeholder_patch[placeholder_patch >= 0]] = True
        eligible = eligible.view(-1, patches)
        image_of_placeholder = torch.repeat_interleave(torch.arange(len(full)), full)
        newlines = torch.zeros_like(full).index_add_(0, image_of_placeholder, (placeholder_patch < 0).long())
        to_keep = budget.vision_target(full, budget_, self.method.vision_share) - newlines
        if (to_keep < 0).any():
            i = int((to_keep < 0).nonzero()[0])
            raise ValueError(f"the budget {int(budget_[i])} is below the {int(newlines[i])} row-separator tokens "
                             f"LLaVA-NeXT adds for this image; use at least {int(newlines[i]) + 1}")
        crop_image = torch.repeat_interleave(torch.arange(len(full)), crops_per_image)
        crop_keep = budget.split_by_weight(to_keep, eligible.sum(1), crop_image)
        return Images(full, budget_, placeholder_patch, eligible, crop_keep)

    def _next_layout(self, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run LLaVA-NeXT's own AnyRes packing on patch indices to learn where each patch lands."""
        config, patches = self.model.config, self.shape.patches
        crops = torch.tensor([image_size_to_num_patches(size, config.image_grid_pinpoints,
                                                        config.vision_config.image_size) for size in image_sizes.tolist()])
        first = torch.cumsum(crops, 0) - crops
        index = [(torch.arange(n * patches, dtype=torch.float32) + f * patches).view(n, patches, 1)
                 for n, f in zip(crops.tolist(), first.tolist())]
        packed, lengths = self.base.pack_image_features(index, image_sizes.cpu(), "default", torch.tensor([-1.0]))
        return torch.cat(packed).view(-1).long(), lengths.cpu().long(), crops

    # ---------------------------------------------------------- vision tower

    def _enter_tower(self, module, args):
        crops, images = args[0].shape[0], self.images
        if images is None or images.crop_keep.shape[0] != crops:
            raise IncompatibleTransformers("the vision tower to run inside get_image_features, which places its crops",
                                           "the tower running outside get_image_features")
        eligible = images.crop_eligible.sum(1)
        slots = torch.arange(-1, self.shape.patches, device=args[0].device).expand(crops, -1)
        self.tower = Tower(slots=slots,
                           valid=None, targets=budget.linear_steps(eligible, images.crop_keep, len(self.vision_sites)))
        images.vision_tokens = [(0, crops * (self.shape.patches + 1))]

    def _tower_layer_mask(self, module, args):
        tower = self.tower
        if tower is None or tower.valid is None:
            return None
        return (args[0], tower.valid[:, None, None, :]) + tuple(args[2:])  # key mask for ragged crops

    def _vision_site_hook(self, layer: int):
        def hook(module, args, output):
            return self._reduce_tower(layer, output)
        return hook

    def _reduce_tower(self, layer: int, hidden: Tensor) -> Tensor:
        """Shorten the crops after tower layer `layer`. Only patches that reach the LLM are candidates: CLS
        and the patches AnyRes unpadding drops stay as context, so the tower computes what it did before."""
        images, tower = self.images, self.tower
        attn = self.tower_module.encoder.layers[layer].self_attn
        crops, length, _ = hidden.shape
        q = self.captured.pop(f"q{layer}").view(crops, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = self.captured.pop(f"k{layer}").view(crops, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        valid = tower.valid if tower.valid is not None else torch.ones(crops, length, dtype=torch.bool, device=hidden.device)
        eligible = torch.cat([images.crop_eligible, images.crop_eligible[:, :1] & False], 1).to(hidden.device)
        is_cand = valid & eligible.gather(1, tower.slots.masked_fill(tower.slots < 0, eligible.shape[1] - 1))
        cand, cand_valid = pack(is_cand)
        step = Step(hidden=hidden, q=q, k=k, key_valid=valid, cand=cand, cand_valid=cand_valid,
                    keep=tower.targets[tower.site].to(hidden.device), causal=False, grid=self.shape.grid,
                    slots=tower.slots.gather(1, cand), layer=layer, lse=self.captured.pop(f"lse{layer}", None))
        start = _now(self.model)
        with torch.no_grad():
            reduction = self.method.reduce_vision(step)
        images.scoring_seconds += _now(self.model) - start
        kept_pos = cand.gather(1, reduction.kept)  # [C, K] sequence positions
        if reduction.hidden is not None:
            hidden = scatter_rows(hidden, kept_pos, reduction.hidden, reduction.kept_valid)
        keep = scatter_rows(valid & ~is_cand, kept_pos, reduction.kept_valid, reduction.kept_valid)
        index, new_valid = pack(keep)  # order-preserving: CLS stays first
        tower.slots = tower.slots.gather(1, index)
        tower.valid = None if bool(new_valid.all()) else new_valid
        tower.site += 1
        images.vision_tokens.append((layer + 1, int(new_valid.sum())))
        return gather_rows(hidden, index)

    def _leave_tower(self, module, args, output):
        """Scatter the feature layer back onto the full patch grid; record which patches survive."""
        images, tower = self.images, self.tower
        index = self.shape.feature_layers
        features = output.hidden_states[index]  # [C, 1+K, D]
        crops, _, dim = features.shape
        patches = self.shape.patches
        valid = tower.valid if tower.valid is not None else torch.ones_like(tower.slots, dtype=torch.bool)
        slot = (tower.slots + 1).masked_fill(~valid, patches + 1)  # CLS -> 0; padding -> a spare row, cut below
        full = features.new_zeros(crops, patches + 2, dim)
        full.scatter_(1, slot[..., None].expand(-1, -1, dim), features)
        states = list(output.hidden_states)
        states[index] = full[:, :patches + 1]
        output.hidden_states = tuple(states)
        kept_patch = torch.zeros(crops, patches + 2, dtype=torch.bool, device=features.device)
        kept_patch.scatter_(1, slot, valid)
        flat = kept_patch[:, 1:patches + 1].reshape(-1).cpu()
        where = images.placeholder_patch
        images.placeholder_keep = (where < 0) | flat[where.clamp(min=0)]
        self.tower = None
        return output

    # -------------------------------------------------------------- LLM input

    def _enter_llm(self, module, args, kwargs):
        seen = dict(kwargs) if self.observes_only else kwargs  # `none` lays out a copy and hands nothing back
        if self.pass_.prefill:
            self._prepare_prefill(seen)
        else:
            self._prepare_decode(seen)
        return None if self.observes_only else (args, kwargs)

    def _prepare_prefill(self, kwargs) -> None:
        p = self.pass_
        self._take_images(p.image_mask)
        embeds = kwargs["inputs_embeds"]  # [B, S, D]
        rows, length = embeds.shape[:2]
        mask2d = kwargs.get("attention_mask")
        valid = mask2d.bool() if mask2d is not None else torch.ones(rows, length, dtype=torch.bool, device=embeds.device)
        visual = p.image_mask.to(embeds.device)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        positions = positions.expand(rows, -1)
        survivors = p.images.placeholder_keep if p.images is not None else None
        if survivors is not None and not bool(survivors.all()):
            keep = valid.clone()
            keep[visual] = survivors.to(embeds.device)
            index, valid = pack_right(keep & valid)
            embeds, visual = gather_rows(embeds, index), visual.gather(1, index) & valid
            positions = (valid.long().cumsum(1) - 1).masked_fill(~valid, 1)  # as if fewer placeholders were sent
            kwargs["inputs_embeds"] = embeds
        kwargs["attention_mask"] = valid
        kwargs["position_ids"] = positions
        layout = Layout(valid=valid, visual=visual, positions=positions)
        p.kv = [layout] * self.shape.llm_layers
        p.processed = list(p.kv)
        p.input_layout = layout
        p.received = [None] * self.shape.llm_layers
        p.next_position = positions.masked_fill(~valid, -1).amax(1) + 1

    def _prepare_decode(self, kwargs) -> None:
        p = self.pass_
        p.step += 1
        rows = p.next_position.shape[0]
        new_position = (p.next_position + p.step - 1)[:, None]  # [B, 1]
        for layout in {id(l): l for l in p.kv}.values():
            layout.valid = torch.cat([layout.valid, layout.valid.new_ones(rows, 1)], 1)
            layout.visual = torch.cat([layout.visual, layout.visual.new_zeros(rows, 1)], 1)
            layout.positions = torch.cat([layout.positions, new_position], 1)
            layout.rope = None
        if self.evicts and p.evicting:
            p.received = [torch.cat([r, r.new_zeros(rows, 1)], 1) for r in p.received]
        p.input_layout = p.kv[0]
        kwargs["attention_mask"] = p.kv[0].valid
        kwargs["position_ids"] = new_position

    def _leave_llm(self, module, args, output):
        p = self.pass_
        if p.prefill:
            p.prefill = False
            self.captured.clear()
            p.stats.update(self._prefill_counts())
            p.after_prefill_visual = torch.stack([layout.visual.sum(1) for layout in p.kv]).cpu()
            p.stats["kv_entries_per_step"], p.stats["visual_entries_per_step"] = [], []
            if self.evicts:  # from here on each layer evicts on its own
                p.kv = [dataclasses.replace(layout) for layout in p.kv]
        else:
            p.stats["decode_steps"] = p.step
        self._note_kv_bytes()
        cache = cache_of_output(output)
        if self.evicts and cache is not None:  # a forward without a cache has nothing to evict
            allowed = self.method.decode_keep(p.step + 1, p.after_prefill_visual)
            p.evicting = allowed is not None
            if p.evicting:
                for layer in range(self.shape.llm_layers):
                    self._evict(layer, allowed[layer], cache)
        p.stats["kv_entries_end"] = [layout.valid.sum(1).tolist() for layout in p.kv]
        p.stats["kv_entries_per_step"].append(p.stats["kv_entries_end"])
        p.stats["visual_entries_per_step"].append([layout.visual.sum(1).tolist() for layout in p.kv])
        return None

    def _note_kv_bytes(self) -> None:
        """Track the peak bytes the K/V cache holds (padding included: it is allocated)."""
        config = self.lm.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        entries = sum(layout.valid.numel() for layout in self.pass_.kv)
        kv_bytes = entries * 2 * config.num_key_value_heads * head_dim * self.lm.dtype.itemsize
        self.pass_.stats["kv_bytes_peak"] = max(self.pass_.stats["kv_bytes_peak"], kv_bytes)

    def _evict(self, layer: int, allowed: Tensor, cache) -> None:
        """Let the method choose which visual entries layer `layer` keeps when it holds more than `allowed` [B]."""
        p, layout = self.pass_, self.pass_.kv[layer]
        held = layout.visual.sum(1)
        if bool((held <= allowed).all()):
            return
        cand, cand_valid = pack(layout.visual)
        step = Step(hidden=None, q=None, k=None, key_valid=layout.valid, cand=cand, cand_valid=cand_valid,
                    keep=torch.minimum(allowed.to(held.device), held), causal=True,
                    text=layout.valid & ~layout.visual, layer=layer, received=p.received[layer].gather(1, cand))
        reduction = self._timed(self.method.reduce_decode, step)
        kept_pos = cand.gather(1, reduction.kept)
        keep = scatter_rows(layout.valid & ~layout.visual, kept_pos, reduction.kept_valid, reduction.kept_valid)
        index = _compact_cache(cache, layer, keep)
        valid = keep.gather(1, index)
        p.kv[layer] = Layout(valid=valid, visual=layout.visual.gather(1, index) & valid,
                             positions=layout.positions.gather(1, index))
        p.received[layer] = p.received[layer].gather(1, index)

    def _prefill_counts(self) -> dict:
        p = self.pass_
        visual = torch.stack([layout.visual.sum(1) for layout in p.processed])  # [L, B]
        tokens = torch.stack([layout.valid.sum(1) for layout in p.processed])
        held = [layout.valid.sum(1).tolist() for layout in p.kv]
        vision = [0] * self.shape.vision_layers
        if p.images is not None:
            crops = int(p.images.crop_keep.shape[0])
            marks = p.images.vision_tokens or [(0, crops * (self.shape.patches + 1))]
            vision = [next(total for start, total in reversed(marks) if start <= j) for j in range(len(vision))]
        return {"visual_tokens_per_layer": visual.tolist(), "tokens_per_layer": tokens.tolist(),
                "visual_tokens_avg": visual.double().mean(0).tolist(), "kv_entries_prefill": held,
                "vision_tokens_per_layer": vision,
                "num_crops": int(p.images.crop_keep.shape[0]) if p.images is not None else 0}

    # ---------------------------------------------------------- decoder layers

    def _decoder_layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            return self._before_decoder_layer(layer, args, kwargs)
        return hook

    def _before_decoder_layer(self, layer: int, args, kwargs):
        p = self.pass_
        if p is None:
            return None
        hidden = args[0]
        if p.prefill and layer in self.llm_sites and p.images is not None:
            hidden = self._reduce_llm(layer, hidden, kwargs)
        if p.prefill and layer + 1 in self.llm_sites:  # this layer's q / k will score the next site
            p.score_rope = p.kv[layer].rope or kwargs["position_embeddings"]
        layout = p.kv[layer]
        if layout is p.input_layout:
            return (hidden, *args[1:]), kwargs
        if layout.mask_forward != p.forward:
            cache = {self.mask_cache_arg: _cache_in(kwargs, "a decoder layer")}
            layout.mask = create_causal_mask(config=self.lm.config, inputs_embeds=hidden, attention_mask=layout.valid,
                                             layer_idx=layer, **cache)
            layout.mask_forward = p.forward
        kwargs["attention_mask"] = layout.mask
        if p.prefill:
            kwargs["position_embeddings"] = layout.rope
            kwargs["position_ids"] = layout.positions
        return (hidden, *args[1:]), kwargs

    def _reduce_llm(self, layer: int, hidden: Tensor, kwargs) -> Tensor:
        p = self.pass_
        before = p.kv[layer - 1]
        attn = self.lm.layers[layer - 1].self_attn
        rows, length, _ = hidden.shape
        q = self.captured.pop(f"q{layer - 1}").view(rows, length, -1, attn.head_dim).transpose(1, 2)
        k = self.captured.pop(f"k{layer - 1}").view(rows, length, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *p.score_rope)
        cand, cand_valid = pack(before.visual)
        step = Step(hidden=hidden, q=q, k=k, key_valid=before.valid, cand=cand, cand_valid=cand_valid,
                    keep=p.llm_keep[layer].to(hidden.device), causal=True, text=before.valid & ~before.visual,
                    layer=layer)
        reduction: Reduction = self._timed(self.method.reduce_llm, step)
        kept_pos = cand.gather(1, reduction.kept)  # [B, K]
        if reduction.hidden is not None:
            hidden = scatter_rows(hidden, kept_pos, reduction.hidden, reduction.kept_valid)
        keep = scatter_rows(before.valid & ~before.visual, kept_pos, reduction.kept_valid, reduction.kept_valid)
        index, valid = pack_right(keep)
        cos, sin = before.rope or kwargs["position_embeddings"]
        after = Layout(valid=valid, visual=before.visual.gather(1, index) & valid,
                       positions=before.positions.gather(1, index),
                       rope=(gather_rows(cos, index), gather_rows(sin, index)))
        p.kv[layer:] = p.processed[layer:] = [after] * (self.shape.llm_layers - layer)
        cache = _cache_in(kwargs, "a decoder layer")
        if self.method.prune_cache_before and cache is not None:
            self._note_kv_bytes()  # the earlier layers held everything until now
            for earlier in range(layer):
                _gather_cache(cache, earlier, index)
                if p.received[earlier] is not None:
                    p.received[earlier] = p.received[earlier].gather(1, index)
            p.kv[:layer] = [after] * layer
        return gather_rows(hidden, index)

    def _timed(self, fn, step: Step) -> Reduction:
        start = _now(self.model)
        with torch.no_grad():
            result = fn(step)
        self.pass_.stats["scoring_seconds"] += _now(self.model) - start
        return result


def _gather_cache(cache, layer: int, index: Tensor) -> None:
    """Keep only the entries `index` [B, W] (per row) of one layer's K/V cache."""
    entries = cache.layers[layer]
    heads, dim = entries.keys.shape[1], entries.keys.shape[3]
    at = index[:, None, :, None].expand(-1, heads, -1, dim)
    entries.keys, entries.values = entries.keys.gather(2, at), entries.values.gather(2, at)


def _compact_cache(cache, layer: int, keep: Tensor) -> Tensor:
    """Drop the entries not in `keep` [B, S] from one layer's K/V cache in place, moving few entries: the cache loses
    its first `cut` columns (width: the fullest row's count) as a view, and the kept entries among them move into
    dropped slots further right. Attention does not depend on the entries' order (keys carry their RoPE, the mask
    follows the layout), so everything else stays where it is; with cut = 0 nothing moves and the dropped entries
    are padding until a later eviction narrows the cache. Returns [B, W]: the old column each new column holds."""
    rows, width = keep.shape
    cut = width - int(keep.sum(1).max())
    movers, movers_valid = pack(keep[:, :cut])  # [B, M] kept entries in the columns that go
    # every row has at least as many free slots as movers; `pack` pads both with distinct other columns, so the
    # padded pairs copy a column onto itself and no slot is written twice
    slots = pack(~keep[:, cut:])[0][:, :movers.shape[1]]  # [B, M] new columns
    sources = torch.where(movers_valid, movers, slots + cut)
    entries, row = cache.layers[layer], torch.arange(rows, device=keep.device)[:, None]
    for name in ("keys", "values"):
        full = getattr(entries, name)  # [B, Hkv, S, d]
        kept = full[:, :, cut:]
        # indexing in place: `scatter_` would copy the strided view whole; the read copies before the write
        kept.transpose(1, 2)[row, slots] = full.transpose(1, 2)[row, sources]  # [B, M, Hkv, d]
        setattr(entries, name, kept)
    index = torch.arange(cut, width, device=keep.device).expand(rows, -1)  # [B, W]
    return index.scatter(1, slots, sources)


def _now(module: nn.Module) -> float:
    """Wall time, after the device has finished queued work (so GPU timings are real)."""
    device = next(module.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
