"""The planner: run a sample of the user's own data through the real job pipeline for `none` and every method x
ratio, measure each configuration's agreement with `none` and its cost per image, project both onto the whole
dataset, and recommend the cheapest configuration that meets the quality floor, the budget and the deadline.

    count + draw the sample (pipeline/sample.py) -> PLAN_DIR/sample/sample.parquet
    -> the job's stages, one actor pool, every configuration on every batch (one model load for the sweep)
    -> agreement with none (pipeline/agreement.py) and ledger costs per configuration
    -> projections, recommendation -> PLAN_DIR/plan.json, plan.md, job.yaml (pipeline/plan_report.py)
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import agreement
from pipeline.config import (AUTO, GROUPS, TASKS, ConfigError, Configuration, JobConfig, _opt, add_flags,
                             build_parser, flag, job_config)
from pipeline.sample import RowCount, count_rows, draw, read_sample
from pipeline.sources import list_shards, open_uri

DEFAULT_RATIOS = (1.0, 0.5, 0.33, 0.22, 0.11)
BOOTSTRAP_RESAMPLES = 2000
# Job settings the planner chooses or that belong to one run of a job, so jobs/plan.py has no flag for them.
SWEPT = ("reducer", "visual_tokens", "ratio", "audit_share", "audit_seed", "overwrite", "retry_errors", "dry_run",
         "max_cost_usd")


@dataclass
class PlanConfig:
    """The planner's own settings; everything else (input, model, prompts, batch size, actors, price) is the
    JobConfig that the recommended job will run with, so the two share their flags."""
    methods: tuple[str, ...] = _opt(("all",), "reducers to try besides none: all, or a comma-separated list",
                                    "all|A,B,...", group="planner")
    ratios: tuple[float, ...] = _opt(DEFAULT_RATIOS, "budgets to try, as fractions of each image's visual tokens",
                                     "R,R,...", group="planner")
    sample: int = _opt(300, "rows drawn uniformly at random from the whole input", "N", group="planner")
    seed: int = _opt(0, "seeds the sample and the bootstrap of the cost intervals", "S", group="planner")
    quality_floor: float = _opt(0.97, "lowest agreement with the unreduced model (lower end of its 95 % interval) "
                                      "that a recommendation may have", "F", group="planner")
    budget_usd: float | None = _opt(None, "most the whole job may cost, in USD (default: no limit)", "USD", group="planner")
    deadline: float | None = _opt(None, "hours the whole job may take on --actors MAX actors (default: no limit)",
                                  "HOURS", group="planner")
    reference_column: str | None = _opt(None, "ground truth in the input (Parquet column / WebDataset json field): "
                                              "also report accuracy against it (default: none)", "NAME", group="planner")

    def method_names(self) -> list[str]:
        import reducers

        return [m for m in reducers.available() if m != "none"] if self.methods == ("all",) else list(self.methods)


@dataclass
class Measured:
    """One configuration's figures on the sample."""
    configuration: Configuration
    rows: int                              # rows scored (no error in this configuration nor in none)
    errors: int
    agreement: float | None                # None when no row could be scored (every row failed)
    agreement_ci: tuple[float, float]
    accuracy: float | None                 # against --reference-column
    accuracy_ci: tuple[float, float] | None
    device_seconds_per_image: float
    device_seconds_ci: tuple[float, float]
    flops_per_image: float
    visual_tokens_kept_per_image: float


def configurations(model_config, plan: PlanConfig) -> tuple[list[Configuration], list[dict[str, Any]]]:
    """`none` plus every feasible method x ratio, and the skipped ones with the reason."""
    import reducers

    chosen, skipped = [Configuration("none")], []
    for method in plan.method_names():
        for ratio in plan.ratios:
            try:
                reducers.validate(model_config, method, ratio=ratio)
            except ValueError as e:
                skipped.append({"reducer": method, "ratio": ratio, "reason": str(e)})
                continue
            chosen.append(Configuration(method, ratio=ratio))
    return chosen, skipped


def sweep(job: JobConfig, sample_uri: str, chosen: list[Configuration]) -> tuple[list[dict], float, float]:
    """Every sample row through every configuration, in the job's own stages. Returns the output rows (with their
    ledger rows parsed under `cost`), the seconds until the first batch came back (start-up: Ray, actors, model
    load) and the whole sweep's seconds."""
    import json

    import ray

    from pipeline.job import build_dataset

    fs, root = open_uri(sample_uri, "--output")
    sample_job = dataclasses.replace(job, input=sample_uri, format="parquet", id_column="id", image_column="image",
                                     question_column="question")
    shards = list_shards(fs, root, sample_job)
    ray.init(ignore_reinit_error=True)
    started = time.monotonic()
    first = None
    rows: list[dict] = []
    for out in build_dataset(sample_job, fs, shards, chosen).iter_batches(batch_size=None, batch_format="pyarrow"):
        first = first if first is not None else time.monotonic() - started
        for row in out.to_pylist():
            row["cost"] = json.loads(row["cost"]) if row["cost"] else None
            rows.append(row)
    return rows, first or 0.0, time.monotonic() - started


