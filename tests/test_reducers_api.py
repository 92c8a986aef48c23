"""Public API, budgets and the shared building blocks of reducers/."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reducers
from conftest import get_tiny, small_model_and_batch
from reducers import budget, scores, stages
from reducers.step import Step
from reference.test_models import LlavaSpec


def test_available_lists_every_product_method_and_no_benchmark_oracle():
    from reference import benchmark  # its oracle stays out of the reducers' registry
    assert reducers.available() == sorted(["none", "random", "fastv", "visionzip", "ficoco-v", "ficoco-l", "ficoco-vl",
                                           "st3", "tokencarve"])
    with pytest.raises(ValueError, match="unknown reduction method 'object-oracle'"):
        reducers.validate(get_tiny("llava").model.config, "object-oracle", visual_tokens=64)
    assert isinstance(benchmark.method_named("object-oracle", seed=3), benchmark.ObjectOracle)


def test_a_method_instance_is_attached_as_it_is_and_takes_no_parameters_besides():
    model = get_tiny("llava").model
    method = reducers.methods.create("random", seed=5)
    with reducers.attach(model, method, visual_tokens=64) as attachment:
        assert attachment.method is method
    with pytest.raises(ValueError, match=r"random is given as a Method instance: set \['seed'\] on the instance"):
        reducers.attach(model, method, visual_tokens=64, seed=6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="nope", visual_tokens=64), "unknown reduction method 'nope'; available: "),
    (dict(name="fastv"), "exactly one budget"),
    (dict(name="fastv", visual_tokens=64, ratio=0.1), "exactly one budget"),
    (dict(name="fastv", visual_tokens=600), "above the full count of 576"),
    (dict(name="fastv", ratio=1.5), "the budget ratio=1.5 is not in (0, 1]"),
    (dict(name="fastv", visual_tokens=0), "the budget visual_tokens=0 is not a positive integer"),
    (dict(name="fastv", visual_tokens=10), "smallest budget it can meet is 36 of 576"),
    (dict(name="ficoco-l", ratio=0.05), "smallest budget it can meet is 54 of 576"),
    (dict(name="fastv", visual_tokens=64, layer_k=3), "fastv has no parameter(s) ['layer_k']"),
    (dict(name="none", visual_tokens=64), "`none` keeps every visual token"),
])
def test_bad_requests_are_refused_with_a_message_that_says_what_is_allowed(kwargs, message):
    model = get_tiny("llava").model
    with pytest.raises(ValueError) as error:
        reducers.attach(model, **kwargs)
    assert message in str(error.value)
    with pytest.raises(ValueError):  # the same check runs on the config alone, before any weights load
        reducers.validate(model.config, **kwargs)
    assert not model.model.language_model.layers[0]._forward_pre_hooks  # nothing was attached


def test_unsupported_model_class_is_refused():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="unsupported model class LlamaForCausalLM; supported: LlavaForConditionalGeneration"):
        reducers.attach(llama, "fastv", visual_tokens=64)


@pytest.mark.parametrize("method", [m for m in reducers.available() if m != "none"])
@pytest.mark.parametrize("n", [192, 128, 64])
def test_schedule_meets_the_layer_averaged_budget(method, n):
    config = get_tiny("llava").model.config
    plan = reducers.schedule(config, method, visual_tokens=n)
    assert abs(plan["visual_tokens_avg"] - n) <= 576 / len(plan["visual_tokens_per_layer"])
    vision_side = reducers.validate(config, method, visual_tokens=n).vision_share == 1.0
    if vision_side:  # a vision-side method feeds exactly N tokens to the LLM
        assert set(plan["visual_tokens_per_layer"]) == {n}
        assert plan["vision_tokens_per_layer"][-1] <= 577


def test_llm_counts_single_layer_is_the_closed_form_and_many_layers_shrink():
    entering, n = torch.tensor([576, 576]), torch.tensor([64, 192])
    (single,) = budget.llm_counts(entering, n, [2], 32)
    assert single.tolist() == [round((64 * 32 - 2 * 576) / 30), round((192 * 32 - 2 * 576) / 30)]
    counts = budget.llm_counts(entering, n, [2, 6, 10, 14], 32)
    assert all((a >= b).all() for a, b in zip(counts, counts[1:]))
    bounds = [2, 6, 10, 14, 32]
    average = (2 * entering + sum((bounds[i + 1] - bounds[i]) * c for i, c in enumerate(counts))) / 32
    assert ((average - n).abs() <= 1).all()


def test_split_by_weight_gives_each_group_its_total():
    total = torch.tensor([10, 7])
    weights = torch.tensor([144, 100, 44, 144, 144])
    groups = torch.tensor([0, 0, 0, 1, 1])
    share = budget.split_by_weight(total, weights, groups)
    assert share.tolist()[:3] == [5, 3, 2]  # 5, 3.47, 1.53: the spare unit goes to .53 and sum(share.tolist()[:3]) == 10 and sum(share.tolist()[3:]) == 7


def make_step(n=2, s=7, h=4, h_kv=2, d=8, causal=True, seed=0) -> Step:
    g = torch.Generator().manual_seed(seed)
    key_valid = torch.ones(n, s, dtype=torch.bool)
    key_valid[1, :2] = False  # row 1 is left-padded
    visual = torch.zeros(n, s, dtype=torch.bool)
    visual[:, 3:6] = True
    cand, cand_valid = stages.pack(visual & key_valid)
    return Step(hidden=torch.randn(n, s, 16, generator=g), q=torch.randn(n, h, s, d, generator=g),
                k=torch.randn(n, h_kv, s, d, generator=g), key_valid=key_valid, cand=cand, cand_valid=cand_valid,
                keep=torch.tensor([2, 2]), causal=causal, text=key_valid & ~visual)


def test_attention_rows_equal_eager_softmax_with_gqa_padding_and_causality():
    step = make_step()
    rows = torch.tensor([[6, 4], [6, 3]])
    got = scores.attention_rows(step, rows)
    k = step.k.repeat_interleave(2, dim=1)  # [N, H, S, d]
    logits = step.q @ k.transpose(-1, -2) / 8 ** 0.5
    allowed = step.key_valid[:, None, None, :] & (torch.arange(7)[None, :] <= torch.arange(7)[:, None])
    expected = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).mean(1)  # [N, S, S]
    torch.testing.assert_close(got, expected.gather(1, rows[..., None].expand(-1, -1, 7)))
    assert got[1, :, :2].abs().max() == 0  # padding receives no attention


def test_query_attention_in_row_blocks_and_bf16_equals_eager_softmax():
    """More causal rows than one block (each block stops at its last allowed key), GQA, left padding, a row with no
    allowed key; no mask at all; and bf16 q / k (bf16 logits, fp32 softmax) within the logits' rounding."""
    g = torch.Generator().manual_seed(0)
    n, h, h_kv, s, d = 2, 4, 2, 300, 16
    q, k = torch.randn(n, h, s, d, generator=g), torch.randn(n, h_kv, s, d, generator=g)
    valid = torch.ones(n, s, dtype=torch.bool)
    valid[1, :40] = False  # left padding
    allowed = valid[:, None, :] & (torch.arange(s)[None, :] <= torch.arange(s)[:, None])  # [N, S, S]
    allowed[1, 39] = False  # a padding row: it gets zeros

    def eager(q, k, allowed):
        logits = q @ k.repeat_interleave(h // h_kv, 1).transpose(-1, -2) / d ** 0.5
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(logits, -1).nan_to_num(0.0).mean(1)

    torch.testing.assert_close(scores.query_attention(q, k, allowed), eager(q, k, allowed))
    torch.testing.assert_close(scores.query_attention(q, k), eager(q, k, None))
    q16, k16 = q.bfloat16(), k.bfloat16()
    torch.testing.assert_close(scores.query_attention(q16, k16, allowed), eager(q16.float(), k16.float(), allowed),
                               atol=3e-3, rtol=0)


def eager_attention(step: Step) -> torch.Tensor:
    """The head-averaged softmax of every row of `step` by the textbook route: [N, S, S] (0 where not allowed)."""
    n, h, s, d = step.q.shape
    logits = step.q.float() @ step.k.float().repeat_interleave(h // step.k.shape[1], 1).transpose(-1, -2) / d ** 0.5
    allowed = step.key_valid[:, None, None, :] & (torch.ones(s, s, dtype=torch.bool).tril() if step.causal else True)
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0).mean(1)


@pytest.mark.parametrize("causal", [True, False], ids=["llm", "tower"])
def test_attention_block_and_candidate_mean_equal_eager_softmax(causal):
    """GQA, left padding (a padded query row reads 0), causality; the normalisers computed (LLM, or a tower on GPU)
    or handed over as the site layer's SDPA kernel computes them (`step.lse`, tower on CPU): same probabilities."""
    step = make_step(causal=causal, s=9)
    expected = eager_attention(step)
    rows, cols = torch.tensor([[8, 4, 0], [8, 3, 1]]), torch.tensor([[3, 5], [0, 4]])
    picked = expected.gather(1, rows[..., None].expand(-1, -1, 9)).gather(2, cols[:, None, :].expand(-1, 3, -1))
    torch.testing.assert_close(scores.attention_block(step, rows, cols), picked)
    assert step.lse is not None  # computed once, kept for the next call
    mean = (expected.gather(1, step.cand[..., None].expand(-1, -1, 9)).gather(2, step.cand[:, None].expand(-1, 3, -1))
            * step.cand_valid[:, None, :]).sum(-1) / step.cand_valid.sum(1, keepdim=True) * step.cand_valid
    torch.testing.assert_close(scores.candidate_mean(step), mean)
    if not causal:
        n, h, s, d = step.q.shape
        mask = torch.zeros(n, 1, 1, s).masked_fill(~step.key_valid[:, None, None, :], float("-inf"))
        k = step.k.repeat_interleave(h // step.k.shape[1], 1)
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(step.q, k, k, attn_mask=mask)
        kernel = make_step(causal=False, s=9)
        kernel.lse = lse
        torch.testing.assert_close(scores.attention_block(kernel, rows, cols), picked)
        torch.testing.assert_close(scores.candidate_mean(kernel), mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "key-mask"])
def test_tower_attention_at_a_site_is_sdpa_bit_for_bit_and_hands_over_its_logsumexp(dtype, masked):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from reducers.runtime import sdpa
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 50, 16, generator=g).to(dtype) for _ in range(3))
    mask = None
    if masked:  # the key mask the runtime gives ragged crops
        mask = torch.ones(3, 1, 1, 50, dtype=torch.bool)
        mask[1, ..., 37:] = False
    module = torch.nn.Module()
    module.is_causal = False
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    handed = []
    sdpa._lse_sinks[module] = handed.append
    try:
        got, _ = sdpa._sdpa_keeping_lse(module, q, k, v, mask, scaling=0.25)
    finally:
        del sdpa._lse_sinks[module]
    assert torch.equal(got, expected)
    logits = (q.float() @ k.float().transpose(-1, -2)) * 0.25
    if masked:
        logits = logits.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(handed[0], logits.logsumexp(-1), atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=0)


