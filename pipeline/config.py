"""One JobConfig: every option of a job, its default and what it means; flags and YAML/JSON files map onto it.

Precedence: the field defaults < a `--config job.yaml` file < command-line flags. `--help` is generated from the
field descriptions, so the flags, the config-file keys and the documentation cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.flags import add_flags, flag, option
from pipeline.bundled import BUNDLED_MODEL, BUNDLED_PROMPTS, GENERIC_PROMPTS, default_prompts

SAMPLES = Path(__file__).resolve().parent / "assets" / "samples"
TASKS = ("caption", "vqa")
FORMATS = ("auto", "parquet", "webdataset", "images")
DTYPES = ("bf16", "fp16", "fp32")
AUTO = "auto"  # --batch-size auto: the memory rule chooses the batch (pipeline/job.py, reducers/memory.py)


class ConfigError(ValueError):
    """A job that must not start: the entry point prints the message as one line and exits with status 2."""


# The sections of `--help`, in the README's order. Every flag names its section where it is declared (`group=`).
GROUPS = {
    "input": "what to read and how it is split into shards",
    "model and reduction": "the model, its visual-token reduction and what it is asked",
    "output": "where results, the cost ledger and summary.json go",
    "cluster": "how the work is spread over Ray actors",
    "cost": "how device time is priced",
    "planner": "what jobs/plan.py tries and the constraints it plans for",
}


def _opt(default: Any, help: str, metavar: str = "", *, group: str, choices: tuple | None = None) -> Any:
    """A job option (`pipeline.flags.option`) in `--help` section `group`, one of GROUPS (checked where it is declared)."""
    if group not in GROUPS:
        raise ValueError(f"unknown --help group {group!r}; one of {list(GROUPS)}")
    return option(default, help, metavar, group=group, choices=choices)


def flag_setting(setting: Any) -> str:
    """A setting named in a reducers.BudgetError (`.name`, `.value`), as typed on the command line."""
    return f"{flag(setting.name)} {setting.value}"


@dataclass
class JobConfig:
    task: str = field(default="caption", metadata={"flag": False, "help": "caption (free text per image) or vqa "
                                                   "(answer a question per image); set by the entry point"})
    input: str = _opt(str(SAMPLES), "input URI: s3://, gs://, file:// or a local path; a folder of shards or one shard "
                                   "(default: the bundled sample images, pipeline/assets/samples)", "URI",
                      group="input")
    output: str = _opt("out", "output URI: results/, costs/ and summary.json are written under it", "URI",
                       group="output")
    format: str = _opt("auto", "input format: parquet, webdataset (tar), images (a folder), or auto "
                               "(from the file extensions found)", "{auto,parquet,webdataset,images}", group="input",
                        choices=FORMATS)
    model: str = _opt(BUNDLED_MODEL, "a LLaVA model: local path or Hugging Face hub id; 'bundled' is the small "
                                     "reference model that ships with trimlens (it knows only the words of its "
                                     "procedural scenes: shapes, colours, counts, quadrants)", "ID_OR_PATH",
                      group="model and reduction")
    reducer: str = _opt("none", "visual-token reduction method (see reducers.available()); none keeps all tokens",
                        "NAME", group="model and reduction")
    visual_tokens: int | None = _opt(None, "reducer budget: layer-averaged visual tokens kept per image "
                                           "(default: none; only the reducer none needs no budget)", "N",
                                     group="model and reduction")
    ratio: float | None = _opt(None, "reducer budget as a fraction of each image's visual tokens "
                                     "(instead of --visual-tokens; default: none)", "R", group="model and reduction")
    prompt: str | None = _opt(None, "caption: the instruction sent with every image (default: "
                                    f"{BUNDLED_PROMPTS['prompt']!r} with the bundled model, else "
                                    f"{GENERIC_PROMPTS['prompt']!r})", "TEXT", group="model and reduction")
    question: str | None = _opt(None, "vqa: the question for rows that carry none of their own (Parquet question "
                                      "column / WebDataset key.json field) (default: "
                                      f"{BUNDLED_PROMPTS['question']!r} with the bundled model, else "
                                      f"{GENERIC_PROMPTS['question']!r})", "TEXT", group="model and reduction")
    max_new_tokens: int = _opt(32, "most tokens generated per image", "N", group="model and reduction")
    batch_size: int | str = _opt(8, "images per model batch (a batch never mixes input shards), or auto: the "
                                    "largest batch that --memory-per-actor holds at this reducer and budget "
                                    "(weights + peak KV cache and activations per row, from the model config; "
                                    "reducers/memory.py), at most 256; jobs/plan.py then runs each "
                                    "configuration at its own", "N|auto", group="cluster")
    actors: tuple[int, int] = _opt((1, 1), "model actor pool size MIN,MAX (one model copy per actor)", "MIN,MAX",
                                   group="cluster")
    memory_per_actor: int | None = _opt(None, "memory one model actor may use, for --batch-size auto: e.g. 24GiB, "
                                              "4G, 512MiB (default: the GPU's total memory, or on CPU this "
                                              "machine's available memory / --actors MAX; 10 % of it is kept free)",
                                        "SIZE", group="cluster")
    gpus_per_actor: float | None = _opt(None, "GPUs each actor asks Ray for (default: 1 if the cluster has GPUs, "
                                              "else 0)", "F", group="cluster")
    cpus_per_actor: float | None = _opt(None, "CPUs each actor asks Ray for (default: 1 with GPUs, else 0.5 so a "
                                              "small CPU-only machine still has a CPU left for reading)", "F",
                                        group="cluster")
    dtype: str = _opt("bf16", "model weights dtype", "{bf16,fp16,fp32}", group="model and reduction", choices=DTYPES)
    price_per_gpu_hour: float = _opt(2.0, "USD per device-hour, for cost_usd in the ledger and the summary", "USD",
                                     group="cost")
    audit_share: float = _opt(0.0, "share of rows (0-1) also run through the unreduced model on the same actors, "
                                   "picked by a hash of --audit-seed, shard and id; each one's agreement with the "
                                   "unreduced output goes to OUTPUT/audit/, their mean and 95 % interval to "
                                   "summary.json (default: 0, no audit)", "F", group="output")
    audit_seed: int = _opt(0, "seed of the --audit-share pick", "S", group="output")
    overwrite: bool = _opt(False, "delete previous results/costs/summary/runs under --output and start over, also "
                                  "when the output holds another configuration (default: resume, skipping "
                                  "completed shards whose input is unchanged)", group="output")
    retry_errors: bool = _opt(False, "also run the error rows of shards finished by earlier runs again; each such "
                                     "shard is rewritten with the retried rows in place (default: only new shards "
                                     "and shards whose input changed run)", group="output")
    dry_run: bool = _opt(False, "print the run plan (new / changed / unchanged shards, error rows to retry) and a "
                                "cost estimate from earlier runs on this output, then exit 0 without running "
                                "(default: run)", group="output")
    max_cost_usd: float | None = _opt(None, "no shard starts once this run has spent this much (USD, priced as "
                                            "--price-per-gpu-hour); shards already started finish and are written, "
                                            "then the job exits with status 3 (default: no cap)", "USD",
                                      group="cost")
    id_column: str = _opt("id", "Parquet input: column holding the row id", "NAME", group="input")
    image_column: str = _opt("image", "Parquet input: column holding the encoded image bytes", "NAME", group="input")
    question_column: str = _opt("question", "Parquet input column / WebDataset json field holding the question",
                                "NAME", group="input")
    images_per_shard: int = _opt(1000, "image-folder input: images per shard (the unit of progress and resume)",
                                 "N", group="input")
    max_image_pixels: int = _opt(25_000_000, "images with more pixels than this (width x height, read from the "
                                             "file header before decoding) become error rows; a JPEG is decoded at "
                                             "1/2, 1/4 or 1/8 scale when that brings it under. The default is far "
                                             "above what LLaVA processors use (336x336; AnyRes up to 672x1344) and "
                                             "bounds one decoded image to ~75 MB RGB, where PIL's own bomb limit "
                                             "(179 M pixels) lets a small PNG grow a worker by gigabytes", "N",
                                 group="input")
    io_retry_seconds: float = _opt(120.0, "how long an object-store call (listing, reading, writing) is retried with "
                                          "backoff before the job fails (exit status 1; rerun to resume). 120 s "
                                          "rides out a storage restart or a network blip, yet a real outage fails a "
                                          "nightly job within minutes", "S", group="cluster")

    def __post_init__(self) -> None:
        for name, text in default_prompts(self.model).items():  # the defaults depend on the model
            if getattr(self, name) is None:
                setattr(self, name, text)

    def validate(self) -> None:
        """Checks that need no I/O; raises ConfigError."""
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"{flag('format')} must be one of {FORMATS}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{flag('dtype')} must be one of {DTYPES}, got {self.dtype!r}")
        if self.visual_tokens is not None and self.ratio is not None:
            raise ConfigError(f"give either {flag('visual_tokens')} or {flag('ratio')}, not both")
        lo, hi = self.actors
        if not 1 <= lo <= hi:
            raise ConfigError(f"{flag('actors')} must be MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        if not 0 <= self.audit_share <= 1:
            raise ConfigError(f"{flag('audit_share')} must be in [0, 1], got {self.audit_share}")
        if self.audit_share > 0 and self.reducer == "none":
            raise ConfigError(f"{flag('audit_share')} compares the reducer's output with none's; this job runs none "
                              "already")
        if self.batch_size != AUTO and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"{flag('batch_size')} must be a positive integer or {AUTO}, got {self.batch_size!r}")
        for name in ("max_new_tokens", "images_per_shard", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.max_cost_usd is not None and not self.max_cost_usd > 0:
            raise ConfigError(f"{flag('max_cost_usd')} must be positive, got {self.max_cost_usd}")
        for name in ("gpus_per_actor", "cpus_per_actor", "price_per_gpu_hour", "io_retry_seconds"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{flag(name)} must not be negative, got {value}")

    def budget(self) -> dict[str, Any]:
        """The budget arguments of reducers.attach / reducers.validate that the job sets."""
        return self.configuration().budget()

    def configuration(self) -> "Configuration":
        """The job's one reduction setting (the planner runs several; see pipeline/planner.py)."""
        return Configuration(self.reducer, self.visual_tokens, self.ratio)

    def settings(self) -> dict[str, Any]:
        """JSON-ready copy of every setting (for summary.json)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _parse_actors(text: str | list | tuple | int) -> tuple[int, int]:
    if isinstance(text, int):
        return text, text
    try:
        parts = [int(p) for p in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        parts = []
    if len(parts) not in (1, 2):
        raise ConfigError(f"{flag('actors')} takes MIN,MAX or N (integers), got {text!r}")
    return parts[0], parts[-1]


def _field_types() -> dict[str, Any]:
    hints = {"int | None": int, "float | None": float, "str | None": str, "int": int, "float": float, "str": str,
             "bool": bool}
    return {f.name: hints.get(str(f.type)) for f in dataclasses.fields(JobConfig)}


_KINDS = {int: "an integer", float: "a number", str: "text"}


def _coerce(name: str, value: Any) -> Any:
    """A config-file or flag value as the field's type."""
    if value is None:
        return None
    if name == "actors":
        return _parse_actors(value)
    if name == "memory_per_actor":
        from reducers.memory import parse_size  # torch is imported only once a job needs it, not for --help

        try:
            return parse_size(value)
        except ValueError as e:
            raise ConfigError(f"{flag(name)}: {e}") from None
    if name == "batch_size":
        if str(value).strip().lower() == AUTO:
            return AUTO
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag(name)} must be a positive integer or {AUTO}, got {value!r}") from None
    kind = _field_types()[name]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{flag(name)} must be true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag(name)} must be {_KINDS[kind]}, got {value!r}") from None