def _ratio_interval(numerators: np.ndarray, denominators: np.ndarray, seed: int) -> tuple[float, float]:
    """95 % bootstrap interval of sum(numerators) / sum(denominators), resampling batches."""
    if len(numerators) < 2:
        value = float(numerators.sum() / max(denominators.sum(), 1))
        return value, value
    picks = np.random.default_rng(seed).integers(0, len(numerators), (BOOTSTRAP_RESAMPLES, len(numerators)))
    ratios = numerators[picks].sum(axis=1) / np.maximum(denominators[picks].sum(axis=1), 1)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(low), float(high)


def steady_batches(ledger: list[dict], batch_size: int) -> list[dict]:
    """The ledger rows that price a long job: full batches, without each actor's first batch of the configuration
    (it pays one-off warm-up) - as far as at least two batches remain; else every batch."""
    by_actor: dict[str, list[dict]] = {}
    for batch in sorted(ledger, key=lambda b: b["batch_id"]):
        by_actor.setdefault(batch["actor"], []).append(batch)
    steady = [b for batches in by_actor.values() for b in batches[1:] if b["n_rows"] == batch_size]
    return steady if len(steady) >= 2 else ledger


def measure(rows: list[dict], chosen: list[Configuration], sample_reference: dict[str, str | None], task: str,
            batch_size: int, seed: int) -> list[Measured]:
    """Agreement with none and cost per image of each configuration, from the sweep's rows and ledger; a
    configuration with its own batch size (--batch-size auto) is priced at it, the others at `batch_size`."""
    metric = agreement.METRICS[task]
    by_label: dict[str, dict[str, dict]] = {c.label: {} for c in chosen}
    for row in rows:
        by_label[row["configuration"]][row["id"]] = row
    unreduced = by_label["none"]
    measured = []
    for c in chosen:
        outputs = by_label[c.label]
        scored = [i for i, r in outputs.items() if r["error"] is None and unreduced[i]["error"] is None]
        # none is the reference itself: its agreement is 1 by definition, not an estimate with an interval.
        agree, agree_ci = (1.0, (1.0, 1.0)) if c.reducer == "none" else agreement.mean_with_interval(
            [metric(outputs[i]["text"], unreduced[i]["text"]) for i in scored])
        labelled = [i for i in scored if sample_reference.get(i) is not None]
        accuracy, accuracy_ci = (agreement.mean_with_interval([metric(outputs[i]["text"], sample_reference[i])
                                                               for i in labelled]) if labelled else (None, None))
        ledger = steady_batches([r["cost"] for r in outputs.values() if r["cost"] is not None],
                                c.batch_size or batch_size)
        seconds = np.array([b["device_seconds"] for b in ledger])
        images = np.array([b["n_rows"] - b["n_errors"] for b in ledger], dtype=np.float64)
        n_images = max(images.sum(), 1)
        measured.append(Measured(
            configuration=c, rows=len(scored), errors=sum(r["error"] is not None for r in outputs.values()),
            agreement=agree, agreement_ci=agree_ci, accuracy=accuracy, accuracy_ci=accuracy_ci,
            device_seconds_per_image=float(seconds.sum() / n_images),
            device_seconds_ci=_ratio_interval(seconds, images, seed),
            flops_per_image=sum(b["flops_total"] for b in ledger) / n_images,
            visual_tokens_kept_per_image=sum(b["visual_tokens_kept"] for b in ledger) / n_images))
    return measured


@dataclass
class Projection:
    """What the whole job would cost and take in one configuration; (low, high) are 95 % intervals combining the
    sample's cost-per-image interval with the row count's."""
    cost_per_1000_images_usd: float
    projected_cost_usd: float
    projected_cost_ci: tuple[float, float]
    projected_hours: float
    projected_hours_ci: tuple[float, float]


