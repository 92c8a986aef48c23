"""The transformers versions the runtime is built for, and the checks that it sees what it expects.

The runtime reads transformers' forward arguments, so a release that renames one would make it silently wrong.
It reads what changed between the tested releases under every name they use, checks the rest when it attaches, and
raises `IncompatibleTransformers` where a forward does not look as expected, rather than generating.
"""
from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import transformers
from torch import nn
from transformers.cache_utils import Cache

TESTED_TRANSFORMERS = ("5.23.0", "5.24.0", "5.25.0")
# generate hands the model its KV cache as `cache=` from 5.24 on (`past_key_values=`, deprecated until 5.40, before)
CACHE_NAMES = ("cache", "past_key_values")


class IncompatibleTransformers(RuntimeError):
    """transformers (or the model) behaves differently from what the runtime was built for: nothing is generated."""

    def __init__(self, expected: str, seen: str):
        super().__init__(f"trimlens runtime expected {expected}, but saw {seen}. transformers "
                         f"{transformers.__version__} is installed; trimlens is tested with "
                         f"{' and '.join(TESTED_TRANSFORMERS)} (the versions in requirements.lock)")


def cache_name(fn: Callable, what: str) -> str:
    """The name under which `fn` takes the KV cache."""
    params = inspect.signature(fn).parameters  # follows the deprecation wrappers to the real signature
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise IncompatibleTransformers(f"{what} to take the KV cache as one of {CACHE_NAMES}",
                                   f"the parameters {list(params)}")


def cache_in(kwargs: dict, where: str) -> Cache | None:
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


def check_model_calls(base: nn.Module) -> None:
    """The forward signatures the hooks rely on, checked once when a method attaches."""
    lm, tower = base.language_model, base.vision_tower
    needs = [(base.forward, "pixel_values"), (base.get_image_features, "pixel_values"),
             (lm.layers[0].forward, "position_embeddings"), (lm.layers[0].self_attn.forward, "position_embeddings")]
    for fn, name in needs:
        if name not in inspect.signature(fn).parameters:
            raise IncompatibleTransformers(f"{fn.__qualname__} to take `{name}`",
                                           f"the parameters {list(inspect.signature(fn).parameters)}")
    for fn in (lm.forward, lm.layers[0].forward, lm.layers[0].self_attn.forward):
        cache_name(fn, fn.__qualname__)
    positional = list(inspect.signature(tower.encoder.layers[0].forward).parameters)[:2]
    if positional != ["hidden_states", "attention_mask"]:  # the tower's key mask is passed positionally
        raise IncompatibleTransformers("the vision encoder layers to take (hidden_states, attention_mask, ...)",
                                       f"{positional}")
    if transformers.__version__ not in TESTED_TRANSFORMERS:
        warnings.warn(f"trimlens is tested with transformers {' and '.join(TESTED_TRANSFORMERS)}, not "
                      f"{transformers.__version__}: the runtime checks what it reads and raises if it changed",
                      stacklevel=3)
