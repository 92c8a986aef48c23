"""End-to-end captioning speed and KV memory of every method against the limit its cuts allow.

The prefill benchmark's model and batch (benchmarks/prefill.py: random-weight LLaVA-1.5-like shapes, batch 4, ~40
text tokens, bf16), now generating exactly 60 tokens, with 12 LLM layers instead of 10 so that ST3's pruning layers
(every 4th of 32 from layer 2, relative to depth) land on every 2nd layer, while FastV's and FiCoCo-L's pruning layers
(2 and 3 of 32) still round to layer 1, where 64 tokens are reachable. For each method at 576 / 192 / 128 / 64 visual tokens: total,
prefill and decode seconds, speed-up over `none`, peak KV bytes as a share of `none`'s, and the **limit**: the
end-to-end speed-up if `none`'s prefill shrank by the method's FLOPs ratio (vision tower + projector + LLM prefill,
reducers.accounting) and each of its decode steps by the method's bytes ratio (weights + KV cache read per step;
the rest of `none`'s time, generate's own bookkeeping, stays). At a fixed batch a decode step mostly reads the
weights, so the limit sits far below the prefill ratio. `achieved / limit` says how much of it we turn into time.

    scripts/netns-run .venv/bin/python -m benchmarks.e2e [--repeats 1] [--methods st3,tokencarve]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import time

import torch

import reducers
from benchmarks.prefill import BUDGETS, add_shared_arguments, make_batch, setup
from reducers.accounting import TextDims, batch_cost, kv_bytes, model_dims
from reducers.spectral import information_score
from reference.test_models import LlavaSpec, build_model, build_processor

NEW_TOKENS = 60


def decode_weight_bytes(text: TextDims, dtype_bytes: int) -> int:
    """Weights one decode step reads: every decoder layer's projections and MLP, plus lm_head (norms are noise)."""
    q_width, kv_width = text.heads * text.head_dim, text.kv_heads * text.head_dim
    per_layer = 2 * text.hidden * q_width + 2 * text.hidden * kv_width + 3 * text.hidden * text.intermediate
    return dtype_bytes * (text.layers * per_layer + text.hidden * text.vocab)


def decode_step_bytes(text: TextDims, stats: reducers.Stats) -> float:
    """Mean bytes a decode step reads: the weights plus the K/V of every cached entry (the new one included).

    stats.kv_entries_per_step[s] are the entries per layer and row held after forward s (prefill is forward 0),
    i.e. what decode step s + 1 attends over before appending its own token.
    """
    dtype_bytes, steps = stats.dtype_bytes, stats.decode_steps
    held = torch.tensor(stats.kv_entries_per_step[:steps])  # [steps, L, B]
    attended = (held + 1).sum(2)  # [steps, L]: all rows of the batch
    kv = statistics.mean(kv_bytes(text, step.tolist(), dtype_bytes) for step in attended)
    return decode_weight_bytes(text, dtype_bytes) + kv


def caption(model, batch: dict) -> float:
    """Wall seconds of one generate of exactly NEW_TOKENS tokens (greedy)."""
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(**batch, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, do_sample=False)
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def measure(model, batch: dict, method: str, budget: int, repeats: int) -> dict:
    """Median total / prefill / decode seconds of `repeats` runs, with the last run's stats."""
    kwargs = {"visual_tokens": budget} if reducers.takes_budget(method) else {}
    runs = []
    with reducers.attach(model, method, **kwargs) as attachment:
        for _ in range(repeats):
            total = caption(model, batch)
            stats = attachment.last
            runs.append((total, stats.prefill_seconds, stats.decode_seconds))
    total, prefill, decode = (statistics.median(column) for column in zip(*runs))
    return {"method": method, "budget": budget, "total": total, "prefill": prefill, "decode": decode, "stats": stats}


def add_limits(row: dict, baseline: dict, config) -> None:
    """Speed-up, KV share and the limit of `row` against the `none` run `baseline` (in place)."""
    text = model_dims(config).text
    cost, base_cost = batch_cost(config, row["stats"]), batch_cost(config, baseline["stats"])
    prefill_flops = cost.flops_vision + cost.flops_projector + cost.flops_prefill
    base_prefill_flops = base_cost.flops_vision + base_cost.flops_projector + base_cost.flops_prefill
    bytes_ratio = decode_step_bytes(text, row["stats"]) / decode_step_bytes(text, baseline["stats"])
    other = baseline["total"] - baseline["prefill"] - baseline["decode"]  # generate's bookkeeping: unchanged
    ideal = baseline["prefill"] * prefill_flops / base_prefill_flops + baseline["decode"] * bytes_ratio + other
    row["speedup"] = baseline["total"] / row["total"]
    row["limit"] = baseline["total"] / ideal
    row["prefill_flops_ratio"] = base_prefill_flops / prefill_flops
    row["kv_share"] = row["stats"].kv_bytes_peak / baseline["stats"].kv_bytes_peak
    row["decode_bytes_ratio"] = 1 / bytes_ratio


HEADER = ("| method | budget | total s | prefill s | decode s | speed-up | limit | achieved / limit | prefill FLOPs ratio "
          "| decode bytes ratio | peak KV vs none |\n|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['method']} | {r['budget']} | {r['total']:.2f} | {r['prefill']:.2f} | {r['decode']:.2f} | "
            f"{r['speedup']:.2f}x | {r['limit']:.2f}x | {r['speedup'] / r['limit']:.2f} | {r['prefill_flops_ratio']:.2f}x | "
            f"{r['decode_bytes_ratio']:.2f}x | {100 * r['kv_share']:.1f} % |")