def project(m: Measured, count: RowCount, job: JobConfig, overhead: float, startup_s: float) -> Projection:
    """Device-hours priced at --price-per-gpu-hour; wall-clock on --actors MAX actors, stretched by the pipeline
    overhead measured in the sweep, plus its start-up."""
    price, actors = job.price_per_gpu_hour, job.actors[1]

    def cost(seconds_per_image: float, rows: float) -> float:
        return seconds_per_image * rows / 3600 * price

    def hours(seconds_per_image: float, rows: float) -> float:
        return (seconds_per_image * rows * overhead / actors + startup_s) / 3600

    (s_low, s_high), (r_low, r_high) = m.device_seconds_ci, count.interval
    s, rows = m.device_seconds_per_image, count.total
    return Projection(cost_per_1000_images_usd=cost(s, 1000), projected_cost_usd=cost(s, rows),
                      projected_cost_ci=(cost(s_low, r_low), cost(s_high, r_high)),
                      projected_hours=hours(s, rows), projected_hours_ci=(hours(s_low, r_low), hours(s_high, r_high)))


def recommend(entries: list[dict[str, Any]], plan: PlanConfig) -> tuple[dict | None, dict[str, Any]]:
    """The cheapest entry whose agreement's lower bound meets the floor and whose projection fits the budget and
    the deadline; else None and the nearest options on each side (the cheapest meeting the floor, the most
    agreeing one within budget and deadline)."""
    def meets_floor(e: dict) -> bool:
        return e["agreement_ci"][0] >= plan.quality_floor

    def fits(e: dict) -> bool:
        return ((plan.budget_usd is None or e["projected_cost_usd"] <= plan.budget_usd)
                and (plan.deadline is None or e["projected_hours"] <= plan.deadline))

    by_cost = sorted(entries, key=lambda e: e["cost_per_1000_images_usd"])
    chosen = next((e for e in by_cost if meets_floor(e) and fits(e)), None)
    nearest = {"cheapest_meeting_floor": next((e["label"] for e in by_cost if meets_floor(e)), None),
               "most_agreeing_within_budget_and_deadline": max(
                   (e for e in entries if fits(e)), key=lambda e: e["agreement_ci"][0], default={}).get("label")}
    return chosen, nearest


def pareto_labels(entries: list[dict[str, Any]]) -> set[str]:
    """Entries no other entry beats on both cost per image (lower) and agreement (higher)."""
    front = set()
    entries = [e for e in entries if e["agreement"] is not None]
    for e in entries:
        if not any(o["cost_per_1000_images_usd"] <= e["cost_per_1000_images_usd"] and o["agreement"] >= e["agreement"]
                   and (o["cost_per_1000_images_usd"], o["agreement"]) != (e["cost_per_1000_images_usd"], e["agreement"])
                   for o in entries):
            front.add(e["label"])
    return front


def run(job: JobConfig, plan: PlanConfig) -> dict[str, Any]:
    """The whole planner; returns plan.json's contents (also written, with the other files, under job.output)."""
    from pipeline.job import check_instruction, fit_batch, load_model_config
    from pipeline.plan_report import write_plan
    from pipeline.sinks import ShardSink

    # Everything that can refuse the plan, before Ray starts or any weights load.
    model_config = load_model_config(job.model)
    check_instruction(job)
    chosen, skipped = configurations(model_config, plan)
    if job.batch_size == AUTO:  # each configuration at its own largest batch; the pipeline's blocks hold the largest
        chosen = [dataclasses.replace(c, batch_size=fit_batch(job, model_config, c).batch_size) for c in chosen]
        job = dataclasses.replace(job, batch_size=max(c.batch_size for c in chosen))
    input_fs, root = open_uri(job.input, "--input")
    output_fs, output_root = open_uri(job.output, "--output")
    ShardSink(output_fs, output_root, "none", job.task, job.io_retry_seconds).check_writable(job.output)
    shards = list_shards(input_fs, root, job)
    count = count_rows(input_fs, shards, plan.seed, job.io_retry_seconds)
    sample = read_sample(input_fs, shards, draw(count, plan.sample, plan.seed), job, plan.reference_column)
    sample_folder = f"{output_root.rstrip('/')}/sample"
    output_fs.create_dir(sample_folder, recursive=True)
    pq.write_table(sample, f"{sample_folder}/sample.parquet", filesystem=output_fs)
    sample_uri = job.output.rstrip("/") + "/sample/sample.parquet"

    rows, startup_s, sweep_s = sweep(job, sample_uri, chosen)
    references = dict(zip(sample.column("id").to_pylist(), sample.column("reference").to_pylist()))
    measured = measure(rows, chosen, references, job.task, job.batch_size, plan.seed)
    busy = sum(m.device_seconds_per_image * (m.rows + m.errors) for m in measured)
    # Wall-clock per device-second of work, beyond start-up: reads, decoding and hand-offs the actors wait on.
    overhead = max(1.0, (sweep_s - startup_s) * job.actors[1] / busy) if busy else 1.0
    entries = []
    for m in measured:
        projection = project(m, count, job, overhead, startup_s)
        entries.append({
            "label": m.configuration.label, "reducer": m.configuration.reducer,
            "visual_tokens": m.configuration.visual_tokens, "ratio": m.configuration.ratio,
            "batch_size": m.configuration.batch_size or job.batch_size, "rows": m.rows, "errors": m.errors,
            "agreement": m.agreement, "agreement_ci": list(m.agreement_ci),
            "accuracy": m.accuracy, "accuracy_ci": list(m.accuracy_ci) if m.accuracy_ci else None,
            "device_seconds_per_image": m.device_seconds_per_image,
            "device_seconds_per_image_ci": list(m.device_seconds_ci),
            "flops_per_image": m.flops_per_image, "visual_tokens_kept_per_image": m.visual_tokens_kept_per_image,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(projection).items()}})
    front = pareto_labels(entries)
    for e in entries:
        e["pareto"] = e["label"] in front
    recommendation, nearest = recommend(entries, plan)
    result = {
        "dataset_rows": count.total, "dataset_rows_ci": list(count.interval), "dataset_rows_exact": count.exact,
        "sample_rows": sample.num_rows, "seed": plan.seed, "task": job.task, "model": job.model,
        "metric": agreement.METRICS[job.task].__name__,
        "constraints": {"quality_floor": plan.quality_floor, "budget_usd": plan.budget_usd,
                        "deadline_hours": plan.deadline, "actors": job.actors[1],
                        "price_per_gpu_hour": job.price_per_gpu_hour},
        "measured": {"startup_seconds": startup_s, "sweep_seconds": sweep_s, "pipeline_overhead": overhead},
        "configurations": entries, "skipped": skipped,
        "recommendation": recommendation, "nearest": None if recommendation else nearest,
    }
    write_plan(output_fs, output_root, result, job)
    return result


