"""Driver-side sink: results / costs Parquet per input shard, a completion marker written last, summary.json.

Layout under OUTPUT (plain Parquet files; pandas, duckdb and pyarrow read them directly):
    results/<shard>/part-0.parquet   one row per input row (RESULT_SCHEMA)
    costs/<shard>/part-0.parquet     one row per model batch (COST_SCHEMA)
    audit/<shard>/part-0.parquet     --audit-share: the audited rows' outputs beside the unreduced ones (AUDIT_SCHEMA)
    results/<shard>/_SUCCESS         JSON {rows, errors, audited, agreement_sum}: the shard is complete; written last
    summary.json

Why the driver writes: a shard's files are written once, when all its rows are in, so an interrupted job leaves
only whole shards plus at most one half-written folder without a marker (removed on resume). Ray's write_parquet
cannot name outputs after the input shard, and its checkpointing (beta) works per row, not per shard. Result
rows are small (text and counts), so one writer keeps up with many model actors.
"""
from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from typing import Any, Callable, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import audit, retry
from pipeline.agreement import METRICS
from pipeline.config import ConfigError
from pipeline.schema import COST_SCHEMA, RESULT_SCHEMA

FOLDERS = ("results", "costs", "audit")

MARKER = "_SUCCESS"
T = TypeVar("T")


def shard_folder(shard: str) -> str:
    """One flat folder per shard, even for shards in sub-folders of the input; without the file extension, so no
    folder looks like a Parquet file to tools that glob for *.parquet."""
    return posixpath.splitext(shard)[0].replace("/", "__")


class ShardSink:
    def __init__(self, fs: pafs.FileSystem, root: str, configuration: str, task: str, retry_seconds: float):
        self.fs, self.root, self.retry_seconds = fs, root.rstrip("/"), retry_seconds
        self.configuration = configuration          # the job's label: rows of any other configuration are audit rows
        self.metric = METRICS[task]
        self._results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._audit: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._costs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._expected: dict[str, int] = {}
        self.seen: set[str] = set()                 # shards that sent at least one row in this run
        self.ledger: list[dict[str, Any]] = []      # this run's cost rows
        self.rows = self.errors = 0                 # this run's result rows and error rows

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _retried(self, fn: Callable[[], T], what: str) -> T:
        """Every call on the output store goes through here: each is whole (a listing, a whole-file write, a
        delete), so repeating it after an outage is safe."""
        return retry.call(fn, what, self.retry_seconds)

    def check_writable(self, uri: str) -> None:
        """Create the output folder and write + delete a probe file. Raises ConfigError."""
        probe = self._path(".trimlens-write-test")

        def probe_write() -> None:
            self.fs.create_dir(self.root, recursive=True)
            self._write_bytes(probe, b"ok")
            self.fs.delete_file(probe)

        try:
            self._retried(probe_write, f"checking that {uri} is writable")
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"output is not writable: --output {uri}: {str(e).splitlines()[0]}") from None

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _delete_dir_if_present(self, path: str) -> None:
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def clear(self) -> None:
        """--overwrite: remove everything a previous run wrote (and nothing else under OUTPUT)."""
        def remove() -> None:
            for folder in FOLDERS:
                self._delete_dir_if_present(self._path(folder))
            if self.fs.get_file_info(self._path("summary.json")).type == pafs.FileType.File:
                self.fs.delete_file(self._path("summary.json"))

        self._retried(remove, "clearing the output (--overwrite)")

    def completed(self) -> dict[str, dict[str, int]]:
        """Folder name -> marker contents ({rows, errors}) for every shard a previous run finished."""
        def read_markers() -> dict[str, dict[str, int]]:
            found = self.fs.get_file_info(pafs.FileSelector(self._path("results"), allow_not_found=True,
                                                            recursive=True))
            done = {}
            for info in found:
                if info.type == pafs.FileType.File and posixpath.basename(info.path) == MARKER:
                    with self.fs.open_input_stream(info.path) as f:
                        done[posixpath.basename(posixpath.dirname(info.path))] = json.loads(f.read())
            return done

        return self._retried(read_markers, "listing finished shards")

    def discard_partial(self, shard: str) -> None:
        """Remove what an interrupted run left of a shard that has no marker."""
        for folder in FOLDERS:
            path = self._path(folder, shard_folder(shard))
            self._retried(lambda: self._delete_dir_if_present(path), f"removing {path}")

    def add(self, batch: pa.Table) -> list[str]:
        """Take actor output rows (OUTPUT_SCHEMA); write every shard they complete; return those shards."""
        finished = []
        for row in batch.to_pylist():
            shard = row["shard"]
            self.seen.add(shard)
            count = row.pop("shard_rows")  # set on the rows of the shard's last chunk only
            if count is not None:
                self._expected[shard] = count
            cost = row.pop("cost")
            if cost is not None:
                self._costs[shard].append(json.loads(cost))
                self.ledger.append(self._costs[shard][-1])
            if row.pop("configuration") != self.configuration:  # the actor sends a batch's audit rows first
                self._audit[shard].append(row)
                continue
            self._results[shard].append(row)
            self.rows += 1
            self.errors += row["error"] is not None
            if len(self._results[shard]) == self._expected.get(shard):
                self._write_shard(shard)
                finished.append(shard)
        return finished

    def unfinished(self) -> list[str]:
        """Shards that received some rows but not all of them."""
        return sorted(self._results)

    def mark_empty(self, shard: str) -> None:
        """A shard that yielded no rows at all is complete once the dataset has run to its end."""
        self._write_shard(shard)

    def _write_shard(self, shard: str) -> None:
        result_rows = self._results.pop(shard, [])
        results = pa.Table.from_pylist(result_rows, schema=RESULT_SCHEMA)
        tables = {"results": results, "costs": pa.Table.from_pylist(self._costs.pop(shard, []), schema=COST_SCHEMA)}
        audited = self._audit.pop(shard, [])
        if audited:
            tables["audit"] = audit.scored(result_rows, audited, self.metric)
        folder = shard_folder(shard)
        errors = pc.sum(results.column("error").is_valid()).as_py() or 0
        scores = tables["audit"].column("agreement").drop_null() if audited else pa.array([], pa.float64())
        marker = {"rows": len(results), "errors": errors, "audited": len(scores),
                  "agreement_sum": pc.sum(scores).as_py() or 0.0}

        def write() -> None:  # the marker last: a retried write never leaves a marker before its tables
            for name, table in tables.items():
                self.fs.create_dir(self._path(name, folder), recursive=True)
                pq.write_table(table, self._path(name, folder, "part-0.parquet"), filesystem=self.fs)
            self._write_bytes(self._path("results", folder, MARKER), json.dumps(marker).encode())

        self._retried(write, f"writing shard {shard}")

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._retried(lambda: self._write_bytes(self._path("summary.json"), json.dumps(summary, indent=2).encode()),
                      "writing summary.json")
