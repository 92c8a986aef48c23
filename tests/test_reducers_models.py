"""The rules every method meets, on real transformers LLaVA-1.5 / LLaVA-NeXT classes (tiny random weights).

Every method x {LLaVA-1.5, LLaVA-NeXT, LLaVA-1.5 with grouped-query attention} x {fp32, bf16}, on a batch of
4 left-padded prompts of different lengths with images of different sizes.
"""
from __future__ import annotations

import pytest
import torch

import reducers
from conftest import get_tiny
from reducers.runtime import SDPA_WITH_LSE, cache_of_output
from reducers.shape import ModelShape

METHODS = reducers.available()
REDUCED = [m for m in METHODS if m != "none"]
FAMILIES = ["llava", "next", "llava-gqa"]
DTYPES = [torch.float32, torch.bfloat16]
NEW_TOKENS = 4


def budget_for(tiny) -> dict:
    """64 of 576 on LLaVA-1.5; the same ratio per image on NeXT (its images have different full counts)."""
    return {"visual_tokens": 64} if tiny.spec.family == "llava" else {"ratio": 64 / 576}


def generate(model, inputs, **kwargs):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **kwargs)


# bf16 rounding differs between a batch and a single row in the unpatched model too (measured here: first-step
# logits differ by ~4e-3 at a logit scale of 0.5, and `none` itself flips near-tied greedy tokens). A reducer
# scoring those states may then keep a different token where two scores nearly tie at the selection boundary
# (TokenCarve's exact information score: one token of 64, logits moved by 0.0215), hence the wider bound.
BF16_ATOL = 3e-2


def assert_same_generation(single, together, row: int, atol: float) -> None:
    """Row `row` of a batched generate equals the row generated alone: logits within `atol` and the same ids,
    step by step, until a step whose top-2 logits are within 2*atol (a near-tie that arithmetic noise may
    flip legitimately); later steps then follow different prefixes and are not compared."""
    prompt_single = single.sequences.shape[1] - len(single.logits)
    prompt_batch = together.sequences.shape[1] - len(together.logits)
    for step, (a, b) in enumerate(zip(single.logits, together.logits)):
        torch.testing.assert_close(a[0].float(), b[row].float(), atol=atol, rtol=0, msg=f"row {row} step {step}")
        top2 = b[row].float().topk(2).values
        if top2[0] - top2[1] < 2 * atol:
            return
        assert single.sequences[0, prompt_single + step] == together.sequences[row, prompt_batch + step], f"row {row} step {step}"


_REFERENCE: dict = {}


def reference(tiny):
    """The never-attached model's output on the batch (computed once per model)."""
    key = (tiny.name, tiny.dtype)
    if key not in _REFERENCE:
        _REFERENCE[key] = generate(tiny.model, tiny.inputs())
    return _REFERENCE[key]


def no_hooks_left(model) -> bool:
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    capture_only = all(getattr(h, "__name__", "") == "output_capturing_hook"
                       for m in hooks for h in m._forward_hooks.values()) and not any(m._forward_pre_hooks for m in hooks)
    return capture_only and "get_image_features" not in vars(model.model) and "generate" not in vars(model)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_reproduces_the_unpatched_model(method, family, dtype):
    tiny = get_tiny(family, dtype)
    ref = reference(tiny)
    full = {} if method == "none" else {"ratio": 1.0}
    inputs = tiny.inputs()
    with reducers.attach(tiny.model, method, **full) as att:
        out = generate(tiny.model, inputs)
        assert tiny.model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(out.sequences, ref.sequences)
    for step_logits, ref_logits in zip(out.logits, ref.logits):
        assert torch.equal(step_logits, ref_logits)
    # the runtime saw one prefill of every placeholder, then every decode step as one (not as new prefills)
    placeholders = (inputs["input_ids"] == tiny.model.config.image_token_id).sum(1).tolist()
    assert att.stats["visual_tokens_in"] == att.stats["visual_tokens_budget"] == placeholders
    assert att.stats["prompt_tokens"] == inputs["attention_mask"].sum(1).tolist()
    assert att.stats["decode_steps"] == NEW_TOKENS - 1
    assert att.stats["visual_tokens_avg"] == [float(n) for n in placeholders]


