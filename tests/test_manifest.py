"""The pieces of a nightly rerun without Ray: input identities, the fingerprint and its refusal, the run plan,
unreadable shards, the sink's --retry-errors merge, the history's cost estimate and the report's parts."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, JobConfig
from pipeline.history import cost_estimate
from pipeline.manifest import check_fingerprint, first_difference, fingerprint, input_identities, plan_run
from pipeline.report import errors_by_reason, text_table
from pipeline.schema import OUTPUT_SCHEMA, SHARD_FAILED
from pipeline.sinks import ShardSink
from pipeline.sources import list_shards, open_uri, read_shard
from pipeline_data import good_images, save_test_model, write_parquet_shard


def _listed(path):
    config = JobConfig(input=str(path))
    fs, root = open_uri(str(path), "--input")
    return fs, list_shards(fs, root, config), config


def test_identity_changes_with_the_object_and_the_plan_sorts_shards(tmp_path):
    for name in ("a", "b", "c"):
        write_parquet_shard(tmp_path / "in" / f"{name}.parquet", {f"{name}0": good_images(1)[0]})
    fs, shards, _ = _listed(tmp_path / "in")
    before = input_identities(fs, shards, 0)
    write_parquet_shard(tmp_path / "in" / "b.parquet", {"b0": good_images(1)[0], "b1": good_images(2)[1]})
    after = input_identities(fs, shards, 0)
    assert before["a.parquet"] == after["a.parquet"] and before["b.parquet"] != after["b.parquet"]
    markers = {"a": {"input": before["a.parquet"], "errors": 2}, "b": {"input": before["b.parquet"], "errors": 0}}
    plan = plan_run(shards, after, markers, retry_errors=True)
    assert ([s.name for s in plan.new], [s.name for s in plan.changed], [s.name for s in plan.unchanged]) == \
        (["c.parquet"], ["b.parquet"], ["a.parquet"])
    assert plan.describe() == "3 shards: 1 new, 1 changed, 1 unchanged; 2 error rows to retry"
    assert [s.name for s in plan.to_run] == ["c.parquet", "b.parquet", "a.parquet"]
    assert plan_run(shards, after, markers, retry_errors=False).to_run == plan.new + plan.changed


def test_a_different_configuration_is_named_and_refused(tmp_path):
    model = str(save_test_model(tmp_path / "model"))
    held = fingerprint(JobConfig(model=model, reducer="visionzip", ratio=0.33))
    asked = fingerprint(JobConfig(model=model, reducer="fastv", visual_tokens=64))
    assert first_difference(held, asked) == \
        "output holds reducer visionzip at ratio 0.33; this job asks for fastv at 64 tokens"
    assert first_difference(held, held) is None
    longer = fingerprint(JobConfig(model=model, reducer="visionzip", ratio=0.33, max_new_tokens=8))
    assert first_difference(held, longer) == "output holds max new tokens 32; this job asks for max new tokens 8"
    with pytest.raises(ConfigError, match="fastv at 64 tokens"):
        check_fingerprint({"s": {"fingerprint": held}}, asked)
    check_fingerprint({}, asked)  # an empty output takes any configuration
    (tmp_path / "model" / "config.json").write_text(
        (tmp_path / "model" / "config.json").read_text().replace("}", ', "retrained": 1}', 1))
    assert fingerprint(JobConfig(model=model))["model_hash"] != held["model_hash"]  # same path, other model


def test_unreadable_shards_end_in_one_failed_row_and_retries_read_only_their_ids(tmp_path):
    write_parquet_shard(tmp_path / "in" / "a.parquet", {f"a{i}": b for i, b in enumerate(good_images(3))})
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1 not a footer PAR1")
    pq.write_table(pa.table({"id": ["c0"], "picture": [b"x"]}), tmp_path / "in" / "c.parquet")
    fs, (a, b, c), config = _listed(tmp_path / "in")
    for broken, reason in ((b, "ArrowInvalid"), (c, "no column 'image'")):
        (table,) = read_shard(fs, broken, config)
        assert table.column("shard_rows").to_pylist() == [SHARD_FAILED] and reason in table.column("error")[0].as_py()
    only = pa.concat_tables(read_shard(fs, replace(a, only_ids=frozenset({"a2"})), config))
    assert only.column("id").to_pylist() == ["a2"] and only.column("shard_rows").to_pylist() == [1]


def _out_row(key: str, shard: str, text: str | None, error: str | None, shard_rows: int | None, batch: str) -> dict:
    cost = {name: 0 for name in ("n_rows", "n_errors", "visual_tokens_in", "prompt_tokens", "generated_tokens",
                                 "flops_vision", "flops_projector", "flops_prefill", "flops_decode", "flops_total",
                                 "flops_total_unreduced", "kv_bytes_peak")}
    cost.update(batch_id=batch, shard=shard, actor="t", visual_tokens_kept=0.0, wall_s=1.0, device="cpu",
                device_seconds=1.0, cost_usd=0.5, configuration="none", n_rows=1)
    return {"id": key, "shard": shard, "text": text, "error": error, "model": "m", "reducer": "none",
            "batch_id": batch, "shard_rows": shard_rows, "configuration": "none", "cost": json.dumps(cost)}


def _table(rows: list[dict]) -> pa.Table:
    """As the actor sends them: a batch's ledger row on its first row only."""
    seen = set()
    for row in rows:
        if row["batch_id"] in seen:
            row["cost"] = None
        seen.add(row["batch_id"])
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def test_retried_rows_replace_their_error_rows_in_place_and_a_failed_shard_is_dropped(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "out")
    sink = ShardSink(fs, root, "none", "caption", 0, fingerprint={"reduction": "none"})
    sink.identities = {"s.parquet": [["s.parquet", 10, 1]]}
    sink.add(_table([_out_row("r0", "s.parquet", "a cat", None, None, "b1"),
                     _out_row("r1", "s.parquet", None, "image cannot be decoded", None, "b1"),
                     _out_row("r2", "s.parquet", "a dog", None, 3, "b1")]))
    assert sink.error_ids("s.parquet") == frozenset({"r1"})
    retry = ShardSink(fs, root, "none", "caption", 0, fingerprint={"reduction": "none"})
    retry.merged = {"s.parquet"}
    assert retry.add(_table([_out_row("r1", "s.parquet", "a bird", None, 1, "b2"),
                             _out_row("x0", "bad.parquet", None, "early row", None, "b3"),
                             _out_row("", "bad.parquet", None, "ArrowInvalid: no footer", SHARD_FAILED, "b3")])) \
        == ["s.parquet"]
    results = pq.read_table(os.path.join(root, "results", "s", "part-0.parquet")).to_pylist()
    assert [(r["id"], r["text"], r["error"], r["batch_id"]) for r in results] == \
        [("r0", "a cat", None, "b1"), ("r1", "a bird", None, "b2"), ("r2", "a dog", None, "b1")]
    costs = pq.read_table(os.path.join(root, "costs", "s", "part-0.parquet"))
    assert costs.column("batch_id").to_pylist() == ["b1", "b2"]
    marker = json.loads((tmp_path / "out" / "results" / "s" / "_SUCCESS").read_text())
    assert (marker["rows"], marker["errors"], marker["fingerprint"]) == (3, 0, {"reduction": "none"})
    assert (retry.rows, retry.errors, retry.failed, retry.unfinished()) == \
        (1, 0, {"bad.parquet": "ArrowInvalid: no footer"}, [])
    assert not (tmp_path / "out" / "results" / "bad").exists()


def _run(rows: int, cost: float, new: int, errors: int = 0) -> dict:
    return {"run_id": f"r{rows}", "start": "2026-12-03T02:00:00+00:00", "rows": rows, "errors": errors,
            "cost_usd": cost, "images_per_s": 2.0, "device_seconds": 3.0,
            "shards": {"new": new, "changed": 0, "unchanged": 0, "retried": 0, "failed": 0, "not_started": 0}}


def test_cost_estimate_from_earlier_runs_and_the_history_table():
    assert cost_estimate([], 3, 0).startswith("unknown")
    runs = [_run(100, 1.0, 4), _run(100, 3.0, 4)]
    assert cost_estimate(runs, 2, 10).startswith("~$1.2 ")  # 2 shards x $0.5 + 10 rows x $0.02
    lines = text_table(runs).splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["run", "start"]
    assert lines[2].split()[-3:] == ["3", "2.00", "3.0"]


def test_error_rows_grouped_by_reason():
    table = pa.table({"id": ["a", "b", "c", "d"], "error": ["too large", None, "too large", "truncated"]})
    assert errors_by_reason(table) == [("too large", 2, ["a", "c"]), ("truncated", 1, ["d"])]
