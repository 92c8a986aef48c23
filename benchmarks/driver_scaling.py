"""Where one driver stops scaling: every result row passes through the driver, which writes each shard's Parquet.

Four measurements, with a stand-in for the model (an actor that returns a fixed text at once), so that only the
driver's side is timed:
  1. sink: OUTPUT_SCHEMA tables fed straight into ShardSink (no Ray): microseconds per row, milliseconds per shard
     write (local disk, and with --s3 a SeaweedFS server on loopback), hence the rows/s ceiling at a shard size;
  2. memory: driver RSS growth while rows of many unfinished shards are held (shards in flight);
  3. planning: listing and planning N input objects (list_shards + the read tasks of ShardSource);
  4. end to end: a Ray job of SHARDS x ROWS rows (ShardSource -> stand-in actor pool -> driver sink).

    scripts/netns-run .venv/bin/python benchmarks/driver_scaling.py --s3 --shards 2000 --rows 50 --list 100000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import JobConfig  # noqa: E402
from pipeline.schema import OUTPUT_SCHEMA  # noqa: E402
from pipeline.sinks import ShardSink  # noqa: E402
from pipeline.sources import ShardSource, list_shards, open_uri  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from pipeline_data import seaweedfs  # noqa: E402  (the test suite's S3 server on loopback)

TEXT = "a red circle , a blue square"


def output_rows(shard: str, n: int, batch: int) -> list[pa.Table]:
    """What the actor pool hands the driver for one shard: tables of `batch` rows, a ledger row per table."""
    cost = json.dumps({"batch_id": "b", "shard": shard, "actor": "stand-in", "n_rows": batch, "n_errors": 0,
                       "visual_tokens_in": 576 * batch, "visual_tokens_kept": 64.0 * batch, "prompt_tokens": 600,
                       "generated_tokens": 20, "flops_vision": 1, "flops_projector": 1, "flops_prefill": 1,
                       "flops_decode": 1, "flops_total": 4, "flops_total_unreduced": 8, "kv_bytes_peak": 1,
                       "wall_s": 0.1, "device": "cpu", "device_seconds": 0.1, "cost_usd": 1e-5,
                       "configuration": "none"})
    tables = []
    for start in range(0, n, batch):
        rows = [{"id": f"{shard}-{i}", "shard": shard, "text": TEXT, "question": None, "error": None,
                 "model": "stand-in", "reducer": "none", "visual_tokens_budget": None, "visual_tokens_in": 576,
                 "visual_tokens_kept": 576.0, "prompt_tokens": 600, "generated_tokens": 7, "batch_id": "b",
                 "shard_rows": n if start + batch >= n else None, "configuration": "none",
                 "cost": cost if i == start else None}
                for i in range(start, min(start + batch, n))]
        tables.append(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA))
    return tables


def sink_throughput(uri: str, shards: int, rows: int, batch: int) -> dict:
    fs, root = open_uri(uri, "--output")
    sink = ShardSink(fs, root, "none", "caption", retry_seconds=0)
    tables = {f"s{i:05d}.parquet": output_rows(f"s{i:05d}.parquet", rows, batch) for i in range(shards)}
    add_s = write_s = 0.0
    for shard, shard_tables in tables.items():
        for table in shard_tables[:-1]:
            began = time.perf_counter()
            sink.add(table)
            add_s += time.perf_counter() - began
        began = time.perf_counter()
        sink.add(shard_tables[-1])  # completes the shard: its two Parquet files and the marker are written
        write_s += time.perf_counter() - began
    per_row_us = add_s / (shards * rows) * 1e6 if rows > batch else float("nan")
    per_shard_ms = write_s / shards * 1e3
    return {"uri": uri, "shards": shards, "rows_per_shard": rows, "us_per_row": round(per_row_us, 2),
            "ms_per_shard_write": round(per_shard_ms, 1),
            "ceiling_rows_per_s": round(shards * rows / (add_s + write_s))}


def rss_mb() -> float:
    """The process's resident memory now (ru_maxrss is a peak, which earlier measurements may already have set)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


def memory_in_flight(shards: int, rows: int, batch: int) -> dict:
    """RSS growth while every shard has all rows but its last table in (nothing written yet)."""
    sink = ShardSink(*open_uri(tempfile.mkdtemp(prefix="trimlens-mem-"), "--output"), "none", "caption",
                     retry_seconds=0)
    before = rss_mb()
    held = 0
    for i in range(shards):
        for table in output_rows(f"m{i:05d}", rows, batch)[:-1]:
            sink.add(table)
            held += table.num_rows
    grown_mb = rss_mb() - before
    return {"shards_in_flight": shards, "rows_held": held, "rss_growth_mb": round(grown_mb, 1),
            "bytes_per_row_held": round(grown_mb * 2**20 / held) if held else None}