class LayerCounter:
    """Our own forward pre-hooks on the decoder layers: real tokens each layer processes in prefill, per row."""

    def __init__(self, model):
        self.counts: list[list[int]] = []
        self.lengths: list[int] = []
        self.handles = [layer.register_forward_pre_hook(self.record, with_kwargs=True)
                        for layer in model.model.language_model.layers]
        self.prefill = True

    def record(self, module, args, kwargs):
        hidden, mask = args[0], kwargs["attention_mask"]
        if hidden.shape[1] == 1:  # decode steps
            return
        if mask is None:
            real = [hidden.shape[1]] * hidden.shape[0]
        else:  # the last query row of a left-padded causal mask sees exactly the row's real tokens
            real = mask[:, 0, -1, :].sum(-1).tolist() if mask.dtype == torch.bool else (mask[:, 0, -1, :] == 0).sum(-1).tolist()
        self.counts.append(real)
        self.lengths.append(hidden.shape[1])

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", REDUCED)
def test_reduced_budget_rows_are_independent_and_meet_the_budget(method, family, dtype):
    tiny = get_tiny(family, dtype)
    batch = tiny.inputs()
    image_token = tiny.model.config.image_token_id
    text_tokens = (batch["attention_mask"].bool() & (batch["input_ids"] != image_token)).sum(1)  # [B]
    with reducers.attach(tiny.model, method, **budget_for(tiny)) as att:
        counter = LayerCounter(tiny.model)  # registered after the runtime's hooks: sees what each layer really gets
        try:
            together = generate(tiny.model, batch)
            stats = dict(att.stats)
            counts = torch.tensor(counter.counts)  # [L, B]
            alone = [generate(tiny.model, tiny.inputs([row])) for row in range(4)]
        finally:
            counter.remove()

    # 2. each row alone equals the same row inside the padded batch
    for row, single in enumerate(alone):
        assert_same_generation(single, together, row, atol=1e-4 if dtype == torch.float32 else BF16_ATOL)

    # 3. the layer-averaged visual-token count, measured by our own hooks, meets the budget
    layers = tiny.model.config.text_config.num_hidden_layers
    visual_per_layer = counts - text_tokens  # [L, B]
    measured = visual_per_layer.double().mean(0)
    budget = torch.tensor(stats["visual_tokens_budget"], dtype=torch.float64)
    granularity = torch.tensor(stats["visual_tokens_in"], dtype=torch.float64) / layers
    assert ((measured - budget).abs() <= granularity).all(), (measured, budget)
    assert budget.lt(torch.tensor(stats["visual_tokens_in"])).all()
    assert measured.tolist() == pytest.approx(stats["visual_tokens_avg"])
    assert visual_per_layer.tolist() == stats["visual_tokens_per_layer"]

    # 4. SDPA stays the attention of both sub-models
    assert tiny.model.config.text_config._attn_implementation == "sdpa"
    assert tiny.model.config.vision_config._attn_implementation in ("sdpa", SDPA_WITH_LSE)

    assert stats["kv_entries_prefill"] == counts.tolist() or att.method.prune_cache_before


def cache_test_params(method: str) -> dict:
    """st3's decode-time eviction changes the cache after prefill by design; its own tests
    (test_st3_tokencarve.py) check it against an explicit mask. Here: its progressive pruning alone."""
    return {"vta": False} if method == "st3" else {}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", REDUCED)
def test_kv_cache_after_prefill_holds_the_tokens_each_layer_kept(method, family):
    tiny = get_tiny(family)
    with reducers.attach(tiny.model, method, **budget_for(tiny), **cache_test_params(method)) as att:
        counter = LayerCounter(tiny.model)
        try:
            with torch.inference_mode():
                cache = cache_of_output(tiny.model(**tiny.inputs(), use_cache=True))
        finally:
            counter.remove()
        stats = dict(att.stats)
        sites = att.method.llm_sites(ModelShape.from_config(tiny.model.config))
    expected = list(counter.lengths)
    if att.method.prune_cache_before:  # the layers before the first site keep only what that site kept
        expected[:sites[0]] = [counter.lengths[sites[0]]] * sites[0]
    assert [layer.keys.shape[2] for layer in cache.layers] == expected
    assert [max(row) for row in stats["kv_entries_prefill"]] == expected or family == "next"  # NeXT rows differ
    rows, kv_heads, _, head_dim = cache.layers[0].keys.shape
    held_bytes = sum(expected) * rows * 2 * kv_heads * head_dim * cache.layers[0].keys.element_size()
    assert stats["kv_bytes_peak"] >= held_bytes  # K and V, padding included (it is allocated)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", REDUCED)
