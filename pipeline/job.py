"""A whole job: refuse bad settings before anything heavy starts, then stream shards through Ray Data.

    pending shards -> read (CPU task per shard) -> decode + processor (CPU) -> model actor pool -> driver sink

torch and the model code are imported inside the functions that use them, so `--help` answers without them.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import pyarrow.fs as pafs
import ray
import ray.data

from pipeline import audit, history
from pipeline.bundled import BUNDLED_MODEL, default_prompts, resolve_model
from pipeline.config import AUTO, ConfigError, Configuration, JobConfig, flag, flag_setting, parse_args
from pipeline.decode import prepare
from pipeline.manifest import RunPlan, check_fingerprint, fingerprint, input_identities, plan_run
from pipeline.progress import Progress
from pipeline.retry import ObjectStoreUnavailable
from pipeline.sinks import ShardSink
from pipeline.sources import Shard, ShardSource, check_first_shard, list_shards, open_uri

if TYPE_CHECKING:
    from reducers.memory import BatchFit

EXIT_COST_CAP = 3  # --max-cost-usd stopped new shards from starting; what started was finished and written


class CostCapReached(Exception):
    """The job ran to the cap: its report (args[0]) is printed as usual, then the exit status is EXIT_COST_CAP."""


@dataclass
class Plan:
    """What a job will do, decided on the driver before Ray or any model starts."""
    input_fs: pafs.FileSystem
    shards: list[Shard]
    sink: ShardSink
    run: RunPlan
    pending: list[Shard]  # shards this run reads: new and changed ones whole, --retry-errors ones for their errors
    config: JobConfig     # the job's settings with --batch-size auto resolved
    memory_rule: dict[str, Any] | None  # what --batch-size auto saw and chose; None for a given batch size


def load_model_config(model: str):
    """The model's config.json (no weights); refuses a path or id that does not name a model."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model(model))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model not found or not a model: {model} ({str(e).splitlines()[0]})") from None


def check_reducer(model_config, config: JobConfig) -> None:
    import reducers

    try:
        reducers.validate(model_config, config.reducer, **config.budget())
    except reducers.BudgetError as e:  # names the budget: said as the flags that set it
        raise ConfigError(f"--reducer {config.reducer}: {e.render(flag_setting)}") from None
    except ValueError as e:
        raise ConfigError(f"--reducer {config.reducer}: {e}") from None


def fit_batch(config: JobConfig, model_config, configuration: Configuration) -> "BatchFit":
    """The memory rule (reducers/memory.py) for one configuration of this job, from the model config and the prompt's
    length alone; ConfigError naming --memory-per-actor when not even one row fits."""
    from pipeline.actor import TORCH_DTYPES
    from pipeline.decode import load_processor, prompt_text
    from reducers import memory

    processor = load_processor(config.model)
    instruction = config.prompt if config.task == "caption" else config.question
    prompt_ids = processor.tokenizer(prompt_text(processor, instruction))["input_ids"]
    text_tokens = len(prompt_ids) - 1  # the one <image> placeholder is priced as the visual tokens it expands to
    dtype_bytes = TORCH_DTYPES[config.dtype].itemsize
    given = config.memory_per_actor
    memory_bytes = given if given is not None else memory.default_memory(config.actors[1])[0]
    per_row = memory.row_memory(model_config, configuration.reducer, configuration.budget(), text_tokens,
                                config.max_new_tokens, dtype_bytes)
    fit = memory.largest_batch(memory_bytes, memory.weight_bytes(model_config, dtype_bytes), per_row)
    if fit.batch_size < 1:
        source = "" if given is not None else " (the default: set it to the actors' memory)"
        setting = " ".join([f"--reducer {configuration.reducer}",
                            *(f"{flag(k)} {v}" for k, v in configuration.budget().items())])
        raise ConfigError(f"--memory-per-actor {memory.format_size(memory_bytes)}{source} does not hold one row at "
                          f"{setting} with --batch-size auto: {memory.format_size(fit.weights)} of "
                          f"weights + {memory.format_size(per_row.total)} per row need "
                          f"{memory.format_size(fit.needed(1))}, and {memory.MARGIN:.0%} of the memory is kept free")
    return fit


def resolve_batch_size(config: JobConfig, model_config) -> tuple[JobConfig, dict[str, Any] | None]:
    """The job with --batch-size auto replaced by the memory rule's batch, and what the rule saw (for summary.json);
    a job with a number keeps it and gets None. With --audit-share the audited rows of a batch run unreduced in
    batches of the same size, so the batch must fit `none` too."""
    if config.batch_size != AUTO:
        return config, None
    fits = [fit_batch(config, model_config, config.configuration())]
    if config.audit_share > 0:
        fits.append(fit_batch(config, model_config, audit.UNREDUCED))
    fit = min(fits, key=lambda f: f.batch_size)
    rule = {"batch_size": fit.batch_size, "memory_per_actor": fit.memory, "weights_bytes": fit.weights,
            "kv_bytes_per_row": fit.per_row.kv, "activation_bytes_per_row": fit.per_row.activations}
    return replace(config, batch_size=fit.batch_size), rule


