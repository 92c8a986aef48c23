"""What a rerun on the same output must do: input identities, the configuration fingerprint and the run plan.

Every finished shard's marker (results/<shard>/_SUCCESS) records the identity of the input it was made from and the
fingerprint of the configuration that made it. A rerun compares them with the input as listed now and with its own
configuration, before Ray starts:
    new        no marker (never run, interrupted, or failed to read last time)   -> run
    changed    marker, but the input's identity differs (or the marker has none) -> old results removed, run again
    retry      unchanged, with error rows, and --retry-errors                    -> only the error rows run again
    unchanged  everything else                                                    -> skipped without reading it

Identity is what `pyarrow.fs.FileInfo` offers: path, size and mtime (ns). pyarrow does not expose S3's ETag, so on
object storage an object replaced within the store's mtime resolution (1 s on S3) by one of the same size looks
unchanged.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline import retry
from pipeline.bundled import resolve_model
from pipeline.config import ConfigError, JobConfig
from pipeline.sinks import shard_folder
from pipeline.sources import Shard

# The fingerprint's fields, in the order a difference is reported.
FINGERPRINT_FIELDS = ("task", "model", "model_hash", "reduction", "instruction", "max_new_tokens", "dtype", "version")
MODEL_FILES = ("config.json", "model.safetensors.index.json")


def input_identities(fs: pafs.FileSystem, shards: list[Shard], retry_seconds: float) -> dict[str, list[list]]:
    """Shard name -> [[path, size, mtime_ns], ...] for each of its files (one stat per file)."""
    paths = [p for s in shards for p in s.paths]
    infos = retry.call(lambda: fs.get_file_info(paths), "looking up the input's files", retry_seconds)
    stat = {i.path: [i.path, i.size, i.mtime_ns] for i in infos}
    return {s.name: [stat[p] for p in s.paths] for s in shards}


def model_hash(model: str) -> str:
    """sha256 of the model's config.json and safetensors index (a local folder: read directly; a hub id: the files
    transformers cached when the job's checks loaded the config)."""
    path = Path(resolve_model(model))
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        found = path / name if path.is_dir() else _cached_hub_file(model, name)
        if found is not None and found.is_file():
            digest.update(name.encode() + b"\0" + found.read_bytes())
    return digest.hexdigest()[:16]


def _cached_hub_file(repo_id: str, name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, name)
    except ValueError:  # not a hub id either; the job's model checks have said so already
        return None
    return Path(found) if isinstance(found, str) else None


def reduction(config: JobConfig) -> str:
    """The reducer and its budget as a person says it: `visionzip at ratio 0.33`, `fastv at 64 tokens`, `none`."""
    if config.visual_tokens is not None:
        return f"{config.reducer} at {config.visual_tokens} tokens"
    if config.ratio is not None:
        return f"{config.reducer} at ratio {config.ratio}"
    return config.reducer


def fingerprint(config: JobConfig) -> dict[str, Any]:
    """Everything that decides what a row's output is; one output holds rows of one fingerprint only."""
    return {"task": config.task, "model": config.model, "model_hash": model_hash(config.model),
            "reduction": reduction(config),
            "instruction": config.prompt if config.task == "caption" else config.question,
            "max_new_tokens": config.max_new_tokens, "dtype": config.dtype, "version": version("trimlens")}


def first_difference(held: dict[str, Any], asked: dict[str, Any]) -> str | None:
    """One line naming the first field where the output's fingerprint and the job's differ, or None."""
    for name in FINGERPRINT_FIELDS:
        if held.get(name) != asked[name]:
            what = name.replace("_", " ")
            if name == "reduction":
                return f"output holds reducer {held.get(name)}; this job asks for {asked[name]}"
            return f"output holds {what} {held.get(name)!r}; this job asks for {what} {asked[name]!r}"
    return None


def output_fingerprint(markers: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The fingerprint the output's finished shards were made with (None for an output without any)."""
    return next((m["fingerprint"] for m in markers.values() if "fingerprint" in m), None)


def check_fingerprint(markers: dict[str, dict[str, Any]], asked: dict[str, Any]) -> None:
    """Refuse (ConfigError, exit status 2) a job that would mix configurations in one output."""
    held = output_fingerprint(markers)
    difference = None if held is None else first_difference(held, asked)
    if difference is not None:
        raise ConfigError(f"{difference} (one output holds one configuration: use another --output, or --overwrite "
                          "to replace it)")


@dataclass
class RunPlan:
    """What this run does with each shard of the input."""
    new: list[Shard] = field(default_factory=list)
    changed: list[Shard] = field(default_factory=list)
    unchanged: list[Shard] = field(default_factory=list)
    retry: dict[str, int] = field(default_factory=dict)  # shard name -> error rows to run again (--retry-errors)

    @property
    def to_run(self) -> list[Shard]:
        """Shards read in this run: new and changed ones whole, retried ones for their error rows only."""
        return self.new + self.changed + [s for s in self.unchanged if s.name in self.retry]

    @property
    def shards(self) -> int:
        return len(self.new) + len(self.changed) + len(self.unchanged)

    def describe(self) -> str:
        """e.g. `412 shards: 17 new, 2 changed, 393 unchanged; 31 error rows to retry`."""
        text = (f"{self.shards} shards: {len(self.new)} new, {len(self.changed)} changed, "
                f"{len(self.unchanged)} unchanged")
        if self.retry:
            text += f"; {sum(self.retry.values())} error rows to retry"
        return text


def plan_run(shards: list[Shard], identities: dict[str, list[list]], markers: dict[str, dict[str, Any]],
             retry_errors: bool) -> RunPlan:
    """Sort the shards by what the markers of earlier runs say about them."""
    plan = RunPlan()
    for shard in shards:
        marker = markers.get(shard_folder(shard.name))
        if marker is None:
            plan.new.append(shard)
        elif marker.get("input") != identities[shard.name]:
            plan.changed.append(shard)
        else:
            plan.unchanged.append(shard)
            if retry_errors and marker["errors"]:
                plan.retry[shard.name] = marker["errors"]
    return plan