def test_detach_restores_the_model(method, family):
    tiny = get_tiny(family)
    ref = reference(tiny)
    att = reducers.attach(tiny.model, method, **budget_for(tiny))
    try:
        reduced = generate(tiny.model, tiny.inputs())
    finally:
        att.detach()
    assert no_hooks_left(tiny.model)
    after = generate(tiny.model, tiny.inputs())
    assert torch.equal(after.sequences, ref.sequences)
    for a, b in zip(after.logits, ref.logits):
        assert torch.equal(a, b)
    # the reduced run really differed, so the comparison above could fail
    assert not all(torch.equal(a, b) for a, b in zip(reduced.logits, ref.logits))


class Replay:
    """Records a method's reductions on the cached run, then hands the same ones back (test-only wrapper)."""

    def __init__(self, method):
        self.method, self.records, self.replaying = method, {}, False
        for site in ("reduce_vision", "reduce_llm"):
            setattr(method, site, self.wrap(site, getattr(method, site)))

    def wrap(self, site, original):
        def reduce(step):
            key = (site, step.layer, self.calls.setdefault((site, step.layer), 0))
            self.calls[(site, step.layer)] += 1
            if not self.replaying:
                self.records[key] = original(step)
            return self.records[key]
        return reduce

    def start(self, replaying: bool):
        self.replaying, self.calls = replaying, {}


def hide_dropped_from_new_tokens(tiny, method, replay, batch) -> list:
    """For methods that also cut the caches before their first LLM site K: in the no-cache reference, the
    generated tokens must not see, at layers < K, the visual tokens K dropped (the prompt still does).
    Adds that to each such layer's 4-D mask with test-side pre-hooks; returns their handles."""
    first = method.llm_sites(ModelShape.from_config(tiny.model.config))[0]
    visual = batch["input_ids"] == tiny.model.config.image_token_id  # no vision-side reduction before an LLM site
    cand = [row.nonzero().view(-1) for row in visual]
    reduction = replay.records[("reduce_llm", first, 0)]
    prompt = batch["input_ids"].shape[1]

    def restrict(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()  # [B, 1, S, S] bool, materialised: the batch is left-padded
        for row in range(mask.shape[0]):
            kept = cand[row][reduction.kept[row][reduction.kept_valid[row]]]
            dropped = cand[row][~torch.isin(cand[row], kept)]
            mask[row, :, prompt:, dropped] = False
        kwargs["attention_mask"] = mask
        return args, kwargs
    return [layer.register_forward_pre_hook(restrict, with_kwargs=True)
            for layer in tiny.model.model.language_model.layers[:first]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", REDUCED)
def test_cached_generation_equals_a_no_cache_forward_over_the_kept_tokens(method, family):
    tiny = get_tiny(family)
    batch = tiny.inputs()
    with reducers.attach(tiny.model, method, **budget_for(tiny), **cache_test_params(method)) as att:
        replay = Replay(att.method)
        replay.start(replaying=False)
        out = generate(tiny.model, batch)
        replay.start(replaying=True)  # same kept tokens; scores would differ with the generated text appended
        full_ids = out.sequences
        mask = torch.cat([batch["attention_mask"], torch.ones(4, NEW_TOKENS, dtype=torch.long)], 1)
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        hidden_from_new_tokens = hide_dropped_from_new_tokens(tiny, att.method, replay, batch) if att.method.prune_cache_before else []
        try:
            with torch.inference_mode():
                logits = tiny.model(input_ids=full_ids, attention_mask=mask, use_cache=False, **inputs).logits
        finally:
            for handle in hidden_from_new_tokens:
                handle.remove()
    # the reduced sequence keeps every text token, right-aligned: its last NEW_TOKENS + 1 positions are the last
    # prompt token and the generated ones, whose logits predict generated tokens 1..NEW_TOKENS
    assert logits.shape[1] < full_ids.shape[1]
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(logits[:, step - NEW_TOKENS - 1], step_logits, atol=1e-4, rtol=1e-4)