def check_instruction(config: JobConfig) -> None:
    """Refuses a --prompt (caption) or --question (vqa) with words the model's tokenizer cannot encode."""
    from pipeline.decode import load_processor, unknown_words

    try:
        tokenizer = load_processor(config.model).tokenizer
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {config.model} has no processor ({str(e).splitlines()[0]})") from None
    name = "prompt" if config.task == "caption" else "question"
    unknown = unknown_words(tokenizer, getattr(config, name))
    if unknown:
        hint = f" (its default is {default_prompts(config.model)[name]!r})" if config.model == BUNDLED_MODEL else ""
        raise ConfigError(f"--{name} has words the model {config.model} does not know: "
                          f"{', '.join(map(repr, unknown))}{hint}")


def plan(config: JobConfig) -> Plan:
    """Every check that can refuse the job (raises ConfigError), cheapest first, then the run plan (which shards
    are new, changed, unchanged, or have error rows to retry); no weights are loaded, no input shard is read but
    the first one of an empty output and the results of shards with errors to retry."""
    input_fs, root = open_uri(config.input, "--input")
    shards = list_shards(input_fs, root, config)
    output_fs, output_root = open_uri(config.output, "--output")
    sink = ShardSink(output_fs, output_root, config.configuration().label, config.task, config.io_retry_seconds)
    sink.check_writable(config.output)
    markers = {} if config.overwrite else sink.completed()
    if not markers:  # a first run: an unreadable first shard is most likely the wrong --input or --format
        check_first_shard(input_fs, shards[0], config)
    model_config = load_model_config(config.model)
    check_reducer(model_config, config)
    check_instruction(config)
    config, memory_rule = resolve_batch_size(config, model_config)
    sink.fingerprint = fingerprint(config)  # after the model checks: they name a --model that is not one
    check_fingerprint(markers, sink.fingerprint)
    sink.identities = input_identities(input_fs, shards, config.io_retry_seconds)
    run_plan = plan_run(shards, sink.identities, markers, config.retry_errors)
    if config.overwrite and not config.dry_run:
        sink.clear()
    retried = {} if config.dry_run else {name: sink.error_ids(name) for name in run_plan.retry}
    sink.merged = set(retried)
    pending = [replace(s, only_ids=retried[s.name]) if s.name in retried else s for s in run_plan.to_run]
    return Plan(input_fs, shards, sink, run_plan, pending, config, memory_rule)


def actor_resources(config: JobConfig, cluster_gpus: float) -> tuple[float, float]:
    """(GPUs, CPUs) each model actor asks Ray for."""
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if cluster_gpus > 0 else 0.0)
    # CPU-only: a fractional CPU per actor, or a 2-core machine's actors take every CPU and the reads never run.
    cpus = config.cpus_per_actor if config.cpus_per_actor is not None else (1.0 if gpus > 0 else 0.5)
    return gpus, cpus


def build_dataset(config: JobConfig, fs: pafs.FileSystem, pending: list[Shard],
                  configurations: list[Configuration] | None = None, cost_gate: Any = None) -> ray.data.Dataset:
    """The job's stages; `configurations` (the planner's sweep) runs every row through each of them."""
    from pipeline.actor import ModelActor

    gpus, cpus = actor_resources(config, ray.cluster_resources().get("GPU", 0))
    lo, hi = config.actors
    return (ray.data.read_datasource(ShardSource(fs, pending, config))
            .map_batches(prepare, fn_kwargs={"config": config}, batch_size=config.batch_size, batch_format="pyarrow")
            .map_batches(ModelActor, fn_constructor_kwargs={"config": config, "gpus": gpus, "cpus": cpus,
                                                               "configurations": configurations,
                                                               "cost_gate": cost_gate},
                         compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi), batch_size=config.batch_size,
                         batch_format="pyarrow", num_gpus=gpus, num_cpus=cpus))


