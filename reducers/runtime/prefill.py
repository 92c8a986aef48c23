"""The LLM prefill's part: the prompt without the placeholders the tower dropped, and visual tokens pruned at the
LLM sites.

The prompt is re-packed (left padding) without the dropped placeholders ("as if the processor had emitted fewer
<image> tokens": positions are renumbered); the runtime owns the 2-D masks and positions from here on. Before each
LLM site layer K the method's `reduce_llm` picks (and may merge) visual tokens, scored from the q / k captured at
layer K-1; hidden states and RoPE tables are gathered per row (original positions kept), and layers >= K get their
own cache layout. Each layer's mask is built by transformers' `create_causal_mask` from its layout's 2-D mask,
sized from that layer's cache, in prefill and while decoding.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..plan import plan
from ..rows import gather_rows, pack, pack_right
from ..step import Step
from .cache import gather_cache
from .compat import IncompatibleTransformers, cache_in, cache_name
from .hooks import Hooks
from .state import Layout, State


class PrefillHooks:
    def __init__(self, state: State):
        self.state = state
        self.mask_cache_arg = cache_name(create_causal_mask, "create_causal_mask")

    def install(self, hooks: Hooks) -> None:
        s = self.state
        if not (s.llm_sites or s.evicts):
            return
        for l, layer in enumerate(s.lm.layers):
            hooks.before(layer, self._layer(l), with_kwargs=True)
            if l + 1 in s.llm_sites:  # this layer's q / k score the next site
                for name in ("q", "k"):
                    hooks.after(getattr(layer.self_attn, f"{name}_proj"), self._capture(l, name))

    def _capture(self, layer: int, name: str):
        def hook(module, args, output):
            if self.state.pass_ is not None and self.state.pass_.prefill:
                self.state.captured.put(layer, **{name: output})
        return hook

    # -------------------------------------------------------------- LLM input

    def enter(self, kwargs: dict) -> None:
        """Lay out the prompt's rows for the LLM (in place on the forward's `kwargs`)."""
        p = self.state.pass_
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
        layers = self.state.shape.llm_layers
        p.kv = [layout] * layers
        p.processed = list(p.kv)
        p.input_layout = layout
        p.received = [None] * layers
        p.next_position = positions.masked_fill(~valid, -1).amax(1) + 1

    def _take_images(self, image_mask: Tensor) -> None:
        """Bind the images the tower just ran on to the prompt's rows; plan the LLM sites' keep counts."""
        s = self.state
        p, images = s.pass_, s.images
        s.images = None
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
        budgets = plan(s.shape, s.method, images.full, s.visual_tokens, s.ratio, image_row, image_mask.shape[0])
        p.llm_keep = dict(zip(budgets.llm_sites, budgets.llm_keep))
        p.images = images
        p.stats.visual_tokens_budget = budgets.row_budget.tolist()
        p.stats.prefill_seconds += images.seconds
        p.stats.scoring_seconds += images.scoring_seconds

    def finish(self) -> None:
        """After the prefill: record what it processed and cached."""
        s = self.state
        p = s.pass_
        p.prefill = False
        s.captured.clear()
        visual = torch.stack([layout.visual.sum(1) for layout in p.processed])  # [L, B]
        tokens = torch.stack([layout.valid.sum(1) for layout in p.processed])  # [L, B]
        vision = [0] * s.shape.vision_layers
        if p.images is not None:
            crops = int(p.images.crop_keep.shape[0])
            marks = p.images.vision_tokens or [(0, crops * (s.shape.patches + 1))]
            vision = [next(total for start, total in reversed(marks) if start <= j) for j in range(len(vision))]
        p.stats = dataclasses.replace(
            p.stats, visual_tokens_per_layer=visual.tolist(), tokens_per_layer=tokens.tolist(),
            visual_tokens_avg=visual.double().mean(0).tolist(),
            kv_entries_prefill=[layout.valid.sum(1).tolist() for layout in p.kv], vision_tokens_per_layer=vision,
            num_crops=int(p.images.crop_keep.shape[0]) if p.images is not None else 0,
            kv_entries_per_step=[], visual_entries_per_step=[])
        p.after_prefill_visual = torch.stack([layout.visual.sum(1) for layout in p.kv]).cpu()  # [L, B] cached
        if s.evicts:  # from here on each layer evicts on its own
            p.kv = [dataclasses.replace(layout) for layout in p.kv]

    # ---------------------------------------------------------- decoder layers

    def _layer(self, layer: int):
        def hook(module, args, kwargs):
            return self._before_layer(layer, args, kwargs)
        return hook

    def _before_layer(self, layer: int, args, kwargs):
        s = self.state
        p = s.pass_
        if p is None:
            return None
        hidden = args[0]
        if p.prefill and layer in s.llm_sites and p.images is not None:
            hidden = self._reduce(layer, hidden, kwargs)
        if p.prefill and layer + 1 in s.llm_sites:  # this layer's q / k will score the next site
            p.score_rope = p.kv[layer].rope or kwargs["position_embeddings"]
        layout = p.kv[layer]
        if layout is p.input_layout:
            return (hidden, *args[1:]), kwargs
        if layout.mask_forward != p.forward:
            cache = {self.mask_cache_arg: cache_in(kwargs, "a decoder layer")}
            layout.mask = create_causal_mask(config=s.lm.config, inputs_embeds=hidden, attention_mask=layout.valid,
                                             layer_idx=layer, **cache)
            layout.mask_forward = p.forward
        kwargs["attention_mask"] = layout.mask
        if p.prefill:
            kwargs["position_embeddings"] = layout.rope
            kwargs["position_ids"] = layout.positions
        return (hidden, *args[1:]), kwargs

    def _reduce(self, layer: int, hidden: Tensor, kwargs) -> Tensor:
        s = self.state
        p = s.pass_
        before = p.kv[layer - 1]
        attn = s.lm.layers[layer - 1].self_attn
        rows, length, _ = hidden.shape
        q, k, _ = s.captured.take(layer - 1)
        q = q.view(rows, length, -1, attn.head_dim).transpose(1, 2)  # [B, H, S, d]
        k = k.view(rows, length, -1, attn.head_dim).transpose(1, 2)  # [B, Hkv, S, d]
        q, k = apply_rotary_pos_emb(q, k, *p.score_rope)
        cand, cand_valid = pack(before.visual)
        step = Step(hidden=hidden, q=q, k=k, key_valid=before.valid, cand=cand, cand_valid=cand_valid,
                    keep=p.llm_keep[layer].to(hidden.device), causal=True, text=before.valid & ~before.visual,
                    layer=layer)
        index, valid, hidden, seconds = s.reduce(s.method.reduce_llm, step, before.valid & ~before.visual,
                                                 pack_right)
        p.stats.scoring_seconds += seconds
        cos, sin = before.rope or kwargs["position_embeddings"]
        after = Layout(valid=valid, visual=before.visual.gather(1, index) & valid,
                       positions=before.positions.gather(1, index),
                       rope=(gather_rows(cos, index), gather_rows(sin, index)))
        p.kv[layer:] = p.processed[layer:] = [after] * (s.shape.llm_layers - layer)
        cache = cache_in(kwargs, "a decoder layer")
        if s.method.prune_cache_before and cache is not None:
            s.note_kv_bytes()  # the earlier layers held everything until now
            for earlier in range(layer):
                gather_cache(cache, earlier, index)
                if p.received[earlier] is not None:
                    p.received[earlier] = p.received[earlier].gather(1, index)
            p.kv[:layer] = [after] * layer
        return gather_rows(hidden, index)
