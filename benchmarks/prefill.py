"""Prefill speed of every method against its FLOPs-implied speed-up, on a random-weight LLaVA-1.5-like model.

For each method at 576 / 192 / 128 / 64 visual tokens: prefill seconds (median of --repeats, after a warm-up),
speed-up over `none`, the speed-up the FLOPs cut implies (reducers.accounting, vision tower + projector + LLM
prefill), their ratio (how much of the cut we turn into time), and the share of prefill spent inside the
method's own scoring / selection / merging. Batch 4, ~40 text tokens, 576 visual tokens per image.

Default shapes (CPU): vision hidden 1024 x 8 layers (CLIP ViT-L width), LLM hidden 2048 x 10 layers, bf16.
Ten LLM layers is the smallest depth at which every method's default pruning layer (2/32 and 3/32 of the
depth, rounded to layer 1 here) can still average 64 visual tokens. `--llava-7b` uses LLaVA-1.5-7B's shapes
(CLIP-L 24 layers, 32 x 4096 LLM, fp16) for a GPU. `--dtype fp32` for a CPU without bf16 instructions (no
avx512_bf16 / AMX in /proc/cpuinfo), where bf16 matrix products run about 4x slower than fp32.

    scripts/netns-run .venv/bin/python -m benchmarks.prefill [--repeats 3] [--device cpu] [--llava-7b] [--dtype fp32]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch
from PIL import Image

import reducers
from pipeline.actor import TORCH_DTYPES
from reducers.accounting import batch_cost
from reference.test_models import LlavaSpec, build_model, build_processor

BUDGETS = (576, 192, 128, 64)
QUESTION = "Write a short caption for the image of the dog in the park."  # 39 text tokens with the template

CPU_SPEC = LlavaSpec(vision_hidden=1024, vision_layers=8, vision_heads=16, vision_intermediate=4096,
                    llm_hidden=2048, llm_layers=10, llm_heads=16, llm_kv_heads=16, llm_intermediate=5504)
LLAVA_7B_SPEC = LlavaSpec(vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
                         llm_hidden=4096, llm_layers=32, llm_heads=32, llm_kv_heads=32, llm_intermediate=11008)


def make_batch(processor, rows: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(336, 336, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(rows)]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                           add_generation_prompt=True)
    batch = processor(images=images, text=[prompt] * rows, padding=True, return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return {k: v.to(device) for k, v in batch.items()}


def time_prefill(model, batch: dict, repeats: int) -> tuple[float, float, dict]:
    """(median wall seconds of one prefill forward, median scoring seconds, stats of the last run)."""
    walls, scoring = [], []
    for i in range(repeats + 1):  # the first run warms up caches and allocators
        with torch.inference_mode():
            start = time.perf_counter()
            model(**batch, use_cache=True, logits_to_keep=1)
            if batch["input_ids"].is_cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
        if i:
            walls.append(wall)
            scoring.append(model._bench_attachment.last.scoring_seconds)
    return statistics.median(walls), statistics.median(scoring), model._bench_attachment.last


def run(spec: LlavaSpec, dtype: torch.dtype, device: str, rows: int, repeats: int, methods: list[str]) -> list[dict]:
    processor = build_processor(spec)
    model = build_model(processor.tokenizer, spec, dtype=dtype).to(device)
    batch = make_batch(processor, rows, dtype, device)
    results = []
    baseline = None
    for method in ["none"] + [m for m in methods if m != "none"]:
        for budget in (BUDGETS[1:] if reducers.takes_budget(method) else BUDGETS[:1]):
            kwargs = {"visual_tokens": budget} if reducers.takes_budget(method) else {}
            with reducers.attach(model, method, **kwargs) as attachment:
                model._bench_attachment = attachment
                seconds, scoring, stats = time_prefill(model, batch, repeats)
            flops = batch_cost(model.config, stats).flops_total
            if baseline is None:
                baseline = (seconds, flops)
            row = {"method": method, "budget": budget, "seconds": seconds, "speedup": baseline[0] / seconds,
                   "flops_speedup": baseline[1] / flops, "scoring_share": scoring / seconds,
                   "visual_avg": statistics.mean(stats.visual_tokens_avg)}
            row["efficiency"] = row["speedup"] / row["flops_speedup"]
            results.append(row)
            print(format_row(row), flush=True)
    del model._bench_attachment
    return results


HEADER = ("| method | visual tokens (layer avg) | prefill s | speed-up | FLOPs-implied | achieved / implied | scoring share |\n"
          "|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['method']} | {r['budget']} ({r['visual_avg']:.1f}) | {r['seconds']:.3f} | {r['speedup']:.2f}x | "
            f"{r['flops_speedup']:.2f}x | {r['efficiency']:.2f} | {100 * r['scoring_share']:.1f} % |")


def add_shared_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The flags every model benchmark takes (benchmarks/e2e.py too)."""
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per point (median reported); default {repeats}")
    parser.add_argument("--rows", type=int, default=4, help="batch size; default 4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llava-7b", action="store_true", help="LLaVA-1.5-7B shapes in fp16 (for a GPU)")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES),
                        help="weights and activations (default bf16, fp16 with --llava-7b); fp32 for a CPU without "
                             "bf16 instructions, where bf16 matrix products run several times slower")
    parser.add_argument("--methods", default=",".join(reducers.available()), help="comma-separated; default all")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def setup(args: argparse.Namespace) -> tuple[LlavaSpec, torch.dtype, str]:
    """Apply --threads; the model shapes and dtype the flags ask for, and the device's name for the header."""
    if args.threads:
        torch.set_num_threads(args.threads)
    spec, dtype = (LLAVA_7B_SPEC, torch.float16) if args.llava_7b else (CPU_SPEC, torch.bfloat16)
    dtype = TORCH_DTYPES[args.dtype] if args.dtype else dtype
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return spec, dtype, device_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_arguments(parser, repeats=3)
    args = parser.parse_args()
    spec, dtype, device_name = setup(args)
    print(f"# prefill benchmark {datetime.date.today()} on {device_name}; vision {spec.vision_hidden}x{spec.vision_layers}, "
          f"LLM {spec.llm_hidden}x{spec.llm_layers}, {dtype}, batch {args.rows}, median of {args.repeats}")
    print(HEADER)
    run(spec, dtype, args.device, args.rows, args.repeats, args.methods.split(","))


if __name__ == "__main__":
    main()
