"""OUTPUT/runs/<run-id>.json: one record per run on an output (summary.json holds the totals over the output).

A run id sorts by start time (`20261203T101500Z-3f9a`), so listing runs/ lists the runs in order.
"""
from __future__ import annotations

import json
import posixpath
import secrets
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from pipeline import retry

RUNS = "runs"


def new_run_id(started: datetime) -> str:
    return f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def write_run(fs: pafs.FileSystem, root: str, record: dict[str, Any], retry_seconds: float) -> str:
    """Write one run's record; returns its path."""
    path = posixpath.join(root.rstrip("/"), RUNS, f"{record['run_id']}.json")

    def write() -> None:
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(record, indent=2).encode())

    retry.call(write, f"writing {path}", retry_seconds)
    return path


def read_runs(fs: pafs.FileSystem, root: str, retry_seconds: float) -> list[dict[str, Any]]:
    """Every run record of the output, oldest first ([] before the first run)."""
    def read() -> list[dict[str, Any]]:
        found = fs.get_file_info(pafs.FileSelector(posixpath.join(root.rstrip("/"), RUNS), allow_not_found=True))
        records = []
        for info in sorted(found, key=lambda i: i.path):
            if info.type == pafs.FileType.File and info.path.endswith(".json"):
                with fs.open_input_stream(info.path) as f:
                    records.append(json.loads(f.read()))
        return records

    return retry.call(read, "reading the run history", retry_seconds)


def cost_estimate(runs: list[dict[str, Any]], shards: int, retry_rows: int) -> str:
    """What a run of `shards` whole shards and `retry_rows` retried rows should cost, priced by the earlier runs'
    ledger on this output (per shard and per row); "unknown" before the first run that spent anything."""
    spent = [r for r in runs if r["rows"] and r["cost_usd"]]
    if not spent:
        return "unknown (no earlier run on this output)"
    cost = sum(r["cost_usd"] for r in spent)
    per_row = cost / sum(r["rows"] for r in spent)
    per_shard = cost / max(1, sum(r["shards"]["new"] + r["shards"]["changed"] for r in spent))
    estimate = shards * per_shard + retry_rows * per_row
    return (f"~${estimate:.4g} (from {len(spent)} earlier run(s) on this output: ${per_shard:.4g} per shard, "
            f"${per_row:.4g} per row)")
