"""The plumbing every method shares; the only package that touches transformers internals.

Hooks (no forked modeling file, SDPA kept) on an unmodified LlavaForConditionalGeneration /
LlavaNextForConditionalGeneration, in three parts around one shared state (state.py: the pass, its cache layouts,
its images) and one module that installs and removes them (hooks.py):

- tower.py: the vision tower, where the images' placeholders come from and the vision sites shorten the crops;
- prefill.py: the LLM input without the dropped placeholders, the LLM sites, each layer's mask from its layout;
- decode.py: the KV cache while decoding, grown by each new token and evicted from per layer;
- cache.py (surgery on transformers' cache), sdpa.py (the tower's SDPA that keeps the log-sum-exp), compat.py
  (the tested transformers versions and the checks of what the hooks read).

This module starts and ends each forward and each generate call, and hands each LLM forward to prefill or decode.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..methods import Method
from ..stats import Stats
from .cache import compact_cache
from .compat import (CACHE_NAMES, TESTED_TRANSFORMERS, IncompatibleTransformers, cache_in, cache_name,
                     cache_of_output, check_model_calls)
from .decode import DecodeHooks
from .hooks import Hooks
from .prefill import PrefillHooks
from .sdpa import SDPA_WITH_LSE
from .state import Pass, State
from .tower import TowerHooks

__all__ = ["Runtime", "IncompatibleTransformers", "TESTED_TRANSFORMERS", "CACHE_NAMES", "SDPA_WITH_LSE",
           "cache_name", "cache_of_output", "compact_cache"]


class Runtime:
    """Attaches one method at one budget to one model; `remove()` takes every hook away again."""

    def __init__(self, model: nn.Module, method: Method, visual_tokens: int | None, ratio: float | None):
        self.state = State(model, method, visual_tokens, ratio)
        # `none` only observes: no hook of its changes an argument, so it cannot change the model's outputs
        self.observes_only = not (self.state.vision_sites or self.state.llm_sites or self.state.evicts)
        check_model_calls(self.state.base)
        state = self.state
        self.tower, self.prefill, self.decode = TowerHooks(state), PrefillHooks(state), DecodeHooks(state)
        self.hooks = Hooks()
        self._install()

    def _install(self) -> None:
        s, hooks = self.state, self.hooks
        hooks.wrap(s.model, "generate", self._marking_generate)
        hooks.before(s.base, self._begin_forward, with_kwargs=True)
        hooks.after(s.base, self._end_forward)
        hooks.before(s.lm, self._enter_llm, with_kwargs=True)
        hooks.after(s.lm, self._leave_llm)
        self.tower.install(hooks)
        self.prefill.install(hooks)
        self.decode.install(hooks)

    def remove(self) -> None:
        self.hooks.remove()
        self.state.pass_ = self.state.images = self.state.tower = None

    def _marking_generate(self, original):
        """Mark the span of a generate call (per instance): its first forward is the prefill, every later one must
        arrive as a decode step with the cache the prefill filled."""
        @functools.wraps(original)
        def generate(*args, **kwargs):
            if kwargs.get("use_cache") is False:
                raise ValueError("trimlens reducers need generate's KV cache: leave use_cache at its default (True)")
            self.state.generating, self.state.pass_ = True, None
            try:
                return original(*args, **kwargs)
            finally:
                self.state.generating = False
        return generate

    # ------------------------------------------------------- whole forward

    def _begin_forward(self, module, args, kwargs):
        s = self.state
        cache = cache_in(kwargs, "the model's forward")
        if cache is None or cache.get_seq_length() == 0:
            if s.generating and s.pass_ is not None:
                raise IncompatibleTransformers(
                    "each forward of generate after the prefill to be a decode step carrying the KV cache",
                    f"forward {s.pass_.forward + 1} with {'no' if cache is None else 'an empty'} cache "
                    f"(its arguments: {sorted(k for k, v in kwargs.items() if v is not None)})")
            input_ids = kwargs.get("input_ids", args[0] if args else None)  # LLaVA-NeXT passes it positionally
            if input_ids is None:
                raise ValueError("trimlens reducers need input_ids (with the <image> placeholders), not inputs_embeds")
            s.pass_ = self._new_pass(input_ids, kwargs.get("attention_mask"))
            s.pass_.pixels = kwargs.get("pixel_values") is not None
        elif s.pass_ is None or s.pass_.prefill:
            raise RuntimeError("a decode step arrived without its prefill; attach before calling generate")
        elif cache.get_seq_length() != s.pass_.kv[0].valid.shape[1]:
            raise IncompatibleTransformers(f"the cache of LLM layer 0 to hold the {s.pass_.kv[0].valid.shape[1]} "
                                           "entries the runtime laid out", f"{cache.get_seq_length()} entries")
        s.pass_.forward += 1
        s.pass_.timer = s.now()

    def _end_forward(self, module, args, output):
        p = self.state.pass_
        elapsed = self.state.now() - p.timer
        if p.forward == 1:
            p.stats.prefill_seconds += elapsed
        else:
            p.stats.decode_seconds += elapsed
        self.state.last = p.stats

    def _new_pass(self, input_ids: Tensor, attention_mask: Tensor | None) -> Pass:
        image_mask = input_ids == self.state.model.config.image_token_id  # [B, S]
        prompt = attention_mask.sum(1) if attention_mask is not None else torch.full_like(input_ids[:, 0], input_ids.shape[1])
        full_row = image_mask.sum(1)
        stats = Stats(method=self.state.method.name, rows=image_mask.shape[0], prompt_tokens=prompt.tolist(),
                      visual_tokens_in=full_row.tolist(), visual_tokens_budget=full_row.tolist(),
                      dtype_bytes=self.state.lm.dtype.itemsize)
        return Pass(image_mask=image_mask, stats=stats)

    # ------------------------------------------------------------ LLM forward

    def _enter_llm(self, module, args, kwargs):
        seen = dict(kwargs) if self.observes_only else kwargs  # `none` lays out a copy and hands nothing back
        if self.state.pass_.prefill:
            self.prefill.enter(seen)
        else:
            self.decode.enter(seen)
        return None if self.observes_only else (args, kwargs)

    def _leave_llm(self, module, args, output):
        p = self.state.pass_
        if p.prefill:
            self.prefill.finish()
        else:
            p.stats.decode_steps = p.step
        self.decode.after_forward(output)
        return None