def check(plan: PlanConfig) -> None:
    """Checks of the planner's own settings that need no I/O; raises ConfigError."""
    import reducers

    unknown = sorted(set(plan.method_names()) - set(reducers.available()))
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; available: all or "
                          f"{','.join(m for m in reducers.available() if m != 'none')}")
    if not plan.ratios or any(not 0 < r <= 1 for r in plan.ratios):
        raise ConfigError(f"--ratios must be fractions in (0, 1], got {','.join(map(str, plan.ratios))}")
    if plan.sample < 1:
        raise ConfigError("--sample must be at least 1")
    if not 0 <= plan.quality_floor <= 1:
        raise ConfigError(f"--quality-floor must be in [0, 1], got {plan.quality_floor}")
    for name in ("budget_usd", "deadline"):
        value = getattr(plan, name)
        if value is not None and (math.isnan(value) or value <= 0):
            raise ConfigError(f"{flag(name)} must be positive, got {value}")


def build_plan_parser():
    """The job's flags, but those the planner chooses, plus the planner's own."""
    parser = build_parser("plan", skip=SWEPT)
    parser.description = ("trimlens planner: measure none and every method x ratio on a sample of the input, project "
                          "each onto the whole job, recommend the cheapest configuration meeting the quality floor, "
                          "budget and deadline; writes plan.json, plan.md, pareto.png and job.yaml under --output. "
                          "Exit status 2: refused before it started.")
    parser.add_argument("--task", choices=TASKS, help="caption or vqa: the job to plan (default: caption)")
    add_flags(parser, PlanConfig, GROUPS)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, PlanConfig]:
    """jobs/plan.py's flags -> (the job to plan, the planner's settings); raises ConfigError for settings that must
    not start a plan."""
    flags = vars(build_plan_parser().parse_args(argv))
    task = flags.pop("task", "caption")
    plan_flags = {f.name: flags.pop(f.name) for f in dataclasses.fields(PlanConfig) if f.name in flags}
    job = job_config(task, flags)
    plan = PlanConfig(**{k: _plan_value(k, v) for k, v in plan_flags.items()})
    check(plan)
    return job, plan


def _plan_value(name: str, text: str) -> Any:
    """A planner flag's text as its field's type."""
    try:
        if name == "methods":
            return tuple(m.strip() for m in text.split(",") if m.strip())
        if name == "ratios":
            return tuple(float(r) for r in text.split(","))
        kind = {"sample": int, "seed": int, "quality_floor": float, "budget_usd": float, "deadline": float}.get(name, str)
        return kind(text)
    except ValueError:
        raise ConfigError(f"{flag(name)} cannot read {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/plan.py (exit status 0, 2 for a refused plan, 1 for an outage; see job.entry_point)."""
    from pipeline.job import entry_point
    from pipeline.plan_report import summary_lines

    def plan_and_summarize() -> str:
        job, plan = parse_args(argv)
        return summary_lines(run(job, plan), job.output.rstrip("/"))

    return entry_point("plan.py", plan_and_summarize, "run the same command again")
