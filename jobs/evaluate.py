"""Score a reduction method at a budget on the held-out scene benchmark, against the unreduced model.

    python jobs/evaluate.py --reducer ficoco-v --ratio 0.111 [--model PATH] [--visual-tokens N]
        [--seed-start S] [--questions N] [--captions N] [--batch-size B] [--json FILE]

Defaults: the shipped reference model, the held-out seed range, the full benchmark (2,100 questions,
500 captions). Prints accuracy per task, overall accuracy, caption F1 and retention (= score / the
unreduced model's score on the same items); --json writes the same as one object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reducers  # noqa: E402
from pipeline.flags import add_flags  # noqa: E402
from pipeline.config import flag_setting  # noqa: E402
from reference import benchmark  # noqa: E402
from reference.benchmark import EVALUATE_GROUPS, EvaluateConfig  # noqa: E402
from reference.model import load_reference  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, EvaluateConfig, EVALUATE_GROUPS, exclusive=("visual_tokens", "ratio"), typed=True)
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"no model at {args.model} (config.json missing); train one with jobs/train_reference.py "
                     "and pass --model DIR")
    try:  # the method and budget against the model's config, before any weights load
        reducers.validate(AutoConfig.from_pretrained(args.model), benchmark.method_named(args.reducer),
                          args.visual_tokens, args.ratio)
    except reducers.BudgetError as e:
        parser.error(f"--reducer {args.reducer}: {e.render(flag_setting)}")
    except ValueError as e:
        parser.error(f"--reducer {args.reducer}: {e}")
    return args


def report(result: dict) -> str:
    budget = "" if not reducers.takes_budget(result["reducer"]) else (
        f" at {result['visual_tokens']} visual tokens" if result["visual_tokens"] else f" at ratio {result['ratio']}")
    lines = [f"{result['reducer']}{budget}: {result['questions']} questions, {result['captions']} captions, "
             f"seeds from {result['seed_start']}"]
    unreduced = result["unreduced"]["per_task"]
    for task, accuracy in result["per_task"].items():
        lines.append(f"  {task:<16} {accuracy:7.1%}   (unreduced {unreduced[task]:.1%})")
    lines.append(f"  {'VQA accuracy':<16} {_percent(result['vqa_accuracy'])}   retention {_percent(result['retention_vqa'])}")
    lines.append(f"  {'caption F1':<16} {_fixed(result['caption_f1'])}   retention {_percent(result['retention_caption'])}")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "    n/a" if value is None else f"{value:7.1%}"


def _fixed(value: float | None) -> str:
    return "    n/a" if value is None else f"{value:7.3f}"


def reuse_unreduced(args: argparse.Namespace) -> dict:
    """The unreduced scores from an earlier run, refused unless it scored the same model on the same items."""
    earlier = json.loads(args.unreduced.read_text())
    same = {"model": args.model, "reducer": "none", "seed_start": args.seed_start, "questions": args.questions,
            "captions": args.captions}
    differing = {k: (earlier.get(k), v) for k, v in same.items() if earlier.get(k) != v}
    if differing:
        raise SystemExit(f"--unreduced {args.unreduced} is not a `none` run of this model on these items: "
                         + ", ".join(f"{k} {old!r} != {new!r}" for k, (old, new) in differing.items()))
    return earlier


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_reference(args.model)
    common = dict(seed_start=args.seed_start, questions=args.questions, captions=args.captions,
                  batch_size=args.batch_size)
    unreduced = reuse_unreduced(args) if args.unreduced else benchmark.run(model, processor, "none", **common)
    reduced = unreduced if args.reducer == "none" else benchmark.run(
        model, processor, args.reducer, visual_tokens=args.visual_tokens, ratio=args.ratio, **common)
    result = {"model": args.model, **benchmark.with_retention(reduced, unreduced)}
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
