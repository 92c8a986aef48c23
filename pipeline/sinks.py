"""Driver-side sink: results / costs Parquet per input shard, a completion marker written last, summary.json.

Layout under OUTPUT (plain Parquet files; pandas, duckdb and pyarrow read them directly):
    results/<shard>/part-0.parquet   one row per input row (RESULT_SCHEMA)
    costs/<shard>/part-0.parquet     one row per model batch (COST_SCHEMA)
    audit/<shard>/part-0.parquet     --audit-share: the audited rows' outputs beside the unreduced ones (AUDIT_SCHEMA)
    results/<shard>/_SUCCESS         JSON {rows, errors, audited, agreement_sum, input, fingerprint}: the shard is
                                     complete; written last (input and fingerprint: see pipeline/manifest.py)
    summary.json                     totals over the whole output
    runs/<run-id>.json               one per run (pipeline/history.py)

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
from pipeline.schema import COST_SCHEMA, RESULT_SCHEMA, SHARD_FAILED, SHARD_NOT_STARTED

FOLDERS = ("results", "costs", "audit")

MARKER = "_SUCCESS"
T = TypeVar("T")


def shard_folder(shard: str) -> str:
    """One flat folder per shard, even for shards in sub-folders of the input; without the file extension, so no
    folder looks like a Parquet file to tools that glob for *.parquet."""
    return posixpath.splitext(shard)[0].replace("/", "__")


class ShardSink:
    def __init__(self, fs: pafs.FileSystem, root: str, configuration: str, task: str, retry_seconds: float,
                 fingerprint: dict[str, Any] | None = None):
        self.fs, self.root, self.retry_seconds = fs, root.rstrip("/"), retry_seconds
        self.fingerprint = fingerprint              # written into every marker
        self.identities: dict[str, Any] = {}        # shard -> its input's identity, written into its marker
        self.merged: set[str] = set()               # --retry-errors shards: new rows replace old ones by id
        self.configuration = configuration          # the job's label: rows of any other configuration are audit rows
        self.metric = METRICS[task]
        self._results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._audit: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._costs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._expected: dict[str, int] = {}
        self.seen: set[str] = set()                 # shards that sent at least one row in this run
        self.ledger: list[dict[str, Any]] = []      # this run's cost rows
        self.rows = self.errors = 0                 # this run's result rows and error rows
        self.written: list[str] = []                # shards written in this run
        self.failed: dict[str, str] = {}            # shard -> why its input could not be read
        self.not_started: set[str] = set()          # shards the --max-cost-usd gate did not start

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

    def _delete_file_if_present(self, path: str) -> None:
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)

    def _read_table(self, folder: str, shard: str) -> pa.Table:
        path = self._path(folder, shard_folder(shard), "part-0.parquet")
        return self._retried(lambda: pq.read_table(path, filesystem=self.fs), f"reading {path}")

    def error_ids(self, shard: str) -> frozenset[str]:
        """The ids of a finished shard's error rows (--retry-errors reads only these)."""
        results = self._read_table("results", shard)
        return frozenset(results.filter(results.column("error").is_valid()).column("id").to_pylist())

    def _delete_dir_if_present(self, path: str) -> None:
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def clear(self) -> None:
        """--overwrite: remove everything a previous run wrote (and nothing else under OUTPUT)."""
        def remove() -> None:
            for folder in (*FOLDERS, "runs"):
                self._delete_dir_if_present(self._path(folder))
            self._delete_file_if_present(self._path("summary.json"))

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

    def discard(self, shard: str) -> None:
        """Remove a shard's outputs: what an interrupted run left, or the results of an input that changed. The
        marker goes first, so an interruption here leaves a shard that the next run sees as new."""
        marker = self._path("results", shard_folder(shard), MARKER)
        self._retried(lambda: self._delete_file_if_present(marker), f"removing {marker}")
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
            cost = row.pop("cost")
            if cost is not None:  # spent, whatever becomes of the shard
                self.ledger.append(json.loads(cost))
            if count == SHARD_FAILED:       # its rows so far and any still to come are dropped; the next run retries
                self.failed[shard] = row["error"]
                for pending in (self._results, self._audit, self._costs, self._expected):
                    pending.pop(shard, None)
                continue
            if count == SHARD_NOT_STARTED:
                self.not_started.add(shard)
                continue
            if shard in self.failed:
                continue
            if count is not None:
                self._expected[shard] = count
            if cost is not None:
                self._costs[shard].append(self.ledger[-1])
            if row.pop("configuration") != self.configuration:  # the actor sends a batch's audit rows first
                self._audit[shard].append(row)
                continue
            self._results[shard].append(row)
            if len(self._results[shard]) == self._expected.get(shard):
                self._write_shard(shard)
                finished.append(shard)
        return finished

    def unfinished(self) -> list[str]:
        """Shards that received some rows but not all of them (a failed shard's rows were dropped)."""
        return sorted(self._results)

    def mark_empty(self, shard: str) -> None:
        """A shard that yielded no rows at all is complete once the dataset has run to its end."""
        self._write_shard(shard)

    def _write_shard(self, shard: str) -> None:
        result_rows = self._results.pop(shard, [])
        new_results = pa.Table.from_pylist(result_rows, schema=RESULT_SCHEMA)
        self.rows += len(new_results)
        self.errors += pc.sum(new_results.column("error").is_valid()).as_py() or 0
        tables = {"results": new_results,
                  "costs": pa.Table.from_pylist(self._costs.pop(shard, []), schema=COST_SCHEMA)}
        audited = self._audit.pop(shard, [])
        if audited:
            tables["audit"] = audit.scored(result_rows, audited, self.metric)
        if shard in self.merged:
            tables = self._merge(shard, tables)
        results = tables["results"]
        folder = shard_folder(shard)
        errors = pc.sum(results.column("error").is_valid()).as_py() or 0
        scores = tables["audit"].column("agreement").drop_null() if "audit" in tables else pa.array([], pa.float64())
        marker = {"rows": len(results), "errors": errors, "audited": len(scores),
                  "agreement_sum": pc.sum(scores).as_py() or 0.0, "input": self.identities.get(shard),
                  "fingerprint": self.fingerprint}

        def write() -> None:  # the marker last: a retried write never leaves a marker before its tables
            for name, table in tables.items():
                self.fs.create_dir(self._path(name, folder), recursive=True)
                pq.write_table(table, self._path(name, folder, "part-0.parquet"), filesystem=self.fs)
            self._write_bytes(self._path("results", folder, MARKER), json.dumps(marker).encode())

        self._retried(write, f"writing shard {shard}")
        self.written.append(shard)

    def _merge(self, shard: str, retried: dict[str, pa.Table]) -> dict[str, pa.Table]:
        """A --retry-errors shard: its earlier tables with the retried rows in place of the old ones (same order),
        the retried batches' ledger rows added to its costs, and their audit rows to its audit."""
        old = self._read_table("results", shard)
        by_id = {row["id"]: row for row in retried["results"].to_pylist()}
        merged = {"results": pa.Table.from_pylist([by_id.get(r["id"], r) for r in old.to_pylist()],
                                                  schema=RESULT_SCHEMA),
                  "costs": pa.concat_tables([self._read_table("costs", shard), retried["costs"]])}
        earlier = self._path("audit", shard_folder(shard), "part-0.parquet")
        audits = [retried["audit"]] if "audit" in retried else []
        if self._retried(lambda: self.fs.get_file_info(earlier).type == pafs.FileType.File, f"looking up {earlier}"):
            audits.insert(0, self._read_table("audit", shard))
        if audits:
            merged["audit"] = pa.concat_tables(audits)
        return merged

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._retried(lambda: self._write_bytes(self._path("summary.json"), json.dumps(summary, indent=2).encode()),
                      "writing summary.json")
