"""What is specific to ST^3 and TokenCarve (the six rules of every method run for them in test_reducers_models.py).

ST^3: the decode-time KV eviction (VTA) follows its annealing curve exactly, frees cache entries for real (each
layer's cache compacted in place, moving only the kept entries of the columns it loses), and generation with
eviction equals a no-cache forward in which each generated token sees only the visual entries that survived at its
step (an explicit 4-D mask per layer). TokenCarve: its information score equals the SVD
definition, and the caches of the layers before its pruning layer are cut to the kept tokens.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import reducers
from conftest import get_tiny, small_model_and_batch
from reducers.runtime import cache_of_output, compact_cache
from reducers.shape import ModelShape
from reducers.spectral import information_score
from reference.test_models import LlavaSpec
from test_reducers_models import Replay

NEW_TOKENS = 6
# A short anneal so that a few generated tokens walk the whole curve down to its floor and along it.
VTA = dict(anneal_steps=4, floor=0.25)


def generate(model, inputs):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


def annealed(after_prefill: torch.Tensor, step: int) -> torch.Tensor:
    """The documented curve, written out independently: round(n_l(0) * max(floor, 1 - (1 - floor) * t / T))."""
    share = max(VTA["floor"], 1 - (1 - VTA["floor"]) * step / VTA["anneal_steps"])
    return torch.round(after_prefill.double() * share).long()


class VisibleVisual:
    """Per decode step and layer, the RoPE positions of the visual entries each row's cache still holds, read from the
    runtime's per-layer cache layout just before the layer runs (after that step's eviction)."""

    def __init__(self, attachment, model):
        self.runtime, self.steps = attachment._runtime, []
        self.handles = [layer.register_forward_pre_hook(self.hook(l), with_kwargs=True)
                        for l, layer in enumerate(model.model.language_model.layers)]

    def hook(self, layer: int):
        def record(module, args, kwargs):
            if args[0].shape[1] != 1:  # prefill
                return
            if layer == 0:
                self.steps.append({})
            held = self.runtime.state.pass_.kv[layer]
            self.steps[-1][layer] = [set(held.positions[b][held.visual[b]].tolist()) for b in range(held.visual.shape[0])]
        return record

    def remove(self):
        for handle in self.handles:
            handle.remove()


class EvictionMask:
    """Forward pre-hooks for a no-cache forward: the query of the token fed at decode step t sees, at each layer, only
    the visual entries that layer still held at step t (as recorded); everything else keeps the runtime's own mask."""

    def __init__(self, model, visible: list[dict[int, list[set]]], visual_positions: list[set]):
        self.visible, self.visual_positions = visible, visual_positions
        self.handles = [layer.register_forward_pre_hook(self.hook(l), with_kwargs=True)
                        for l, layer in enumerate(model.model.language_model.layers)]

    def hook(self, layer: int):
        def restrict(module, args, kwargs):
            mask, positions = kwargs["attention_mask"], kwargs["position_ids"]  # [B, 1, S, S], [B, S]
            allowed = mask.clone() if mask.dtype == torch.bool else mask == 0
            length = allowed.shape[-1]
            for b in range(allowed.shape[0]):
                visual = torch.isin(positions[b], torch.tensor(sorted(self.visual_positions[b])))
                for step, held in enumerate(self.visible, start=1):
                    survives = torch.isin(positions[b], torch.tensor(sorted(held[layer][b]), dtype=torch.long))
                    query = length - NEW_TOKENS - 1 + step  # the column of the token fed at decode step `step`
                    allowed[b, 0, query] &= ~visual | survives
            kwargs["attention_mask"] = allowed
            return args, kwargs
        return restrict

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def st3_run():
    """One VTA generation on LLaVA-1.5 (fp32, batch 4, left padding) with what the tests below need from it."""
    tiny = get_tiny("llava")
    batch = tiny.inputs()
    with reducers.attach(tiny.model, "st3", visual_tokens=128, **VTA) as att:
        replay = Replay(att.method)
        replay.start(replaying=False)
        visible = VisibleVisual(att, tiny.model)
        try:
            out = generate(tiny.model, batch)
        finally:
            visible.remove()
        stats = dict(att.stats)
        # the reference: the same prefill reductions replayed, no cache, eviction expressed as a mask
        replay.start(replaying=True)
        att.method.vta = False  # a no-cache forward has no decode steps to evict at
        image = batch["input_ids"] == tiny.model.config.image_token_id
        positions = batch["attention_mask"].cumsum(1) - 1
        visual_positions = [set(positions[b][image[b]].tolist()) for b in range(4)]
        masking = EvictionMask(tiny.model, visible.steps, visual_positions)
        mask = torch.cat([batch["attention_mask"], torch.ones(4, NEW_TOKENS, dtype=torch.long)], 1)
        others = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        try:
            with torch.inference_mode():
                reference = tiny.model(input_ids=out.sequences, attention_mask=mask, use_cache=False, **others).logits
        finally:
            masking.remove()
    return out, stats, visible.steps, reference


