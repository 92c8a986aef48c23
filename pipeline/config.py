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

from pipeline.bundled import BUNDLED_MODEL, BUNDLED_PROMPTS, GENERIC_PROMPTS, default_prompts

SAMPLES = Path(__file__).resolve().parent / "assets" / "samples"
TASKS = ("caption", "vqa")
FORMATS = ("auto", "parquet", "webdataset", "images")
DTYPES = ("bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A job that must not start: the entry point prints the message as one line and exits with status 2."""


def _opt(default: Any, help: str, metavar: str = "", flag: bool = True) -> Any:
    """A described option; `help` ends with its default unless it says "default:" itself."""
    return field(default=default, metadata={"help": help, "metavar": metavar, "flag": flag})


@dataclass
class JobConfig:
    task: str = _opt("caption", "caption (free text per image) or vqa (answer a question per image); "
                                "set by the entry point", flag=False)
    input: str = _opt(str(SAMPLES), "input URI: s3://, gs://, file:// or a local path; a folder of shards or one shard "
                                   "(default: the bundled sample images, pipeline/assets/samples)", "URI")
    output: str = _opt("out", "output URI: results/, costs/ and summary.json are written under it", "URI")
    format: str = _opt("auto", "input format: parquet, webdataset (tar), images (a folder), or auto "
                               "(from the file extensions found)", "{auto,parquet,webdataset,images}")
    model: str = _opt(BUNDLED_MODEL, "a LLaVA model: local path or Hugging Face hub id; 'bundled' is the small "
                                     "reference model that ships with trimlens (it knows only the words of its "
                                     "procedural scenes: shapes, colours, counts, quadrants)", "ID_OR_PATH")
    reducer: str = _opt("none", "visual-token reduction method (see reducers.available()); none keeps all tokens",
                       "NAME")
    visual_tokens: int | None = _opt(None, "reducer budget: layer-averaged visual tokens kept per image "
                                             "(default: none; only the reducer none needs no budget)", "N")
    ratio: float | None = _opt(None, "reducer budget as a fraction of each image's visual tokens "
                                     "(instead of --visual-tokens; default: none)", "R")
    prompt: str | None = _opt(None, "caption: the instruction sent with every image (default: "
                                    f"{BUNDLED_PROMPTS['prompt']!r} with the bundled model, else "
                                    f"{GENERIC_PROMPTS['prompt']!r})", "TEXT")
    question: str | None = _opt(None, "vqa: the question for rows that carry none of their own (Parquet question "
                                      "column / WebDataset key.json field) (default: "
                                      f"{BUNDLED_PROMPTS['question']!r} with the bundled model, else "
                                      f"{GENERIC_PROMPTS['question']!r})", "TEXT")
    max_new_tokens: int = _opt(32, "most tokens generated per image", "N")
    batch_size: int = _opt(8, "images per model batch (a batch never mixes input shards)", "N")
    actors: tuple[int, int] = _opt((1, 1), "model actor pool size MIN,MAX (one model copy per actor)",
                                     "MIN,MAX")
    gpus_per_actor: float | None = _opt(None, "GPUs each actor asks Ray for (default: 1 if the cluster has GPUs, "
                                              "else 0)", "F")
    cpus_per_actor: float | None = _opt(None, "CPUs each actor asks Ray for (default: 1 with GPUs, else 0.5 so a "
                                              "small CPU-only machine still has a CPU left for reading)", "F")
    dtype: str = _opt("bf16", "model weights dtype", "{bf16,fp16,fp32}")
    price_per_gpu_hour: float = _opt(2.0, "USD per device-hour, for cost_usd in the ledger and the summary", "USD")
    overwrite: bool = _opt(False, "delete previous results/costs/summary under --output and start over "
                                  "(default: resume, skipping completed shards)")
    id_column: str = _opt("id", "Parquet input: column holding the row id", "NAME")
    image_column: str = _opt("image", "Parquet input: column holding the encoded image bytes", "NAME")
    question_column: str = _opt("question", "Parquet input column / WebDataset json field holding the question",
                                   "NAME")
    images_per_shard: int = _opt(1000, "image-folder input: images per shard (the unit of progress and resume)",
                                "N")
    max_image_pixels: int = _opt(25_000_000, "images with more pixels than this (width x height, read from the "
                                             "file header before decoding) become error rows; a JPEG is decoded at "
                                             "1/2, 1/4 or 1/8 scale when that brings it under. The default is far "
                                             "above what LLaVA processors use (336x336; AnyRes up to 672x1344) and "
                                             "bounds one decoded image to ~75 MB RGB, where PIL's own bomb limit "
                                             "(179 M pixels) lets a small PNG grow a worker by gigabytes", "N")
    io_retry_seconds: float = _opt(120.0, "how long an object-store call (listing, reading, writing) is retried with "
                                          "backoff before the job fails (exit status 1; rerun to resume). 120 s "
                                          "rides out a storage restart or a network blip, yet a real outage fails a "
                                          "nightly job within minutes", "S")

    def __post_init__(self) -> None:
        for name, text in default_prompts(self.model).items():  # the defaults depend on the model
            if getattr(self, name) is None:
                setattr(self, name, text)

    def validate(self) -> None:
        """Checks that need no I/O; raises ConfigError."""
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {FORMATS}, got {self.format!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.visual_tokens is not None and self.ratio is not None:
            raise ConfigError("give either --visual-tokens or --ratio, not both")
        lo, hi = self.actors
        if not 1 <= lo <= hi:
            raise ConfigError(f"--actors must be MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        for name in ("max_new_tokens", "batch_size", "images_per_shard", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.io_retry_seconds < 0:
            raise ConfigError("--io-retry-seconds must be 0 or more")

    def budget(self) -> dict[str, Any]:
        """The budget arguments of reducers.attach / reducers.validate that the job sets."""
        return {k: v for k, v in (("visual_tokens", self.visual_tokens), ("ratio", self.ratio)) if v is not None}

    def settings(self) -> dict[str, Any]:
        """JSON-ready copy of every setting (for summary.json)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _parse_actors(text: str | list | tuple | int) -> tuple[int, int]:
    if isinstance(text, int):
        return text, text
    parts = [int(p) for p in (text.split(",") if isinstance(text, str) else text)]
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2:
        raise ConfigError(f"--actors takes MIN,MAX, got {text!r}")
    return parts[0], parts[1]


def _field_types() -> dict[str, Any]:
    hints = {"int | None": int, "float | None": float, "str | None": str, "int": int, "float": float, "str": str,
             "bool": bool}
    return {f.name: hints.get(str(f.type)) for f in dataclasses.fields(JobConfig)}


def _coerce(name: str, value: Any) -> Any:
    """A config-file or flag value as the field's type."""
    if value is None:
        return None
    if name == "actors":
        return _parse_actors(value)
    kind = _field_types()[name]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}") from None


def build_parser(task: str) -> argparse.ArgumentParser:
    """Flags for every JobConfig option. Defaults are SUPPRESSed so only flags the user typed override the file."""
    defaults = JobConfig()
    parser = argparse.ArgumentParser(
        prog=f"{task}.py", argument_default=argparse.SUPPRESS,
        description=f"trimlens {task} job: images from object storage through LLaVA with visual-token reduction; "
                    "Parquet results + a per-batch cost ledger. Exit status 2: the job was refused before it started; "
                    "1: the object store stayed unreachable longer than --io-retry-seconds (run the same command "
                    "again to resume).")
    parser.add_argument("--config", metavar="job.yaml", help="YAML or JSON file with the same settings "
                        "(keys are the flag names, - or _); flags override it (default: none)")
    budget = parser.add_mutually_exclusive_group()
    for f in dataclasses.fields(JobConfig):
        if not f.metadata["flag"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f.metadata["help"]
        if "default:" not in help_text:
            help_text += f" (default: {shown})"
        target = budget if f.name in ("visual_tokens", "ratio") else parser
        if f.type == "bool":
            target.add_argument(flag, action="store_true", help=help_text)
        else:
            choices = {"format": FORMATS, "dtype": DTYPES}.get(f.name)
            target.add_argument(flag, metavar=f.metadata["metavar"], choices=choices, help=help_text)
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
    flags = vars(build_parser(task).parse_args(argv))
    settings = load_config_file(flags.pop("config")) if "config" in flags else {}
    settings.update(flags)
    known = {f.name for f in dataclasses.fields(JobConfig) if f.metadata["flag"]}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in --config: {', '.join(unknown)}")
    config = JobConfig(task=task, **{k: _coerce(k, v) for k, v in settings.items()})
    config.validate()
    return config