def planning(objects: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="trimlens-list-"))
    for i in range(objects):
        (folder / f"{i // 1000:03d}").mkdir(exist_ok=True)
        (folder / f"{i // 1000:03d}" / f"{i:06d}.parquet").touch()
    config = JobConfig(input=str(folder))
    began = time.perf_counter()
    fs, root = open_uri(config.input, "--input")
    shards = list_shards(fs, root, config)
    listed = time.perf_counter() - began
    tasks = ShardSource(fs, shards, config).get_read_tasks(parallelism=-1)
    planned = time.perf_counter() - began
    return {"objects": objects, "shards": len(shards), "read_tasks": len(tasks), "list_s": round(listed, 2),
            "list_and_read_tasks_s": round(planned, 2)}


class StandInModel:
    """The model actor's contract (PREPARED rows in, OUTPUT rows out) with a fixed text and no work."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        cost = json.dumps({"batch_id": "b", "shard": batch.column("shard")[0].as_py(), "actor": "stand-in",
                           "n_rows": n, "n_errors": 0, "visual_tokens_in": 0, "visual_tokens_kept": 0.0,
                           "prompt_tokens": 0, "generated_tokens": 0, "flops_vision": 0, "flops_projector": 0,
                           "flops_prefill": 0, "flops_decode": 0, "flops_total": 0, "flops_total_unreduced": 0,
                           "kv_bytes_peak": 0, "wall_s": 0.0, "device": "cpu", "device_seconds": 0.0,
                           "cost_usd": 0.0, "configuration": "none"})
        return pa.table({"id": batch.column("id"), "shard": batch.column("shard"), "text": [TEXT] * n,
                         "question": batch.column("question"), "error": batch.column("error"),
                         "model": ["stand-in"] * n, "reducer": ["none"] * n, "visual_tokens_budget": [None] * n,
                         "visual_tokens_in": [0] * n, "visual_tokens_kept": [0.0] * n, "prompt_tokens": [0] * n,
                         "generated_tokens": [0] * n, "batch_id": ["b"] * n,
                         "shard_rows": batch.column("shard_rows"), "configuration": ["none"] * n,
                         "cost": [cost] + [None] * (n - 1)},
                        schema=OUTPUT_SCHEMA)


def end_to_end(shards: int, rows: int, batch: int) -> dict:
    import ray
    import ray.data

    folder = Path(tempfile.mkdtemp(prefix="trimlens-e2e-"))
    image = b"\xff\xd8 tiny stand-in bytes"  # never decoded: the stand-in skips the decode stage
    for i in range(shards):
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(rows)], "image": [image] * rows}),
                       folder / f"{i:05d}.parquet")
    config = JobConfig(input=str(folder), output=str(folder / "out"), batch_size=batch)
    fs, root = open_uri(config.input, "--input")
    pending = list_shards(fs, root, config)
    sink = ShardSink(*open_uri(config.output, "--output"), "none", "caption", retry_seconds=0)
    ray.init(num_cpus=2, include_dashboard=False)
    began = time.perf_counter()
    rss_before, rss_peak = rss_mb(), 0.0
    dataset = (ray.data.read_datasource(ShardSource(fs, pending, config))
               .map_batches(StandInModel, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
                            batch_size=batch, batch_format="pyarrow", num_cpus=0.5))
    done = 0
    for out in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        done += len(sink.add(out))
        rss_peak = max(rss_peak, rss_mb())
    seconds = time.perf_counter() - began
    ray.shutdown()
    return {"shards": shards, "rows": shards * rows, "shards_written": done, "seconds": round(seconds, 1),
            "rows_per_s": round(shards * rows / seconds),
            "driver_rss_growth_mb_peak": round(rss_peak - rss_before, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2000, help="shards for the sink and end-to-end runs")
    parser.add_argument("--rows", type=int, default=50, help="rows per shard")
    parser.add_argument("--sink-rows", type=int, default=1000, help="rows per shard in the sink ceiling run "
                        "(the default --images-per-shard)")
    parser.add_argument("--batch", type=int, default=8, help="rows per table handed to the driver (--batch-size)")
    parser.add_argument("--list", type=int, default=100_000, help="input objects to list and plan")
    parser.add_argument("--s3", action="store_true", help="also time the sink against a SeaweedFS S3 server started "
                        "on loopback (run inside scripts/netns-run)")
    parser.add_argument("--skip-e2e", action="store_true", help="no Ray run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trimlens-scaling-") as scratch:
        tempfile.tempdir = scratch  # every folder below (100,000 listed files included) is removed at the end
        results = measure_all(args)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def measure_all(args: argparse.Namespace) -> dict:
    results = {"sink_local": sink_throughput(tempfile.mkdtemp(prefix="trimlens-sink-"), 100, args.sink_rows,
                                             args.batch)}
    if args.s3:
        with seaweedfs(Path(tempfile.mkdtemp(prefix="trimlens-s3-")), "bench") as env:
            os.environ.update(env)
            results["sink_s3_loopback"] = sink_throughput("s3://bench/sink", 100, args.sink_rows, args.batch)
    results["memory"] = memory_in_flight(args.shards, args.rows, args.batch)
    results["planning"] = planning(args.list)
    if not args.skip_e2e:
        results["end_to_end"] = end_to_end(args.shards, args.rows, args.batch)
    return results


if __name__ == "__main__":
    main()
