"""The KV cache's part while decoding: each step's layouts grow by the new token, and a method that evicts chooses,
layer by layer, which visual entries stay (`decode_keep` / `reduce_decode`), from the attention the decode queries
have paid them."""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..rows import pack
from ..scores import query_attention
from ..step import Step
from .cache import compact_cache
from .compat import cache_in, cache_of_output
from .hooks import Hooks
from .state import Layout, State


class DecodeHooks:
    def __init__(self, state: State):
        self.state = state

    def install(self, hooks: Hooks) -> None:
        if not self.state.evicts:
            return
        for l, layer in enumerate(self.state.lm.layers):
            hooks.after(layer.self_attn.q_proj, self._capture_newest_query)
            hooks.after(layer.self_attn, self._attention_received(l), with_kwargs=True)

    def enter(self, kwargs: dict) -> None:
        """Extend every layout by the new token; the LLM gets layer 0's mask and the token's position."""
        s = self.state
        p = s.pass_
        p.step += 1
        rows = p.next_position.shape[0]
        new_position = (p.next_position + p.step - 1)[:, None]  # [B, 1]
        for layout in {id(l): l for l in p.kv}.values():
            layout.valid = torch.cat([layout.valid, layout.valid.new_ones(rows, 1)], 1)
            layout.visual = torch.cat([layout.visual, layout.visual.new_zeros(rows, 1)], 1)
            layout.positions = torch.cat([layout.positions, new_position], 1)
            layout.rope = None
        if s.evicts and p.evicting:
            p.received = [torch.cat([r, r.new_zeros(rows, 1)], 1) for r in p.received]
        p.input_layout = p.kv[0]
        kwargs["attention_mask"] = p.kv[0].valid
        kwargs["position_ids"] = new_position

    def after_forward(self, output) -> None:
        """After each forward of the LLM (the prefill too): note the cache's size, then let the method evict."""
        s = self.state
        p = s.pass_
        s.note_kv_bytes()
        cache = cache_of_output(output)
        if s.evicts and cache is not None:  # a forward without a cache has nothing to evict
            allowed = s.method.decode_keep(p.step + 1, p.after_prefill_visual)
            p.evicting = allowed is not None
            if p.evicting:
                for layer in range(s.shape.llm_layers):
                    self._evict(layer, allowed[layer], cache)
        p.stats.kv_entries_end = [layout.valid.sum(1).tolist() for layout in p.kv]
        p.stats.kv_entries_per_step.append(p.stats.kv_entries_end)
        p.stats.visual_entries_per_step.append([layout.visual.sum(1).tolist() for layout in p.kv])

    def _capture_newest_query(self, module, args, output):
        if self.state.pass_ is not None and self.state.pass_.evicting:
            self.state.newest_query = output[:, -1:]  # [B, 1, H*d]: the newest query only

    def _attention_received(self, layer: int):
        """After layer `layer`'s attention: add what its newest query paid each cached entry (for eviction)."""
        def hook(module, args, kwargs, output):
            p = self.state.pass_
            cache = cache_in(kwargs, "a decoder layer's attention")
            if p is None or cache is None or not p.evicting:
                return None
            rows = p.kv[layer].valid.shape[0]
            q = self.state.newest_query.view(rows, 1, -1, module.head_dim).transpose(1, 2)  # [B, H, 1, d]
            self.state.newest_query = None
            cos, sin = kwargs["position_embeddings"]
            q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
            paid = query_attention(q, cache.layers[layer].keys, p.kv[layer].valid[:, None, :])[:, 0]  # [B, S_l]
            p.received[layer] = paid if p.prefill else p.received[layer] + paid
            return None
        return hook

    def _evict(self, layer: int, allowed: Tensor, cache) -> None:
        """Let the method choose which visual entries layer `layer` keeps when it holds more than `allowed` [B]."""
        s = self.state
        p, layout = s.pass_, s.pass_.kv[layer]
        held = layout.visual.sum(1)
        if bool((held <= allowed).all()):
            return
        cand, cand_valid = pack(layout.visual)
        step = Step(hidden=None, q=None, k=None, key_valid=layout.valid, cand=cand, cand_valid=cand_valid,
                    keep=torch.minimum(allowed.to(held.device), held), causal=True,
                    text=layout.valid & ~layout.visual, layer=layer, received=p.received[layer].gather(1, cand))

        def compact(keep):  # [B, S] -> the cache's new columns [B, W] and their validity
            index = compact_cache(cache, layer, keep)
            return index, keep.gather(1, index)

        index, valid, _, seconds = s.reduce(s.method.reduce_decode, step, layout.valid & ~layout.visual, compact)
        p.stats.scoring_seconds += seconds
        p.kv[layer] = Layout(valid=valid, visual=layout.visual.gather(1, index) & valid,
                             positions=layout.positions.gather(1, index))
        p.received[layer] = p.received[layer].gather(1, index)