def test_st3_visual_entries_follow_the_annealing_curve_and_leave_the_cache(st3_run):
    out, stats, _, _ = st3_run
    after_prefill = torch.tensor(stats["visual_tokens_per_layer"])  # [L, B]: what each layer kept and cached
    per_step = torch.tensor(stats["visual_entries_per_step"])  # [steps, L, B], held from decode step t = 1, 2, ...
    assert per_step.shape[0] == NEW_TOKENS
    for t in range(1, NEW_TOKENS + 1):
        assert per_step[t - 1].tolist() == annealed(after_prefill, t).tolist(), f"step {t}"
    assert per_step[-1].tolist() == annealed(after_prefill, VTA["anneal_steps"]).tolist()  # on the floor
    # at the end each layer holds fewer entries than after prefill, once the generated tokens are set aside
    prefill, end = torch.tensor(stats["kv_entries_prefill"]), torch.tensor(stats["kv_entries_end"])
    generated = NEW_TOKENS - 1  # the last generated token is never fed back
    has_visual = after_prefill >= 2
    assert (end - generated < prefill)[has_visual].all() and has_visual.sum() > 0
    assert (end - generated == prefill - (after_prefill - per_step[-1])).all()
    # the entries really left the cache tensors: each layer is as wide as its fullest row
    for layer, cached in enumerate(cache_of_output(out).layers):
        assert cached.keys.shape[2] == max(stats["kv_entries_end"][layer])


def test_st3_generation_with_eviction_equals_a_masked_no_cache_forward(st3_run):
    out, _, visible, reference = st3_run
    assert len(visible) == NEW_TOKENS - 1 and visible[-1][0][0]  # decode steps ran, with visual entries left
    assert len(visible[-1][0][0]) < len(visible[0][0][0])  # and eviction removed some between them
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(reference[:, step - NEW_TOKENS - 1], step_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("all_kept_row", [False, True])  # True: one row loses nothing, so the cache cannot narrow
def test_eviction_compacts_the_cache_in_place_keeping_exactly_the_kept_entries(all_kept_row):
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 3, 2, 16, 4, generator=g)  # [B, Hkv, S, d] each
    keep = torch.rand(3, 16, generator=g) < 0.6
    keep[0, :4] = True  # entries in the columns that go must move into freed slots
    if all_kept_row:
        keep[2] = True
    layer = SimpleNamespace(keys=keys.clone(), values=values.clone())
    storage = layer.keys.untyped_storage().data_ptr()
    index = compact_cache(SimpleNamespace(layers=[layer]), 0, keep)  # [B, W]
    width = int(keep.sum(1).max())
    assert index.shape == (3, width) and layer.keys.shape[2] == width
    assert layer.keys.untyped_storage().data_ptr() == storage  # a view of the same memory: nothing was copied whole
    for b in range(3):
        assert sorted(index[b][keep[b, index[b]]].tolist()) == keep[b].nonzero()[:, 0].tolist()  # each kept entry once
        assert torch.equal(layer.keys[b], keys[b][:, index[b]]) and torch.equal(layer.values[b], values[b][:, index[b]])
    if all_kept_row:
        assert index.tolist() == [list(range(16))] * 3  # nothing moved


def test_st3_without_vta_or_at_full_budget_evicts_nothing():
    tiny = get_tiny("llava")
    for params in (dict(visual_tokens=128, vta=False), dict(ratio=1.0)):
        with reducers.attach(tiny.model, "st3", **params, **VTA) as att:
            generate(tiny.model, tiny.inputs())
        per_step = torch.tensor(att.stats["visual_entries_per_step"])
        assert (per_step == torch.tensor(att.stats["visual_tokens_per_layer"])).all(), params


