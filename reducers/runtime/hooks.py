"""Installs and removes what the runtime adds to a model: torch hooks and per-instance method wrappers."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn


class Hooks:
    """Every hook, wrapper and handle added while a method is attached; `remove()` takes all of them away."""

    def __init__(self):
        self._handles: list = []  # anything with .remove(): torch's hook handles, TowerKeepsLse
        self._wrapped: list[tuple[object, str]] = []

    def add(self, handle) -> None:
        self._handles.append(handle)

    def before(self, module: nn.Module, hook: Callable, with_kwargs: bool = False) -> None:
        self.add(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def after(self, module: nn.Module, hook: Callable, with_kwargs: bool = False, prepend: bool = False) -> None:
        self.add(module.register_forward_hook(hook, with_kwargs=with_kwargs, prepend=prepend))

    def wrap(self, owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
        """Replace the bound method `owner.name` on this instance only by `make(original)`."""
        setattr(owner, name, make(getattr(owner, name)))
        self._wrapped.append((owner, name))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for owner, name in self._wrapped:
            delattr(owner, name)  # back to the class's method
        self._handles.clear()
        self._wrapped.clear()