def information_score_cost(model, batch: dict, prefill_seconds: float) -> str:
    """TokenCarve's information score on the benchmark's own visual hidden states (at its layer K, budget 64): seconds
    of torch.linalg.svd (fp32) and of the Gram-matrix eigendecomposition in fp32 (the default) and fp64, as shares of
    the 64-token prefill, and how well each eigh route agrees with the SVD (lowest Spearman over rows; lowest overlap
    of the 1.5 x 64 and 1.5 x 192 tokens each would select)."""
    captured = []
    with reducers.attach(model, "tokencarve", visual_tokens=64) as attachment:
        method = attachment.method
        original = method.reduce_llm
        method.reduce_llm = lambda step: captured.append((step.hidden_cand, step.cand_valid)) or original(step)
        with torch.inference_mode():
            model(**batch, use_cache=True, logits_to_keep=1)
    hidden, valid = captured[0]

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result

    def svd():
        u, s, _ = torch.linalg.svd(hidden.float() * valid[..., None], full_matrices=False)
        return (u * s[:, None, :]).abs().sum(-1)

    svd_seconds, full = timed(svd)
    parts = [f"information score on {tuple(hidden.shape)} visual states: torch.linalg.svd {svd_seconds:.3f} s "
             f"({100 * svd_seconds / prefill_seconds:.1f} % of the 64-token prefill)"]
    for dtype in (torch.float32, torch.float64):
        seconds, score = timed(lambda: information_score(hidden, valid, dtype))
        ranks = torch.stack([full, score], 1).argsort(-1).argsort(-1).float()  # [N, 2, V]
        spearman = min(float(torch.corrcoef(pair)[0, 1]) for pair in ranks)
        overlap = [min(len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k
                       for a, b in zip(full, score)) for k in (96, 288)]
        parts.append(f"eigh {str(dtype)[6:]} {seconds:.3f} s ({100 * seconds / prefill_seconds:.1f} %), Spearman >= "
                     f"{spearman:.4f}, selection overlap >= {100 * overlap[0]:.0f} % / {100 * overlap[1]:.0f} % at 64 / 192")
    return "; ".join(parts)


def run(spec: LlavaSpec, dtype: torch.dtype, device: str, rows: int, repeats: int, methods: list[str]) -> list[dict]:
    """Every method at every budget, each row printed as it is measured against the first `none` run; `none` is
    measured again at the end and the final table compares every row with the mean of the two (the machine's
    speed drifts over a long sweep when it is shared)."""
    processor = build_processor(spec)
    model = build_model(processor.tokenizer, spec, dtype=dtype).to(device)
    batch = make_batch(processor, rows, dtype, device)
    caption(model, batch)  # warm-up: allocators, kernels, thread pools
    first = measure(model, batch, "none", BUDGETS[0], repeats)
    add_limits(first, first, model.config)
    print(format_row(first), flush=True)
    results = []
    for method in [m for m in methods if m != "none"]:
        for budget in BUDGETS[1:]:
            try:
                reducers.validate(model.config, method, budget, None)
            except ValueError as error:  # e.g. a default pruning layer that rounds later on this shallower LLM
                print(f"| {method} | {budget} | not measured: {error} |", flush=True)
                continue
            row = measure(model, batch, method, budget, repeats)
            add_limits(row, first, model.config)
            print(format_row(row), flush=True)
            results.append(row)
    last = measure(model, batch, "none", BUDGETS[0], repeats)
    baseline = dict(first, **{key: (first[key] + last[key]) / 2 for key in ("total", "prefill", "decode")})
    print(f"\n`none` measured twice: {first['total']:.2f} s and {last['total']:.2f} s; rows against their mean:\n")
    print(HEADER)
    for row in [baseline] + results:
        add_limits(row, baseline, model.config)
        print(format_row(row), flush=True)
    if "tokencarve" in methods:
        carve_64 = next(r for r in results if r["method"] == "tokencarve" and r["budget"] == 64)
        print(information_score_cost(model, batch, carve_64["prefill"]), flush=True)
    return [baseline] + results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_arguments(parser, repeats=1)
    parser.add_argument("--llm-layers", type=int, default=12,
                        help="LLM depth on CPU; default 12: ST3's every-4th-of-32 pruning layers then land on every 2nd, "
                             "and FiCoCo-L's layer 3 of 32 on layer 1 (64 of 576 reachable)")
    args = parser.parse_args()
    spec, dtype, device_name = setup(args)
    if not args.llava_7b:
        spec = dataclasses.replace(spec, llm_layers=args.llm_layers)
    print(f"# end-to-end captioning benchmark {datetime.date.today()} on {device_name}; vision {spec.vision_hidden}x"
          f"{spec.vision_layers}, LLM {spec.llm_hidden}x{spec.llm_layers}, {dtype}, batch {args.rows}, {NEW_TOKENS} new "
          f"tokens, median of {args.repeats}")
    print(HEADER)
    run(spec, dtype, args.device, args.rows, args.repeats, args.methods.split(","))


if __name__ == "__main__":
    main()