def test_st3_prunes_every_fourth_layer_from_layer_two_and_meets_the_budget():
    config = get_tiny("llava").model.config
    method = reducers.validate(config, "st3", visual_tokens=128)
    assert method.llm_sites(ModelShape.from_config(config)) == [2, 6, 10, 14, 18, 22, 26, 30]
    plan = reducers.schedule(config, "st3", visual_tokens=128)["visual_tokens_per_layer"]
    drops = [layer for layer in range(1, 32) if plan[layer] < plan[layer - 1]]
    assert drops == [2, 6, 10, 14, 18, 22, 26, 30][:len(drops)] and len(drops) >= 4
    assert abs(sum(plan) / 32 - 128) <= 576 / 32
    with pytest.raises(ValueError, match="smallest budget it can meet is 36 of 576"):
        reducers.validate(config, "st3", visual_tokens=20)
    with pytest.raises(ValueError, match="floor in"):
        reducers.validate(config, "st3", visual_tokens=128, floor=0.0)


def svd_score(x: torch.Tensor) -> torch.Tensor:
    """The definition: ||(U S)_i||_1 from torch.linalg.svd of each row's [V, D] matrix (in x's dtype)."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return (u * s[:, None, :]).abs().sum(-1)


@pytest.mark.parametrize("eigh_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [24, 96])  # D < V: from X^T X; V <= D: from X X^T (the LLaVA case)
def test_information_score_equals_the_svd_definition_with_padding(width, eigh_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, width, generator=g)
    x[2, 5] = 0  # a real token whose state is all zero carries no information
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[1, 30:] = False  # a row with fewer candidates: its padding must not change its score
    expected = torch.zeros(3, 40)
    for b in range(3):
        n = int(valid[b].sum())
        expected[b, :n] = svd_score(x[b:b + 1, :n])[0]
    score = information_score(torch.where(valid[..., None], x, 100.0), valid, eigh_dtype)
    # fp32 eigenvectors carry rounding of ~eps x the largest eigenvalue: 1e-4 of the top score at the zero token here
    torch.testing.assert_close(score, expected, atol=2e-4 * float(expected.max()), rtol=1e-4)
    assert (score[1, 30:] == 0).all()


def ranks(score: torch.Tensor) -> torch.Tensor:
    return score.argsort(-1).argsort(-1).double()


def agreement(score: torch.Tensor, reference: torch.Tensor) -> tuple[float, dict[int, float]]:
    """The lowest Spearman correlation over rows, and per k the lowest share of the top k both scores pick."""
    spearman = min(float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1]) for a, b in zip(score, reference))
    overlap = {k: min(len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k
                      for a, b in zip(score, reference)) for k in (96, 288)}  # TokenCarve's selections at 64 and 192
    return spearman, overlap


def test_information_score_agrees_with_the_svd_at_the_benchmark_shape():
    # [576, 2048] states per row: isotropic noise plus a component every token shares (LLM states carry one). The
    # fp32 eigendecomposition rounds at eps x the shared direction's eigenvalue, which blurs the others as that
    # component grows (docs/reducers.md); in fp64 the score stays the SVD's.
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 576, 2048, generator=g)
    valid = torch.ones(2, 576, dtype=torch.bool)
    for shared, fp32_spearman, fp32_overlap in ((0.5, 0.995, 0.9), (3.0, None, None)):
        x = noise + shared * torch.randn(2, 1, 2048, generator=g)
        reference = svd_score(x.double())
        spearman, overlap = agreement(information_score(x, valid, torch.float64), reference)
        assert spearman > 0.9999 and min(overlap.values()) >= 0.99, (shared, spearman, overlap)
        if fp32_spearman is not None:
            spearman, overlap = agreement(information_score(x, valid), reference)
            assert spearman > fp32_spearman and min(overlap.values()) >= fp32_overlap, (shared, spearman, overlap)


def cached_keys(cache, layer: int, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per row, the cache entries of `layer` as [S, H*d] key vectors (all of them, or where `mask` [B, S])."""
    keys = cache.layers[layer].keys  # [B, Hkv, S, d]
    flat = keys.transpose(1, 2).flatten(2)
    return [flat[b] if mask is None else flat[b][mask[b]] for b in range(flat.shape[0])]