def test_split_keeps_the_highest_scores_in_ascending_order_deterministically():
    step = make_step()
    score = torch.tensor([[0.9, 0.9, 0.9], [0.5, 0.2, 0.7]])
    parts = stages.split(step, score)
    assert parts.kept.tolist() == [[0, 1], [0, 2]]  # a three-way tie goes to the earlier candidates
    assert parts.dropped.tolist() == [[2], [1]]


def test_merge_is_the_self_preserving_average():
    kept = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    dropped = torch.tensor([[[3.0, 3.0]]])
    alpha = torch.tensor([[[1.0, 0.0]]])
    merged = stages.merge_self_preserving_(kept, dropped, alpha)
    assert merged.tolist() == [[[2.0, 2.0], [0.0, 0.0]]]  # (x_j + 1 * x_i) / (1 + 1); untouched target unchanged


def test_quantile_targets_pick_the_top_correlations_and_normalise():
    corr = torch.tensor([[[0.1, 0.5, 0.4, 0.05]]])
    parts = stages.Split(torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 4, dtype=torch.bool),
                         torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.bool))
    alpha = stages.quantile_targets(corr, parts, eps=0.6)
    assert alpha[0, 0].nonzero().view(-1).tolist() == [1, 2]
    torch.testing.assert_close(alpha.sum(-1), torch.ones(1, 1))


def test_local_penalty_doubles_each_window_maximum():
    step = make_step()
    step.grid, step.cand_valid = (2, 2), torch.ones(1, 4, dtype=torch.bool)
    step.slots = torch.tensor([[0, 1, 2, 3]])
    out = stages.local_penalty(torch.tensor([[1.0, 3.0, 2.0, 1.0]]), step)
    assert out.tolist() == [[0.0, 4.0, 1.0, 0.0]]  # shifted by the minimum, then the window's maximum doubled


@pytest.mark.parametrize("method", ["ficoco-v", "visionzip", "random", "ficoco-vl"])
def test_vision_methods_scale_to_a_two_layer_tower(method):
    model, batch = small_model_and_batch(LlavaSpec(vision_layers=2, llm_layers=8))
    with reducers.attach(model, method, ratio=0.25) as att, torch.inference_mode():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert att.stats["visual_tokens_avg"] == pytest.approx([144.0, 144.0], abs=576 / 8)
    assert att.stats["vision_tokens_per_layer"][0] == 2 * 577

