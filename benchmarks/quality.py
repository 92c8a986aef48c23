"""Quality table of the reference model: every method x budget on the held-out scene benchmark.

    python -m benchmarks.quality [--model DIR] [--methods a,b:param=value] [--questions N] [--captions N] [--json FILE]

Scores the unreduced model once, then each method at 1/3, 2/9 and 1/9 of the full visual count (the
ratios of 192 / 128 / 64 of 576) through `reference.benchmark.run` (the same code as `jobs/evaluate.py`),
and prints a markdown table of VQA accuracy, caption F1 and their retention. `random` is the floor and
`object-oracle` (keeps the patches the objects cover, from the ground truth) the ceiling of selection.
Budgets a method cannot meet on this model (an LLM-side method pruning at layer K cannot average below
K/L of the tokens) are printed as skipped with the reason. A method may carry hyperparameters to compare variants,
`name:param=value[:param=value]` (values read as Python literals, e.g. `tokencarve:fp64_eigh=True`); the table
labels its rows with that spec.
"""
from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

import torch

import reducers
from reducers.shape import ModelShape
from reference import benchmark
from reference.model import REFERENCE_MODEL_DIR, load_reference

RATIOS = {"1/3": 1 / 3, "2/9": 2 / 9, "1/9": 1 / 9}
HEADER = ("| method | budget | visual tokens | VQA accuracy | retention | caption F1 | retention |\n"
          "|---|---|---|---|---|---|---|")


def parse_spec(spec: str) -> tuple[str, dict]:
    """`name` or `name:param=value[:param=value ...]` -> (name, params); a value is read as a Python literal
    (True, 0.5, 3) where it is one, else kept as a string. Unknown methods or parameters raise ValueError."""
    name, *pairs = spec.split(":")
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"bad parameter {pair!r} in method spec {spec!r}: expected name:param=value")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    benchmark.method_named(name, **params)  # fails here, before any scoring, naming what is allowed
    return name, params


def row(result: dict, label: str, tokens: int | str) -> str:
    return (f"| {result['spec']} | {label} | {tokens} | {100 * result['vqa_accuracy']:.1f} % | "
            f"{100 * result['retention_vqa']:.1f} % | {result['caption_f1']:.3f} | "
            f"{100 * result['retention_caption']:.1f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    listed = [m for m in reducers.available() if m != "none"] + ["object-oracle"]
    parser.add_argument("--methods", default=",".join(listed),
                        help="comma-separated methods, each optionally with hyperparameters as "
                             "name:param=value[:param=value] (default: every listed one but none, and object-oracle)")
    parser.add_argument("--questions", type=int, default=benchmark.DEFAULT_QUESTIONS)
    parser.add_argument("--captions", type=int, default=benchmark.DEFAULT_CAPTIONS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args()
    try:
        specs = [(spec, *parse_spec(spec)) for spec in args.methods.split(",")]
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_reference(args.model)
    full = ModelShape.from_config(model.config).patches
    common = dict(questions=args.questions, captions=args.captions, batch_size=args.batch_size)
    started = time.time()
    unreduced = benchmark.run(model, processor, "none", **common)
    results = [{**benchmark.with_retention(unreduced, unreduced), "spec": "none"}]
    lines = [HEADER, row(results[0], "full", full)]
    print(lines[-1], flush=True)
    for spec, method, params in specs:
        for label, ratio in RATIOS.items():
            tokens = round(ratio * full)
            try:
                reducers.validate(model.config, benchmark.method_named(method, **params), tokens)
            except ValueError as error:
                print(f"skipped {spec} at {label}: {error}", flush=True)
                lines.append(f"| {spec} | {label} | {tokens} | not reachable | | | |")
                continue
            result = {**benchmark.with_retention(
                benchmark.run(model, processor, method, visual_tokens=tokens, params=params, **common), unreduced),
                "spec": spec}
            results.append(result)
            lines.append(row(result, label, tokens))
            print(lines[-1], f"({time.time() - started:.0f}s)", flush=True)
    print(f"\n{args.questions} questions, {args.captions} captions, model {args.model}\n")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
