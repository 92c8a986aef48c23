"""Training-free visual-token reduction for Hugging Face LLaVA-1.5 / LLaVA-NeXT, attached by hooks.

    import reducers
    att = reducers.attach(model, "ficoco-v", visual_tokens=64)   # or ratio=0.111
    out = model.generate(**processor(images=..., text=..., padding=True, return_tensors="pt"))
    att.stats      # what the last generate did: per-row / per-layer token counts, KV entries and bytes, timings
    att.detach()   # the model behaves exactly as before (Attachment is also a context manager)

Pure torch + transformers; knows nothing of Ray.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import budget
from .budget import BudgetError, Setting
from .methods import METHODS, Method, create
from .runtime import Runtime
from .shape import ModelShape

__all__ = ["available", "attach", "validate", "schedule", "Attachment", "BudgetError"]

_SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


def available() -> list[str]:
    """Names of the reduction methods."""
    return sorted(METHODS)


def validate(config, name: str | Method, visual_tokens: int | None = None, ratio: float | None = None,
             **params) -> Method:
    """Check a method + budget against a model config without loading weights; returns the method.

    `name` is a method's name (its hyperparameters in `params`) or a Method instance of the caller's own (e.g. a
    benchmark's oracle), which is used as it is.

    Raises ValueError naming what is allowed: unknown method or parameter, not exactly one budget (except
    `none`, which takes none), a budget above the full visual count, or one the method cannot meet; the budget's
    refusals are a BudgetError, which names the budget settings so that a front end can spell them as its own.
    """
    method = _method(name, params)
    name = method.name
    shape = ModelShape.from_config(config)
    if name == "none":
        given = [Setting(k, v) for k, v in (("visual_tokens", visual_tokens), ("ratio", ratio)) if v is not None]
        if given:
            raise BudgetError("`none` keeps every visual token and takes no budget: drop ", given[0],
                              *([" and ", given[1]] if len(given) == 2 else []))
        return method
    budget.check_budget(visual_tokens, ratio)
    if method.vision_share > 0 and not shape.has_cls:
        raise ValueError(f"{name} reduces inside the vision tower and needs vision_feature_select_strategy='default'")
    full = shape.patches  # one LLaVA-1.5 image, or a LLaVA-NeXT base crop: the nominal count
    if shape.family == "llava" and visual_tokens is not None and visual_tokens > full:
        raise BudgetError(Setting("visual_tokens", visual_tokens),
                          f" is above the full count of {full} visual tokens per image")
    _check_reachable(method, shape, full, visual_tokens, ratio)
    return method


def _method(name: str | Method, params: dict) -> Method:
    if not isinstance(name, Method):
        return create(name, **params)
    if params:
        raise ValueError(f"{name.name} is given as a Method instance: set {sorted(params)} on the instance")
    return name


def _check_reachable(method: Method, shape: ModelShape, full: int, visual_tokens: int | None, ratio: float | None) -> None:
    sites = method.llm_sites(shape)
    if not sites:
        return
    first, layers = sites[0], shape.llm_layers
    candidates = torch.arange(1, full + 1)  # every budget 1..full, to find the smallest reachable one
    entering = budget.vision_target(torch.full_like(candidates, full), candidates, method.vision_share)
    reachable = candidates * layers >= first * entering
    smallest = int(candidates[reachable][0])
    asked = visual_tokens if visual_tokens is not None else round(ratio * full)
    if asked < smallest:
        smallest_ratio = math.ceil(smallest / full * 1000) / 1000  # rounded up, so that it still reaches `smallest`
        given = Setting("visual_tokens", visual_tokens) if visual_tokens is not None else Setting("ratio", ratio)
        raise BudgetError(f"{method.name} prunes first at LLM layer {first} of {layers}: with these parameters the "
                          f"smallest budget it can meet is {smallest} of {full} visual tokens (",
                          Setting("visual_tokens", smallest), " or ", Setting("ratio", smallest_ratio), "); asked ",
                          given, "" if visual_tokens is not None else f" = {asked} tokens",
                          ". Raise the budget (or, from Python, give the method an earlier pruning layer).")


def schedule(config, name: str, visual_tokens: int | None = None, ratio: float | None = None, **params) -> dict:
    """Per-layer visual-token counts of one image at the nominal full count, without running a model.

    Returns `vision_tokens_per_layer` (tokens incl. CLS entering each tower layer), `visual_tokens_per_layer`
    (visual tokens at each LLM layer in prefill) and `visual_entries_per_layer` (visual entries each layer's
    cache holds after prefill), as the runtime would produce.
    """
    method = validate(config, name, visual_tokens, ratio, **params)
    shape = ModelShape.from_config(config)
    full = torch.tensor([shape.patches])
    n = full if name == "none" else budget.resolve(full, visual_tokens, ratio)
    entering = budget.vision_target(full, n, method.vision_share)
    vision = [shape.patches + 1] * shape.vision_layers
    sites = method.vision_sites(shape) if method.vision_share > 0 else []
    for site, count in zip(sites, budget.linear_steps(full, entering, len(sites))):
        vision[site + 1:] = [int(count) + 1] * (shape.vision_layers - site - 1)
    llm = [int(entering)] * shape.llm_layers
    llm_sites = method.llm_sites(shape)
    if llm_sites:
        for site, count in zip(llm_sites, budget.llm_counts(entering, n, llm_sites, shape.llm_layers)):
            llm[site:] = [int(count)] * (shape.llm_layers - site)
    cached = list(llm)
    if method.prune_cache_before and llm_sites:  # the layers before the first site keep only what it kept
        cached[:llm_sites[0]] = [llm[llm_sites[0]]] * llm_sites[0]
    return {"vision_tokens_per_layer": vision, "visual_tokens_per_layer": llm, "visual_entries_per_layer": cached,
            "visual_tokens_avg": sum(llm) / len(llm), "visual_tokens_in": shape.patches}


class Attachment:
    """A method attached to a model. `stats` describes the last generate; `detach()` restores the model."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime

    @property
    def method(self) -> Method:
        return self._runtime.method

    @property
    def stats(self) -> dict:
        return self._runtime.stats

    def detach(self) -> None:
        self._runtime.remove()

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(model: nn.Module, name: str | Method, visual_tokens: int | None = None, ratio: float | None = None,
           **params) -> Attachment:
    """Attach reduction method `name` (a name or a Method instance, as in `validate`) at a budget to a loaded
    LLaVA model (see the module docstring)."""
    if type(model).__name__ not in _SUPPORTED:
        raise ValueError(f"unsupported model class {type(model).__name__}; supported: {', '.join(_SUPPORTED)}")
    method = validate(model.config, name, visual_tokens, ratio, **params)
    return Attachment(Runtime(model, method, visual_tokens, ratio))
