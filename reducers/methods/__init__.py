"""Reduction methods: one small file each, registered by name.

A method says where it acts (tower layers after which `reduce_vision` runs, LLM layers before which
`reduce_llm` runs, and which share of the reduction the tower does) and composes scores + stages there.
It never touches masks, positions or caches: the runtime does, the same way for every method.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import Tensor

from ..shape import ModelShape
from ..step import Reduction, Step

METHODS: dict[str, type["Method"]] = {}


class Method:
    """Base of every method. Subclasses are dataclasses whose fields are the method's hyperparameters."""
    name: ClassVar[str]
    takes_budget: ClassVar[bool] = True  # False: the method keeps every visual token and refuses a budget
    vision_share: float = 0.0  # share of the reduction (full -> budget) done inside the vision tower
    prune_cache_before: bool = False  # also cut the caches of the layers before an LLM site to its kept tokens

    def vision_sites(self, shape: ModelShape) -> list[int]:
        """Tower layers after which `reduce_vision` runs (ascending)."""
        return []

    def llm_sites(self, shape: ModelShape) -> list[int]:
        """LLM layers before which `reduce_llm` runs (ascending, >= 1: scores come from the layer before)."""
        return []

    def reduce_vision(self, step: Step) -> Reduction:
        raise TypeError(f"{self.name} declares no vision sites")

    def reduce_llm(self, step: Step) -> Reduction:
        raise TypeError(f"{self.name} declares no LLM sites")

    def decode_keep(self, step: int, after_prefill: Tensor) -> Tensor | None:
        """Visual KV entries each layer may hold from decode step `step` (1-based) on, given the counts held
        after prefill [L, B]; None: no eviction. Where a layer holds more, `reduce_decode` chooses."""
        return None

    def reduce_decode(self, step: Step) -> Reduction:
        raise TypeError(f"{self.name} evicts nothing during decoding")


def register(name: str):
    """Class decorator: make a Method available under `name` (a dataclass of its hyperparameters)."""
    def add(cls):
        cls = dataclasses.dataclass(cls)
        cls.name = name
        METHODS[name] = cls
        return cls
    return add


def create(name: str, **params) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown reduction method {name!r}; available: {', '.join(sorted(METHODS))}")
    return with_params(METHODS[name], **params)


def with_params(cls: type[Method], **params) -> Method:
    """An instance of the method dataclass `cls` with hyperparameters `params`, unknown ones refused by name."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - fields
    if unknown:
        raise ValueError(f"{cls.name} has no parameter(s) {sorted(unknown)}; its parameters: {sorted(fields) or 'none'}")
    return cls(**params)


# importing registers them
from . import fastv, ficoco_l, ficoco_v, ficoco_vl, none, random, st3, tokencarve, visionzip  # noqa: E402,F401
