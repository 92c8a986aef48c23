"""The planner checked against reality: plan on a sample of held-out scenes, then run the recommended configuration and
others as real full jobs over every row, and compare. Prints, per configuration: the predicted and the measured
device seconds per image (target: within 15 %), the predicted agreement's interval and the full run's agreement
(target: inside it), and accuracy against the scenes' true captions; then the correlation, across configurations,
between label-free agreement with none and accuracy retention (accuracy / none's accuracy); last, `none`'s full run
repeated, whose ratio to its first run is this machine's own reproducibility over the check (no cost prediction can
be surer than that).

    scripts/netns-run .venv/bin/python benchmarks/planner_check.py [--rows 400] [--sample 100] [--full 3]
        [--methods visionzip,fastv,ficoco-v] [--ratios 0.33,0.11] [--floor 0.9]

Every job runs through the real entry points (jobs/plan.py, jobs/caption.py) with the bundled model, one actor.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import agreement  # noqa: E402
from reference import scenes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIRST_SEED = 70_000_000  # held out: far from the seeds the reference model was trained on


def run(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed:\n{done.stderr[-3000:]}")


def full_run(data: Path, out: Path, entry: dict) -> dict[str, dict]:
    budget = [] if entry["ratio"] is None else ["--reducer", entry["reducer"], "--ratio", str(entry["ratio"])]
    run("caption.py", "--input", str(data), "--output", str(out), "--dtype", "fp32", *budget)
    results = {r["id"]: r for r in pq.read_table(out / "results").to_pylist()}
    costs = pq.read_table(out / "costs").to_pylist()
    seconds = sum(c["device_seconds"] for c in costs) / sum(c["n_rows"] - c["n_errors"] for c in costs)
    return {"results": results, "seconds_per_image": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--sample", type=int, default=100)
    parser.add_argument("--full", type=int, default=3, help="configurations run in full: the recommendation, then "
                                                            "the cheapest others")
    parser.add_argument("--methods", default="visionzip,fastv,ficoco-v")
    parser.add_argument("--ratios", default="0.33,0.11")
    parser.add_argument("--floor", type=float, default=0.9)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="planner-check-"))
    data, plan_dir = work / "data", work / "plan"
    data.mkdir()
    for shard in range(4):
        seeds = range(FIRST_SEED + shard * args.rows // 4, FIRST_SEED + (shard + 1) * args.rows // 4)
        scenes.write_parquet(data / f"part-{shard}.parquet", seeds)
    truth = {r["id"]: r["caption"] for r in pq.read_table(data).to_pylist()}
    run("plan.py", "--input", str(data), "--output", str(plan_dir), "--methods", args.methods, "--ratios", args.ratios,
        "--sample", str(args.sample), "--quality-floor", str(args.floor), "--reference-column", "caption",
        "--dtype", "fp32")
    plan = json.loads((plan_dir / "plan.json").read_text())
    entries = {e["label"]: e for e in plan["configurations"]}
    print(f"plan: {plan['sample_rows']} of {plan['dataset_rows']:.0f} rows, {len(entries)} configurations, "
          f"recommended {(plan['recommendation'] or {}).get('label')}")

    # Accuracy retention against agreement, over every planned configuration (sample figures).
    none_accuracy = entries["none"]["accuracy"]
    reduced = [e for e in entries.values() if e["reducer"] != "none"]
    correlation = np.corrcoef([e["agreement"] for e in reduced], [e["accuracy"] / none_accuracy for e in reduced])[0, 1]
    print(f"agreement with none vs accuracy retention across {len(reduced)} configurations: "
          f"Pearson r = {correlation:.3f}")

    chosen = [plan["recommendation"]["label"]] if plan["recommendation"] else []
    others = sorted((e for e in reduced if e["label"] not in chosen), key=lambda e: e["cost_per_1000_images_usd"])
    labels = ["none", *chosen, *[e["label"] for e in others][:args.full - len(chosen)]]
    full = {label: full_run(data, work / label.replace("@", "_").replace("=", "_"), entries[label])
            for label in labels}
    metric = agreement.METRICS["caption"]
    unreduced = full["none"]["results"]
    print("| configuration | predicted s/image | measured s/image | ratio | predicted agreement (95 % CI) | "
          "full-run agreement | inside | full-run accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for label in labels:
        e, f = entries[label], full[label]
        scores = [metric(r["text"], unreduced[i]["text"]) for i, r in f["results"].items()]
        agree = float(np.mean(scores))
        accuracy = float(np.mean([metric(r["text"], truth[i]) for i, r in f["results"].items()]))
        low, high = e["agreement_ci"]
        ratio = e["device_seconds_per_image"] / f["seconds_per_image"]
        print(f"| {label} | {e['device_seconds_per_image']:.4f} | {f['seconds_per_image']:.4f} | {ratio:.2f} | "
              f"{e['agreement']:.3f} ({low:.3f}-{high:.3f}) | {agree:.3f} | {'yes' if low <= agree <= high else 'NO'} | "
              f"{accuracy:.3f} |")
    # The same job again, last: how far this machine's own speed moved over the check (the floor under any cost
    # prediction's error here; a shared VM's speed drifts with its neighbours).
    again = full_run(data, work / "none-again", entries["none"])["seconds_per_image"]
    print(f"none run again after the others: {again:.4f} s/image, {full['none']['seconds_per_image'] / again:.2f}x "
          f"its first full run")
    if chosen:
        label = chosen[0]
        agree = float(np.mean([metric(r["text"], unreduced[i]["text"]) for i, r in full[label]["results"].items()]))
        print(f"recommendation {label} on the full run: agreement {agree:.3f} against the floor {args.floor} "
              f"({'meets' if agree >= args.floor else 'MISSES'} it)")
    print(f"files: {work}")


if __name__ == "__main__":
    main()
