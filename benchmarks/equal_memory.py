"""Throughput at equal memory: each configuration captions at its own `--batch-size auto` batch within one fixed
memory per actor, so a reduction's smaller KV cache and activations buy a larger batch.

The end-to-end benchmark's model (benchmarks/e2e.py: random-weight LLaVA-1.5-like shapes, 12 LLM layers, bf16 or
--dtype, ~40 text tokens, exactly 60 generated tokens). The memory per actor is, unless --memory is given, the
memory that holds exactly --rows (4) rows of `none` by the rule (reducers/memory.py): a small unreduced batch is
where a batch is memory-bound and the freed memory matters, and it keeps the largest reduced batch short enough to
run on a CPU. For `none` and every method at 1/3 and 1/9 of the visual tokens: the auto batch, the rule's memory for
it, the peak memory measured during that batch, one generate's seconds (median of --repeats, 3, taken round-robin
over the configurations), images/s, the speed-up over `none`, and the speed-up that the FLOPs per image imply
(reducers.accounting): where the time is compute-bound, images/s rises no further than that.

Peak memory: on a GPU torch.cuda.max_memory_allocated; on CPU the resident set's high-water mark during the batch
(VmHWM, reset before it) minus the resident set before it, plus the weights. glibc keeps some freed blocks, so
this can read high (fp32 none: 3.9 GiB against 3.4 exact); MALLOC_MMAP_THRESHOLD_=65536 in the environment, as
tests/memory_probe.py uses, makes it exact but turns every large allocation into a page-faulting mmap, which slowed
bf16 generate several-fold here (fp32 not measurably), so check the timings against a run without it.

    scripts/netns-run .venv/bin/python -m benchmarks.equal_memory [--threads 1] [--methods visionzip,fastv]
        [--dtype fp32]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import statistics
import sys
from pathlib import Path

import torch

import reducers
from benchmarks.e2e import NEW_TOKENS, caption
from benchmarks.prefill import add_shared_arguments, make_batch, setup
from reducers import memory
from reducers.accounting import batch_cost
from reference.test_models import build_model, build_processor

RATIOS = (0.33, 0.11)


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (high-water mark since the last reset) of this process."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) * 1024


def timed_batch(model, processor, rows: int, dtype: torch.dtype, device: str) -> tuple[float, int]:
    """(seconds of one 60-token caption of `rows` images, peak bytes the batch added to the resident model)."""
    batch = make_batch(processor, rows, dtype, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        seconds = caption(model, batch)
        return seconds, torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    before = resident_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    seconds = caption(model, batch)
    return seconds, resident_bytes("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_arguments(parser, repeats=3)
    parser.add_argument("--memory", help="memory per actor, e.g. 3GiB (default: what holds --rows rows of none)")
    next(a for a in parser._actions if a.dest == "rows").help = "none's auto batch at the default memory; default 4"
    args = parser.parse_args()
    spec, dtype, device_name = setup(args)
    if not args.llava_7b:
        spec = dataclasses.replace(spec, llm_layers=12)  # the e2e benchmark's depth
    processor = build_processor(spec)
    model = build_model(processor.tokenizer, spec, dtype=dtype).to(args.device)
    dtype_bytes = dtype.itemsize
    text_tokens = int((make_batch(processor, 1, dtype, "cpu")["input_ids"][0] != model.config.image_token_id).sum())
    weights = memory.weight_bytes(model.config, dtype_bytes)

    def row(method: str, budget: dict) -> memory.RowMemory:
        return memory.row_memory(model.config, method, budget, text_tokens, NEW_TOKENS, dtype_bytes)

    per_actor = (memory.parse_size(args.memory) if args.memory else
                 int((weights + args.rows * row("none", {}).total) / (1 - memory.MARGIN)) + 1)
    print(f"# throughput at equal memory {datetime.date.today()} on {device_name}; vision {spec.vision_hidden}x"
          f"{spec.vision_layers}, LLM {spec.llm_hidden}x{spec.llm_layers}, {dtype}, {NEW_TOKENS} new tokens, "
          f"{text_tokens} text tokens; memory per actor {memory.format_size(per_actor)} (weights "
          f"{memory.format_size(weights)})")
    print("| configuration | auto batch | rule: memory for it | measured peak | s per batch (median) | images/s "
          "| speed-up | FLOPs-implied |\n|---|---|---|---|---|---|---|---|")
    timed_batch(model, processor, 1, dtype, args.device)  # warm-up: allocators, kernels, thread pools
    configurations = [("none", {})] + [(m, {"ratio": r}) for m in args.methods.split(",") if m != "none"
                                       for r in RATIOS]
    points = []  # (label, method, budget, auto batch, the rule's memory for it) of each configuration that runs
    for method, budget in configurations:
        label = method + "".join(f" @ {r:g}" for r in budget.values())
        try:
            reducers.validate(model.config, method, **budget)
        except ValueError as error:
            print(f"| {label} | not measured: {error} |", flush=True)
            continue
        fit = memory.largest_batch(per_actor, weights, row(method, budget))
        points.append((label, method, budget, fit.batch_size, fit.needed(fit.batch_size)))
    # Round-robin: every repeat times each configuration once, so a drift in the machine's speed (a shared VM's
    # neighbours) falls on all of them alike instead of on whichever ran last.
    runs: dict[str, list[tuple[float, int]]] = {label: [] for label, *_ in points}
    flops_per_image: dict[str, float] = {}
    for repeat in range(args.repeats):
        for label, method, budget, batch_size, _ in points:
            with reducers.attach(model, method, **budget) as attachment:
                runs[label].append(timed_batch(model, processor, batch_size, dtype, args.device))
                flops_per_image[label] = batch_cost(model.config, attachment.last).flops_total / batch_size
            print(f"  run {repeat + 1}/{args.repeats} {label}: {runs[label][-1][0]:.1f} s", file=sys.stderr, flush=True)
    baseline = None
    for label, _, _, batch_size, needed in points:
        seconds = statistics.median(s for s, _ in runs[label])
        added = max(a for _, a in runs[label])
        images_per_s = batch_size / seconds
        baseline = baseline or images_per_s
        print(f"| {label} | {batch_size} | {memory.format_size(needed)} | {memory.format_size(weights + added)} | "
              f"{seconds:.1f} | {images_per_s:.3f} | {images_per_s / baseline:.2f}x | "
              f"{flops_per_image['none'] / flops_per_image[label]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