def build_parser(task: str, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """Flags for every JobConfig option but those in `skip`. Defaults are SUPPRESSed so only flags the user typed
    override the file."""
    parser = argparse.ArgumentParser(
        prog=f"{task}.py", argument_default=argparse.SUPPRESS,
        description=f"trimlens {task} job: images from object storage through LLaVA with visual-token reduction; "
                    "Parquet results + a per-batch cost ledger. A rerun on the same output runs only new shards, "
                    "shards whose input changed and (--retry-errors) earlier error rows. Exit status 0: done; 2: the "
                    "job was refused before it started (also: the output holds another configuration); 1: the object "
                    "store stayed unreachable longer than --io-retry-seconds (run the same command again to resume); "
                    "3: --max-cost-usd reached, shards remain (run again to do them).")
    parser.add_argument("--config", metavar="job.yaml", help="YAML or JSON file with the same settings "
                        "(keys are the flag names, - or _); flags override it (default: none)")
    add_flags(parser, JobConfig, GROUPS, exclusive=("visual_tokens", "ratio"), skip=skip)
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args(task: str, argv: list[str] | None = None) -> JobConfig:
    """Flags (and the --config file they name) -> a validated JobConfig for `task`. Raises ConfigError."""
    return job_config(task, vars(build_parser(task).parse_args(argv)))


def job_config(task: str, flags: dict[str, Any]) -> JobConfig:
    """Parsed flags (and the --config file they name) -> a validated JobConfig. Raises ConfigError."""
    settings = load_config_file(flags.pop("config")) if "config" in flags else {}
    settings.update(flags)
    known = {f.name for f in dataclasses.fields(JobConfig) if f.metadata["flag"]}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in --config: {', '.join(unknown)}")
    config = JobConfig(task=task, **{k: _coerce(k, v) for k, v in settings.items()})
    config.validate()
    return config


@dataclass(frozen=True)
class Configuration:
    """One reduction setting a model actor runs: a method and its budget (none for `none`)."""
    reducer: str
    visual_tokens: int | None = None
    ratio: float | None = None
    batch_size: int | None = None  # the planner's --batch-size auto: this configuration's own; else the job's

    def budget(self) -> dict[str, Any]:
        """The budget arguments of reducers.attach / reducers.validate."""
        return {k: v for k, v in (("visual_tokens", self.visual_tokens), ("ratio", self.ratio)) if v is not None}

    @property
    def label(self) -> str:
        """e.g. `visionzip@ratio=0.33`, or `none`."""
        return self.reducer + "".join(f"@{k}={v}" for k, v in self.budget().items())
