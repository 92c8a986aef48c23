"""The planner's files under PLAN_DIR: plan.json (every figure), plan.md (a table sorted by cost), pareto.png
(cost against agreement) and job.yaml (the recommended configuration, runnable with `--config`)."""
from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import pyarrow.fs as pafs
import yaml

from pipeline.config import JobConfig

# Settings that belong to one run rather than to the configuration: the user gives them with the real job.
RUN_SETTINGS = ("task", "input", "output", "overwrite")


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def markdown(plan: dict[str, Any]) -> str:
    """plan.md: one line per configuration, cheapest first; * marks the Pareto front, -> the recommendation."""
    chosen = (plan["recommendation"] or {}).get("label")
    lines = [f"# Plan: {plan['task']} with {plan['model']} on {plan['dataset_rows']:.0f} rows "
             f"(sample of {plan['sample_rows']}, agreement metric: {plan['metric']})", "",
             "| | configuration | agreement (95 % CI) | accuracy | device s / image | $ / 1000 images | "
             "projected $ | projected hours |", "|---|---|---|---|---|---|---|---|"]
    for e in sorted(plan["configurations"], key=lambda e: e["cost_per_1000_images_usd"]):
        mark = ("->" if e["label"] == chosen else "") + ("*" if e["pareto"] else "")
        accuracy = "" if e["accuracy"] is None else f"{e['accuracy']:.3f}"
        agree = "-" if e["agreement"] is None else f"{e['agreement']:.3f}"
        lines.append(f"| {mark} | {e['label']} | {agree} ({e['agreement_ci'][0]:.3f}-"
                     f"{e['agreement_ci'][1]:.3f}) | {accuracy} | {e['device_seconds_per_image']:.4f} | "
                     f"{e['cost_per_1000_images_usd']:.4g} | {e['projected_cost_usd']:.4g} | {e['projected_hours']:.3g} |")
    lines += ["", "-> recommended, * on the Pareto front (no configuration is both cheaper and more agreeing)."]
    for s in plan["skipped"]:
        lines.append(f"- skipped {s['reducer']} at ratio {s['ratio']}: {s['reason']}")
    return "\n".join(lines) + "\n"


def pareto_png(plan: dict[str, Any]) -> bytes:
    """Cost per 1,000 images against agreement, one series per method, the front drawn, the floor as a line and
    the recommendation circled."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    entries = [e for e in plan["configurations"] if e["agreement"] is not None]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for reducer in sorted({e["reducer"] for e in entries}):
        # Along the ratios, so each line is the method's own trade-off curve.
        mine = sorted((e for e in entries if e["reducer"] == reducer), key=lambda e: e["ratio"] or 1.0)
        axes.plot([e["cost_per_1000_images_usd"] for e in mine], [e["agreement"] for e in mine], "o-", label=reducer)
        for e in mine:
            if e["ratio"] is not None:
                axes.annotate(f"{e['ratio']:g}", (e["cost_per_1000_images_usd"], e["agreement"]), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
    front = sorted((e for e in entries if e["pareto"]), key=lambda e: e["cost_per_1000_images_usd"])
    axes.step([e["cost_per_1000_images_usd"] for e in front], [e["agreement"] for e in front], "k--", where="post",
              linewidth=1, label="Pareto front")
    axes.axhline(plan["constraints"]["quality_floor"], color="red", linewidth=1, label="quality floor")
    if plan["recommendation"]:
        r = plan["recommendation"]
        axes.plot(r["cost_per_1000_images_usd"], r["agreement"], "o", markersize=16, markerfacecolor="none",
                  markeredgecolor="black", label=f"recommended: {r['label']}")
    axes.set_xlabel("USD per 1,000 images (measured on the sample)")
    axes.set_ylabel(f"agreement with none ({plan['metric']})")
    axes.set_title(f"{plan['task']}: {plan['sample_rows']} sampled rows of {plan['dataset_rows']:.0f}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def job_yaml(job: JobConfig, recommendation: dict[str, Any]) -> str:
    """The job's settings with the recommended reducer and budget, for `jobs/<task>.py --config job.yaml`."""
    settings = {k: v for k, v in job.settings().items() if k not in RUN_SETTINGS}
    settings.update(reducer=recommendation["reducer"], visual_tokens=recommendation["visual_tokens"],
                    ratio=recommendation["ratio"], batch_size=recommendation["batch_size"])
    return yaml.safe_dump({k.replace("_", "-"): v for k, v in settings.items() if v is not None}, sort_keys=False)


def write_plan(fs: pafs.FileSystem, root: str, plan: dict[str, Any], job: JobConfig) -> None:
    _write(fs, posixpath.join(root, "plan.json"), json.dumps(plan, indent=2).encode())
    _write(fs, posixpath.join(root, "plan.md"), markdown(plan).encode())
    _write(fs, posixpath.join(root, "pareto.png"), pareto_png(plan))
    job_file = posixpath.join(root, "job.yaml")
    if plan["recommendation"]:
        _write(fs, job_file, job_yaml(job, plan["recommendation"]).encode())
    elif fs.get_file_info(job_file).type == pafs.FileType.File:
        fs.delete_file(job_file)  # an earlier plan's recommendation must not outlive this one


def summary_lines(plan: dict[str, Any], output: str) -> str:
    """What the planner prints: the recommendation against none, and where the files are."""
    none = next(e for e in plan["configurations"] if e["reducer"] == "none")
    r = plan["recommendation"]
    rows = f"{plan['dataset_rows']:.0f}" + ("" if plan["dataset_rows_exact"] else " (estimated)")
    lines = [f"{len(plan['configurations'])} configurations measured on {plan['sample_rows']} of {rows} rows"]
    if r:
        lines.append(f"recommended: {r['label']}: agreement {r['agreement']:.3f} (95 % CI {r['agreement_ci'][0]:.3f}-"
                     f"{r['agreement_ci'][1]:.3f}), ${r['projected_cost_usd']:.4g} in {r['projected_hours']:.3g} h "
                     f"against none's ${none['projected_cost_usd']:.4g} in {none['projected_hours']:.3g} h")
        lines.append(f"run it: python jobs/{plan['task']}.py --config {output}/job.yaml --input ... --output ...")
    else:
        near = plan["nearest"]
        lines.append(f"no configuration meets the floor, the budget and the deadline together; cheapest meeting the "
                     f"floor: {near['cheapest_meeting_floor']}; most agreeing within budget and deadline: "
                     f"{near['most_agreeing_within_budget_and_deadline']}")
    lines.append(f"plan: {output}/plan.md, plan.json, pareto.png" + (", job.yaml" if r else ""))
    return "\n".join(lines)