def test_tokencarve_cuts_the_caches_of_earlier_layers_to_the_kept_tokens():
    tiny = get_tiny("llava")
    batch = tiny.inputs()
    site = 2  # K = 2 of 32
    full = generate(tiny.model, batch)
    with reducers.attach(tiny.model, "tokencarve", visual_tokens=64) as att:
        carved = generate(tiny.model, batch)
    with reducers.attach(tiny.model, "tokencarve", visual_tokens=64, prune_cache_before=False):
        kept_before = generate(tiny.model, batch)
    widths = [layer.keys.shape[2] for layer in cache_of_output(carved).layers]
    assert widths[0] == widths[1] == widths[site] < cache_of_output(full).layers[0].keys.shape[2]
    assert att.stats["kv_entries_end"][0] == att.stats["kv_entries_end"][site]
    assert [layer.keys.shape[2] for layer in cache_of_output(kept_before).layers[:site]] == \
        [cache_of_output(full).layers[0].keys.shape[2]] * site
    # every entry left in an earlier layer is that layer's original entry for a token (merged tokens included):
    # layer 0's keys depend only on the embeddings, so they match the unreduced run's exactly
    for layer in range(site):
        for kept, original in zip(cached_keys(cache_of_output(carved), layer), cached_keys(cache_of_output(full), layer)):
            matches = (kept[:, None, :] == original[None, :, :]).all(-1).any(1)  # [S_kept]
            assert matches.sum() >= kept.shape[0] - NEW_TOKENS  # all but the generated tokens' entries


def test_tokencarve_merges_half_a_budget_of_selected_tokens_into_the_top_half():
    tiny = get_tiny("llava")
    calls = []
    with reducers.attach(tiny.model, "tokencarve", visual_tokens=64) as att:
        reduce = att.method.reduce_llm

        def spy(step):
            result = reduce(step)
            calls.append((step, result))
            return result
        att.method.reduce_llm = spy
        generate(tiny.model, tiny.inputs())
    (step, result), = calls
    target = step.keep  # [N]
    assert (result.kept_valid.sum(1) == target).all()
    # kept states differ from the layer's input exactly for the A tokens that absorbed B tokens: at most T/2 of them
    before = step.hidden_cand.gather(1, result.kept[..., None].expand(-1, -1, step.hidden.shape[-1]))
    changed = ((result.hidden != before).any(-1) & result.kept_valid).sum(1)
    assert (changed >= 1).all() and (changed <= target // 2).all()


@pytest.mark.parametrize("budget,keep", [(36, 0), (37, 1)])
def test_tokencarve_at_its_smallest_budgets_merges_nothing(budget, keep):
    """Near the smallest reachable budget K keeps 0 or 1 tokens: n = keep selected, A = int(0.5 * n) = 0 tokens, so
    nothing can merge (this once raised on the empty A) and what is kept keeps its state."""
    tiny = get_tiny("llava")
    with pytest.raises(ValueError, match="smallest budget it can meet is 36 "):  # 576 tokens, 32 layers, K = 2
        reducers.validate(tiny.model.config, "tokencarve", visual_tokens=35)
    calls = []
    with reducers.attach(tiny.model, "tokencarve", visual_tokens=budget) as att:
        reduce = att.method.reduce_llm
        att.method.reduce_llm = lambda step: calls.append((step, reduce(step))) or calls[-1][1]
        generate(tiny.model, tiny.inputs())
    (step, result), = calls
    assert (step.keep == keep).all() and (result.kept_valid.sum(1) == keep).all()
    kept_before = step.hidden_cand.gather(1, result.kept[..., None].expand(-1, -1, step.hidden.shape[-1]))
    assert torch.equal(result.hidden, kept_before)


@pytest.mark.parametrize("method", ["st3", "tokencarve"])
def test_shallow_models_get_the_relative_schedule(method):
    # 8 layers: ST3's every-4th-of-32 lands on layers 1, 2, 4, 6, 7 (adjacent pruning layers); TokenCarve's K on 1
    model, batch = small_model_and_batch(LlavaSpec(vision_layers=2, llm_layers=8))
    with reducers.attach(model, method, ratio=0.25) as att, torch.inference_mode():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    per_layer = torch.tensor(att.stats["visual_tokens_per_layer"])  # [L, B]
    drops = [layer for layer in range(1, 8) if (per_layer[layer] < per_layer[layer - 1]).all()]
    assert drops == ([1, 2, 4, 6, 7] if method == "st3" else [1])
    assert att.stats["visual_tokens_avg"] == pytest.approx([144.0, 144.0], abs=576 / 8)
