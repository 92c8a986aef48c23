"""Whole jobs on a local Ray (started in this test's loopback namespace): outputs readable without our code, a
complete ledger, resume without duplicates, cleanup of a half-written shard, --overwrite."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import ray

from pipeline.config import JobConfig, parse_args
from pipeline.job import main, run
from reference.scenes import NUMBERS
from pipeline_data import (bad_images, bomb_png, good_images, hostile_samples, odd_images, save_test_model,
                           write_parquet_shard, write_tar_shard)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("job")
    model = save_test_model(root / "model")
    samples = {**odd_images(), **bad_images(), **{f"good{i}.jpg": b for i, b in enumerate(good_images(3))}}
    names = sorted(samples)
    parquet = root / "parquet"
    for i in range(3):  # 12 samples over 3 shards
        write_parquet_shard(parquet / f"part-{i}.parquet", {n: samples[n] for n in names[i::3]},
                            {names[i]: "What colour?"})
    write_parquet_shard(parquet / "part-3.parquet", {})  # an empty shard: complete once the job has run
    tars = root / "tars"
    write_tar_shard(tars / "00000.tar", {n: samples[n] for n in names[:6]}, {names[0]: "Is it round?"})
    write_tar_shard(tars / "00001.tar", {n: samples[n] for n in names[6:]})
    return {"root": root, "model": str(model), "parquet": parquet, "tars": tars, "ids": names}


def _args(inputs, source: str, out: Path, *extra: str) -> list[str]:
    return ["--input", str(inputs[source]), "--output", str(out), "--model", inputs["model"], "--max-new-tokens", "3",
            "--batch-size", "4", "--dtype", "fp32", *extra]


def _tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    results = pd.read_parquet(out / "results")
    costs = duckdb.sql(f"select * from read_parquet('{out}/costs/*/*.parquet')").df()
    return results, costs


def test_caption_job_outputs_ledger_and_summary(local_ray, inputs, capsys):
    out = inputs["root"] / "out-caption"
    assert main("caption", _args(inputs, "parquet", out, "--reducer", "fastv", "--visual-tokens", "32")) == 0
    assert "12 images (3 errors)" in capsys.readouterr().out
    results, costs = _tables(out)
    # every input id exactly once; the unreadable ones with an error, the odd ones captioned
    assert sorted(results["id"]) == inputs["ids"] and results["id"].is_unique
    errors = set(results.loc[results["error"].notna(), "id"])
    assert errors == set(bad_images())
    assert results.loc[results["error"].isna(), "text"].notna().all()
    assert set(results["reducer"]) == {"fastv"} and set(results["shard"]) == {f"part-{i}.parquet" for i in range(3)}
    assert results["question"].isna().all()
    assert duckdb.sql(f"select count(*) from '{out}/results/*/*.parquet'").fetchall() == [(12,)]
    # the ledger is complete: one row per model batch, adding up to the results
    assert costs["batch_id"].is_unique and set(costs["batch_id"]) == set(results["batch_id"])
    assert costs["n_rows"].sum() == len(results) and costs["n_errors"].sum() == results["error"].notna().sum()
    per_shard = costs.groupby("shard")["n_rows"].sum().to_dict()
    assert per_shard == results.groupby("shard").size().to_dict()
    assert costs["generated_tokens"].sum() == results["generated_tokens"].sum()
    assert (costs["flops_prefill"] > 0).all() and (costs["cost_usd"] > 0).all()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["errors"], summary["rows_this_run"], summary["shards_this_run"]) == (12, 3, 12, 4)
    assert (out / "results" / "part-3" / "_SUCCESS").exists() and len(pd.read_parquet(out / "results" / "part-3")) == 0
    assert summary["device_seconds"] == pytest.approx(costs["device_seconds"].sum())
    assert summary["cost_per_1000_images"] == pytest.approx(1000 * costs["cost_usd"].sum() / 12)
    assert summary["images_per_s"] > 0 and summary["settings"]["reducer"] == "fastv"


def test_vqa_job_on_webdataset_uses_per_row_questions(local_ray, inputs):
    out = inputs["root"] / "out-vqa"
    assert main("vqa", _args(inputs, "tars", out, "--question", "Anything?")) == 0
    results, costs = _tables(out)
    assert sorted(results["id"]) == sorted(n.rsplit(".", 1)[0] for n in inputs["ids"])
    asked = dict(zip(results["id"], results["question"]))
    first = inputs["ids"][0].rsplit(".", 1)[0]
    assert asked.pop(first) == "Is it round?" and set(asked.values()) == {"Anything?"}
    assert costs["n_rows"].sum() == 12 and set(costs["shard"]) == {"00000.tar", "00001.tar"}


def test_resume_skips_finished_shards_and_cleans_a_half_written_one(local_ray, inputs):
    out = inputs["root"] / "out-resume"
    args = _args(inputs, "parquet", out)
    first = run(parse_args("caption", args))
    assert first["rows_this_run"] == 12
    finished = out / "results" / "part-0" / "part-0.parquet"
    before = finished.stat().st_mtime_ns
    # an interrupted run: shard part-2 written but its marker missing, and a stray file in its folder
    (out / "results" / "part-2" / "_SUCCESS").unlink()
    (out / "costs" / "part-2" / "stray.parquet").write_bytes(b"half a file")
    second = run(parse_args("caption", args))
    assert (second["rows_this_run"], second["shards_this_run"], second["shards_skipped"]) == (4, 1, 3)
    assert (second["rows"], second["errors"]) == (12, 3)
    assert finished.stat().st_mtime_ns == before
    assert not (out / "costs" / "part-2" / "stray.parquet").exists()
    results, costs = _tables(out)
    assert len(results) == 12 and results["id"].is_unique and costs["n_rows"].sum() == 12
    third = run(parse_args("caption", args))  # nothing left to do: no Ray work, totals unchanged
    assert (third["rows_this_run"], third["rows"], third["shards_skipped"]) == (0, 12, 4)
    fresh = run(parse_args("caption", [*args, "--overwrite"]))
    assert (fresh["rows_this_run"], fresh["shards_skipped"]) == (12, 0)
    assert finished.stat().st_mtime_ns != before


def test_a_question_outside_the_bundled_vocabulary_becomes_an_error_row(local_ray, tmp_path):
    images = sorted(Path(JobConfig().input).glob("*.png"))[:2]
    shard = tmp_path / "in" / "part-0.parquet"
    write_parquet_shard(shard, {p.name: p.read_bytes() for p in images},
                        {images[0].name: "What colour is the octagon?"})
    assert main("vqa", ["--input", str(shard.parent), "--output", str(tmp_path / "out")]) == 0
    rows = pd.read_parquet(tmp_path / "out" / "results").set_index("id")
    assert rows.loc[images[0].name, "error"] == "question has words the model does not know: 'What', 'octagon'"
    assert rows.loc[images[1].name, "question"] == "how many objects are there ?"
    assert rows.loc[images[1].name, "text"] in NUMBERS and pd.isna(rows.loc[images[1].name, "error"])


def test_hostile_rows_end_as_results_or_error_rows(local_ray, inputs, tmp_path):
    """A bomb, a `../` member name, a 10,000-character key and a zero-byte image in one tar: every row comes out once,
    the bomb and the empty one as error rows, and nothing is written outside the output folder."""
    samples = {**hostile_samples(), "bomb.png": bomb_png(), "zero.jpg": b""}
    write_tar_shard(tmp_path / "in" / "00000.tar", samples)
    out = tmp_path / "nested" / "out"
    assert main("caption", _args({**inputs, "hostile": tmp_path / "in"}, "hostile", out)) == 0
    results = pd.read_parquet(out / "results").set_index("id")
    assert sorted(results.index) == sorted(name.rsplit(".", 1)[0] for name in samples)
    errors = results["error"].dropna().to_dict()
    assert errors["bomb"].startswith("image too large: 12000x12000") and set(errors) == {"bomb", "zero"}
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["out"]
