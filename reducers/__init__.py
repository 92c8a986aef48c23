"""Training-free visual-token reduction for Hugging Face LLaVA-1.5 / LLaVA-NeXT, attached by hooks.

    import reducers
    att = reducers.attach(model, "ficoco-v", visual_tokens=64)   # or ratio=0.111
    out = model.generate(**processor(images=..., text=..., padding=True, return_tensors="pt"))
    att.last       # what the last generate did (a reducers.Stats): per-row / per-layer token counts, KV entries
                   # and bytes, timings; att.stats is the same as a dict
    att.detach()   # the model behaves exactly as before (Attachment is also a context manager)

Pure torch + transformers; knows nothing of Ray.
"""
from __future__ import annotations

import torch
from torch import nn

from . import budget
from .budget import BudgetError, Setting
from .methods import METHODS, Method, create
from .plan import Plan, plan, tower_counts
from .runtime import Runtime
from .shape import ModelShape
from .stats import Stats

__all__ = ["available", "attach", "validate", "schedule", "takes_budget", "Attachment", "BudgetError", "Stats"]

_SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


def available() -> list[str]:
    """Names of the reduction methods."""
    return sorted(METHODS)


def takes_budget(name: str) -> bool:
    """Whether method `name` takes a budget (`none` keeps every visual token and takes none)."""
    return create(name).takes_budget


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
    if not method.takes_budget:
        given = [Setting(k, v) for k, v in (("visual_tokens", visual_tokens), ("ratio", ratio)) if v is not None]
        if given:
            raise BudgetError(f"`{name}` keeps every visual token and takes no budget: drop ", given[0],
                              *([" and ", given[1]] if len(given) == 2 else []))
        return method
    budget.check_budget(visual_tokens, ratio)
    if method.vision_share > 0 and not shape.has_cls:
        raise ValueError(f"{name} reduces inside the vision tower and needs vision_feature_select_strategy='default'")
    if shape.family == "llava" and visual_tokens is not None and visual_tokens > shape.patches:
        raise BudgetError(Setting("visual_tokens", visual_tokens),
                          f" is above the full count of {shape.patches} visual tokens per image")
    if visual_tokens is None or visual_tokens <= shape.patches:  # (above: a LLaVA-NeXT image, which holds more)
        _nominal_plan(shape, method, visual_tokens, ratio)  # refuses a budget the method cannot reach
    return method


def _method(name: str | Method, params: dict) -> Method:
    if not isinstance(name, Method):
        return create(name, **params)
    if params:
        raise ValueError(f"{name.name} is given as a Method instance: set {sorted(params)} on the instance")
    return name


def _nominal_plan(shape: ModelShape, method: Method, visual_tokens: int | None, ratio: float | None) -> Plan:
    """The plan of one nominal image: a LLaVA-1.5 image, or a LLaVA-NeXT base crop."""
    return plan(shape, method, torch.tensor([shape.patches]), visual_tokens, ratio)


def schedule(config, name: str, visual_tokens: int | None = None, ratio: float | None = None, **params) -> dict:
    """Per-layer visual-token counts of one image at the nominal full count, without running a model.

    Returns `vision_tokens_per_layer` (tokens incl. CLS entering each tower layer), `visual_tokens_per_layer`
    (visual tokens at each LLM layer in prefill) and `visual_entries_per_layer` (visual entries each layer's
    cache holds after prefill), as the runtime would produce.
    """
    method = validate(config, name, visual_tokens, ratio, **params)
    shape = ModelShape.from_config(config)
    plan_ = _nominal_plan(shape, method, visual_tokens, ratio)
    llm = [int(n) for n in plan_.visual_per_layer(shape.llm_layers)[:, 0]]
    cached = list(llm)
    if method.prune_cache_before and plan_.llm_sites:  # the layers before the first site keep only what it kept
        first = plan_.llm_sites[0]
        cached[:first] = [llm[first]] * first
    return {"vision_tokens_per_layer": tower_counts(shape, plan_), "visual_tokens_per_layer": llm,
            "visual_entries_per_layer": cached, "visual_tokens_avg": sum(llm) / len(llm),
            "visual_tokens_in": shape.patches}


class Attachment:
    """A method attached to a model. `stats` describes the last generate; `detach()` restores the model."""

    def __init__(self, runtime: Runtime):
        self._runtime = runtime

    @property
    def method(self) -> Method:
        return self._runtime.state.method

    @property
    def last(self) -> Stats | None:
        """What the last generate did, typed (None before the first)."""
        return self._runtime.state.last

    @property
    def stats(self) -> dict:
        """`last` as a plain dict (empty before the first generate); its keys are listed in docs/reducers.md."""
        return self.last.as_dict() if self.last is not None else {}

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