def run(config: JobConfig, job: Plan | None = None) -> dict[str, Any]:
    """Run the job to the end (or resume it); returns the summary that is also written to summary.json, and adds
    the run's record to OUTPUT/runs/."""
    job = job or plan(config)
    config = job.config
    pending = job.pending
    for shard in pending:
        if shard.name not in job.sink.merged:  # changed or new: nothing of the shard's earlier outputs is kept
            job.sink.discard(shard.name)
    began = history.utc_now()
    started = time.monotonic()
    if pending:
        ray.init(ignore_reinit_error=True)
        gate = None
        if config.max_cost_usd is not None:
            from pipeline.costcap import CostGate

            gate = CostGate.remote(config.max_cost_usd)
        progress = Progress(len(job.shards), len(job.shards) - len(pending))
        try:
            for out in build_dataset(config, job.input_fs, pending, cost_gate=gate).iter_batches(
                    batch_size=None, batch_format="pyarrow"):
                finished = job.sink.add(out)
                progress.update(len(out), len(finished))
        finally:  # closed before any error line is printed, so that line stays the last one
            progress.close()
        if job.sink.unfinished():
            raise RuntimeError(f"rows lost: shards {job.sink.unfinished()} ended incomplete")
    for shard in pending:
        if shard.name not in job.sink.seen:  # a shard with no rows: complete, now that the dataset ran to its end
            job.sink.mark_empty(shard.name)
    summary = summarize(config, job, time.monotonic() - started)
    record_run(config, job, summary, began)
    return summary


def record_run(config: JobConfig, job: Plan, summary: dict[str, Any], began) -> None:
    """OUTPUT/runs/<run-id>.json: this run's figures (summary.json holds the output's totals)."""
    sink, run_plan = job.sink, job.run
    record = {"run_id": history.new_run_id(began), "start": began.isoformat(), "end": history.utc_now().isoformat(),
              "version": sink.fingerprint["version"], "fingerprint": sink.fingerprint,
              "shards": {"total": run_plan.shards, "new": len(run_plan.new), "changed": len(run_plan.changed),
                         "unchanged": len(run_plan.unchanged), "retried": len(run_plan.retry),
                         "failed": len(sink.failed), "not_started": len(sink.not_started)},
              "failed_shards": sink.failed, "not_started_shards": sorted(sink.not_started),
              "written_shards": sink.written,
              "rows": summary["rows_this_run"], "errors": summary["errors_this_run"],
              "seconds": summary["seconds"], "device_seconds": summary["device_seconds"],
              "cost_usd": summary["cost_usd"], "images_per_s": summary["images_per_s"],
              "output_rows": summary["rows"], "output_errors": summary["errors"], "settings": summary["settings"]}
    if "audit" in summary:
        record["audit"] = summary["audit"]
    history.write_run(sink.fs, sink.root, record, config.io_retry_seconds)


def summarize(config: JobConfig, job: Plan, seconds: float) -> dict[str, Any]:
    done = job.sink.completed()
    rows, errors = job.sink.rows, job.sink.errors
    label = config.configuration().label
    ledger = [c for c in job.sink.ledger if c["configuration"] == label]   # the job's own batches, not the audit's
    audit_cost = sum(c["cost_usd"] for c in job.sink.ledger if c["configuration"] != label)
    device_seconds = sum(c["device_seconds"] for c in job.sink.ledger)
    cost = sum(c["cost_usd"] for c in job.sink.ledger)
    summary = {
        "rows": sum(d["rows"] for d in done.values()), "errors": sum(d["errors"] for d in done.values()),
        "rows_this_run": rows, "errors_this_run": errors,
        "shards": len(job.shards), "shards_this_run": len(job.pending),
        "shards_skipped": len(job.shards) - len(job.pending),
        "shards_failed": job.sink.failed, "shards_not_started": sorted(job.sink.not_started),
        "seconds": seconds, "images_per_s": rows / seconds if seconds else 0.0,
        "device_seconds": device_seconds, "cost_usd": cost,
        "cost_per_1000_images": 1000 * cost / rows if rows else 0.0,
        "flops_total": sum(c["flops_total"] for c in ledger),
        "flops_total_unreduced": sum(c["flops_total_unreduced"] for c in ledger),
        "visual_tokens_in": sum(c["visual_tokens_in"] for c in ledger),
        "visual_tokens_kept": sum(c["visual_tokens_kept"] for c in ledger), "settings": config.settings(),
    }
    if job.memory_rule:
        summary["batch_size_auto"] = job.memory_rule
    if config.audit_share > 0:  # over every finished shard, this run's and earlier runs'
        summary["audit"] = audit.summarize(sum(d.get("audited", 0) for d in done.values()),
                                           sum(d.get("agreement_sum", 0.0) for d in done.values()),
                                           audit_cost, config.audit_share, config.task)
    job.sink.write_summary(summary)
    return summary


def main(task: str, argv: list[str] | None = None) -> int:
    """Entry point of jobs/caption.py and jobs/vqa.py."""
    return entry_point(f"{task}.py", lambda: plan_and_run(parse_args(task, argv)),
                       "finished shards are kept: run the same command again to resume")


