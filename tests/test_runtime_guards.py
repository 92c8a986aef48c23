"""The runtime refuses to generate when transformers does not behave as it was built for (never silently wrong).

Each guard is fired by changing, on one model instance, the one thing a new transformers release could change: the
name the KV cache travels under, a decode step that arrives without it, the route the images take to the tower.
Normal generation (the rest of the suite) never fires them.
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch
import transformers

import reducers
from conftest import get_tiny
from reducers.runtime import compat
from reducers.runtime import CACHE_NAMES, IncompatibleTransformers, cache_name

GUARDED = ["none", "fastv", "visionzip", "st3"]  # observing only; LLM site; tower site; decode-time eviction


def budget(method: str) -> dict:
    return {} if method == "none" else {"ratio": 0.25}


def generate(model, inputs, **kwargs):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, **kwargs)


def rename_cache(model, rename: dict[str, str | None]):
    """Make generate hand the model its cache under another name (None: not at all), as a new release might."""
    original = model.prepare_inputs_for_generation

    def prepare(*args, **kwargs):
        inputs = original(*args, **kwargs)
        for old, new in rename.items():
            if old in inputs:
                cache = inputs.pop(old)
                if new is not None:
                    inputs[new] = cache
        return inputs
    model.prepare_inputs_for_generation = prepare
    return lambda: delattr(model, "prepare_inputs_for_generation")


@pytest.mark.parametrize("method", GUARDED)
def test_a_cache_under_a_name_the_runtime_does_not_read_is_an_error(method):
    tiny = get_tiny("llava")
    restore = rename_cache(tiny.model, {name: "kv_store" for name in CACHE_NAMES})
    try:
        with reducers.attach(tiny.model, method, **budget(method)):
            with pytest.raises(IncompatibleTransformers, match="passed as `kv_store`.*tested with"):
                generate(tiny.model, tiny.inputs())
    finally:
        restore()


@pytest.mark.parametrize("method", GUARDED)
def test_a_decode_step_without_its_cache_is_an_error_not_a_new_prefill(method):
    tiny = get_tiny("llava")
    restore = rename_cache(tiny.model, {name: None for name in CACHE_NAMES})  # the model makes a fresh cache each step
    try:
        with reducers.attach(tiny.model, method, **budget(method)):
            with pytest.raises(IncompatibleTransformers, match="forward 2 with no cache"):
                generate(tiny.model, tiny.inputs())
    finally:
        restore()


@pytest.mark.parametrize("method", GUARDED)
def test_images_that_bypass_the_runtime_are_an_error(method):
    tiny = get_tiny("llava")
    with reducers.attach(tiny.model, method, **budget(method)):
        base = tiny.model.model
        wrapped = base.get_image_features
        base.get_image_features = types.MethodType(type(base).get_image_features, base)  # as if renamed upstream
        try:
            with pytest.raises(IncompatibleTransformers, match="no image located|outside get_image_features"):
                generate(tiny.model, tiny.inputs())
        finally:
            base.get_image_features = wrapped


def test_generate_without_a_cache_is_refused():
    tiny = get_tiny("llava")
    with reducers.attach(tiny.model, "fastv", ratio=0.25):
        with pytest.raises(ValueError, match="use_cache"):
            generate(tiny.model, tiny.inputs(), use_cache=False)


@pytest.mark.parametrize("method", GUARDED)
def test_normal_generation_reads_the_cache_under_the_installed_name_without_deprecation_warnings(method):
    tiny = get_tiny("llava")
    with reducers.attach(tiny.model, method, **budget(method)) as att, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(tiny.model, tiny.inputs())
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert att.stats["decode_steps"] == 2  # every step after the prefill was seen as a decode step


def test_a_signature_without_a_known_cache_name_is_refused_naming_the_versions():
    def forward(hidden_states, kv_store=None):
        return hidden_states

    with pytest.raises(IncompatibleTransformers, match=rf"saw the parameters \['hidden_states', 'kv_store'\].*"
                                                       rf"{transformers.__version__} is installed"):
        cache_name(forward, "a decoder layer")


def test_an_untested_transformers_release_is_announced(monkeypatch):
    tiny = get_tiny("llava")
    monkeypatch.setattr(compat.transformers, "__version__", "5.99.0")  # the module object the runtime reads
    with pytest.warns(UserWarning, match="tested with transformers .* not 5.99.0"):
        reducers.attach(tiny.model, "none").detach()