def plan_and_run(config: JobConfig) -> str:
    """Print the run plan before Ray starts; --dry-run stops there with the cost estimate; else run and report."""
    job = plan(config)
    print(job.run.describe(), flush=True)
    if config.dry_run:
        runs = history.read_runs(job.sink.fs, job.sink.root, config.io_retry_seconds)
        shards = len(job.run.new) + len(job.run.changed)
        estimate = history.cost_estimate(runs, shards, sum(job.run.retry.values()))
        return f"cost estimate: {estimate}; --dry-run: nothing run"
    summary = run(config, job)
    text = report(summary)
    if summary["shards_not_started"]:
        raise CostCapReached(text)
    return text


def entry_point(script: str, work: Callable[[], str], after_outage: str) -> int:
    """Run `work` and print what it returns: exit status 0; 2 with one line for settings refused before anything
    started (ConfigError); 1 with one line when the object store stayed unreachable past --io-retry-seconds;
    EXIT_COST_CAP (3) after the report of a job that --max-cost-usd stopped."""
    try:
        text = work()
    except ConfigError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        return 2
    except CostCapReached as e:
        print(e.args[0])
        return EXIT_COST_CAP
    except Exception as e:
        outage = find_outage(e)
        if outage is None:
            raise
        # One line: an outage handed over by Ray Data can carry Ray's own hints on further lines.
        first_line = str(outage).strip().partition("\n")[0]
        print(f"{script}: error: {first_line}; {after_outage}", file=sys.stderr)
        return 1
    print(text)
    return 0


def find_outage(error: BaseException) -> ObjectStoreUnavailable | None:
    """The outage behind an error: raised on the driver, or in a read task and handed over by Ray (as the `cause`
    of a RayTaskError, or chained under Ray Data's own exception)."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(current, ObjectStoreUnavailable) and not isinstance(cause, BaseException):
            return current
        pending += [cause if isinstance(cause, BaseException) else None, current.__cause__, current.__context__]
    return None


def report(summary: dict[str, Any]) -> str:
    """What a person reads at the end of a job: where the results are, what the reduction kept and saved."""
    settings, output = summary["settings"], summary["settings"]["output"].rstrip("/")
    lines = []
    if "batch_size_auto" in summary:
        from reducers.memory import format_size

        rule = summary["batch_size_auto"]
        per_row = rule["kv_bytes_per_row"] + rule["activation_bytes_per_row"]
        lines.append(f"batch size auto: {rule['batch_size']} rows ({format_size(rule['weights_bytes'])} of weights + "
                     f"{format_size(per_row)} per row within --memory-per-actor "
                     f"{format_size(rule['memory_per_actor'])})")
    lines += [f"{summary['rows_this_run']} images ({summary['errors_this_run']} errors) in {summary['seconds']:.1f} s, "
             f"{summary['images_per_s']:.2f} images/s -> {output}/results/ (the output now holds {summary['rows']} "
             f"rows; summary: {output}/summary.json)"]
    if summary["visual_tokens_in"]:
        budget = {k: settings[k] for k in ("visual_tokens", "ratio") if settings[k] is not None}
        method = settings["reducer"] + "".join(f" at {k.replace('_', ' ')} {v}" for k, v in budget.items())
        kept, seen = summary["visual_tokens_kept"], summary["visual_tokens_in"]
        lines.append(f"{method}: {seen} visual tokens in, {kept:.0f} kept ({100 * kept / seen:.1f} %, layer-averaged)")
        saved = summary["flops_total"] / summary["flops_total_unreduced"]
        lines.append(f"FLOPs {summary['flops_total']:.3g} against {summary['flops_total_unreduced']:.3g} with none "
                     f"({saved:.2f}x); cost ${summary['cost_usd']:.4g} against ~${summary['cost_usd'] / saved:.4g} with "
                     f"none (priced by FLOPs; at --price-per-gpu-hour {settings['price_per_gpu_hour']})")
    if summary["shards_failed"]:
        failed = summary["shards_failed"]
        lines.append(f"{len(failed)} shards could not be read (recorded in {output}/runs/; the next run retries them): "
                     + "; ".join(f"{shard}: {reason}" for shard, reason in sorted(failed.items())))
    if summary["shards_not_started"]:
        lines.append(f"--max-cost-usd {settings['max_cost_usd']} reached: {len(summary['shards_not_started'])} shards "
                     "not started (the next run does them)")
    if "audit" in summary:
        a = summary["audit"]
        low, high = a["agreement_ci"]
        agree = "n/a" if a["agreement"] is None else f"{a['agreement']:.3f} (95 % CI {low:.3f}-{high:.3f})"
        lines.append(f"audit: {a['rows']} rows also run unreduced, agreement {agree} by {a['metric']}, "
                     f"${a['cost_usd']:.4g} -> {output}/audit/")
    return "\n".join(lines)
