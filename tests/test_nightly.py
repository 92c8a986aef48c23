"""Nightly runs, all real: a SeaweedFS S3 bucket that grows between nights and a Ray head on loopback, each night
sent with `ray job submit` (fixtures and helpers of test_e2e_s3_ray)."""
from __future__ import annotations

import html
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
from PIL import Image

from pipeline_data import good_images, save_test_model, write_parquet_shard
from test_e2e_s3_ray import BUCKET, ROOT, _markers, _read_table, _s3, _submit, _upload, cluster  # noqa: F401 (fixture)

SMALL_PIXELS = "2000"  # nights 1-2: the 60x60 PNG (3600 pixels) is an error row; night 3 lifts the limit


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def _runs(env: dict[str, str], path: str) -> list[dict]:
    fs = _s3(env)
    found = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(f"{path}/runs")))
    records = []
    for name in found:
        with fs.open_input_stream(name) as f:
            records.append(json.loads(f.read()))
    return records


def _results(env: dict[str, str], path: str) -> pd.DataFrame:
    return _read_table(env, f"{path}/results").sort_values("id").reset_index(drop=True)


def _rows(results: pd.DataFrame, ids) -> pd.DataFrame:
    return results[results["id"].isin(ids)].reset_index(drop=True)


def _ok(run, what: str) -> None:
    assert run.returncode == 0, f"{what}: " + run.stdout[-3000:] + run.stderr[-3000:]


def test_three_nights_on_a_growing_bucket(cluster):
    address, env, work = cluster
    model = str(save_test_model(work / "model"))
    local = work / "nightly"
    good = good_images(6, seed=30)
    write_parquet_shard(local / "p0.parquet", {"a0": good[0], "a1": good[1], "big": _png(60)})
    write_parquet_shard(local / "p1.parquet", {"b0": good[2], "b1": good[3]})
    _upload(env, local, "in/nightly")
    out = f"{BUCKET}/out/nightly"
    args = ["--input", f"s3://{BUCKET}/in/nightly", "--output", f"s3://{out}", "--model", model,
            "--max-new-tokens", "3", "--batch-size", "4", "--dtype", "fp32"]

    night1 = _submit(address, env, "caption.py", *args, "--max-image-pixels", SMALL_PIXELS)
    _ok(night1, "night 1")
    assert "2 shards: 2 new, 0 changed, 0 unchanged" in night1.stdout
    first = _results(env, out)
    assert list(first["id"]) == ["a0", "a1", "b0", "b1", "big"]
    assert list(first.loc[first["error"].notna(), "id"]) == ["big"]

    fs = _s3(env)
    before = _markers(fs, f"{out}/results")
    refused = _submit(address, env, "caption.py", *args, "--reducer", "fastv", "--visual-tokens", "16")
    assert refused.returncode != 0
    assert "output holds reducer none; this job asks for fastv at 16 tokens" in refused.stdout + refused.stderr
    assert _markers(fs, f"{out}/results") == before and len(_runs(env, out)) == 1  # nothing touched

    # Night 2: p1's object replaced (another row), p2 added, and two shards that cannot be read as a whole. Only
    # these are uploaded: an identical object uploaded again gets a new mtime, and S3 identity is size + mtime.
    added = work / "night2"
    write_parquet_shard(added / "p1.parquet", {"b0": good[2], "b2": good[4], "b3": good[5]})
    write_parquet_shard(added / "p2.parquet", {"c0": good[0], "c1": good[1]})
    (added / "p3.parquet").write_bytes(b"PAR1 this is no parquet footer PAR1")
    pd.DataFrame({"id": ["e0"], "picture": [good[2]]}).to_parquet(added / "p4.parquet")  # no `image` column
    _upload(env, added, "in/nightly")
    night2 = _submit(address, env, "caption.py", *args, "--max-image-pixels", SMALL_PIXELS)
    _ok(night2, "night 2")
    assert "5 shards: 3 new, 1 changed, 1 unchanged" in night2.stdout
    second = _results(env, out)
    assert list(second["id"]) == ["a0", "a1", "b0", "b2", "b3", "big", "c0", "c1"]  # b1 replaced, none twice
    p0 = ["a0", "a1", "big"]
    assert _rows(second, p0).equals(_rows(first, p0))
    after2 = _markers(fs, f"{out}/results")
    assert after2["p0"] == before["p0"] and set(after2) == {"p0", "p1", "p2"}

    night3 = _submit(address, env, "caption.py", *args, "--retry-errors")
    _ok(night3, "night 3")
    assert "5 shards: 2 new, 0 changed, 3 unchanged; 1 error rows to retry" in night3.stdout
    third = _results(env, out)
    big = third[third["id"] == "big"]
    assert big["error"].isna().all() and big["text"].notna().all()
    others = [i for i in third["id"] if i != "big"]
    # No other row changed, text and batch alike (dtype aside: the column of a null count reads back as float).
    pd.testing.assert_frame_equal(_rows(third, others), _rows(second, others), check_dtype=False)
    assert {k: v for k, v in _markers(fs, f"{out}/results").items() if k != "p0"} == \
        {k: v for k, v in after2.items() if k != "p0"}

    runs = _runs(env, out)
    assert len(runs) == 3
    assert [r["rows"] for r in runs] == [5, 5, 1] and [r["errors"] for r in runs] == [1, 0, 0]
    assert [r["output_rows"] for r in runs] == [5, 8, 8]
    assert runs[-1]["output_errors"] == 0 == third["error"].notna().sum()
    assert [r["shards"]["failed"] for r in runs] == [0, 2, 2]
    assert set(runs[1]["failed_shards"]) == {"p3.parquet", "p4.parquet"}
    assert "no column 'image'" in runs[1]["failed_shards"]["p4.parquet"]
    assert sorted(runs[1]["written_shards"]) == ["p1.parquet", "p2.parquet"]
    assert runs[2]["written_shards"] == ["p0.parquet"]
    costs = _read_table(env, f"{out}/costs")
    assert costs["n_rows"].sum() == 3 + 1 + 3 + 2  # p0 twice (night 1, its retried row), p1 new, p2
    assert all(r["device_seconds"] > 0 and r["cost_usd"] > 0 and r["fingerprint"]["reduction"] == "none"
               for r in runs)
    _check_report(env, out, runs, third, work / "report.html")


def _check_report(env: dict[str, str], out: str, runs: list[dict], results: pd.DataFrame, page: Path) -> None:
    """jobs/report.py: a line per run with the history's figures; the page holds the table, the plot, and the
    latest run's captions beside their images (night 3 rewrote p0: a0, a1 and the retried `big`)."""
    report = subprocess.run([sys.executable, "jobs/report.py", f"s3://{out}", "--html", str(page)], cwd=ROOT,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    lines = report.stdout.splitlines()
    assert len(lines) == 1 + len(runs) + 1 and lines[-1] == f"report page: {page}"
    for line, run in zip(lines[1:], runs):
        cells = line.split()
        assert cells[0] == run["run_id"] and cells[-5:-3] == [str(run["rows"]), str(run["errors"])]
    text = page.read_text()
    assert text.count("<tr><td") == len(runs) + 1  # the runs, and the error table's "none" row
    assert text.count('src="data:image/png;base64,') == 1 and 'src="http' not in text  # nothing fetched
    caption = results.loc[results["id"] == "big", "text"].item()
    assert text.count('src="data:image/jpeg;base64,') == 3 and f"<b>big</b><br>{html.escape(caption)}</div>" in text


def test_cost_cap_stops_new_shards_and_the_next_run_finishes(cluster):
    address, env, work = cluster
    model = str(save_test_model(work / "model"))
    local = work / "capped"
    for i in range(3):
        write_parquet_shard(local / f"{i}.parquet", {f"s{i}-{j}": b for j, b in enumerate(good_images(2, seed=i))})
    _upload(env, local, "in/capped")
    out = f"{BUCKET}/out/capped"
    args = ["--input", f"s3://{BUCKET}/in/capped", "--output", f"s3://{out}", "--model", model,
            "--max-new-tokens", "2", "--batch-size", "2", "--dtype", "fp32", "--actors", "1"]
    capped = _submit(address, env, "caption.py", *args, "--max-cost-usd", "1e-12")
    assert capped.returncode != 0 and "exit code 3" in capped.stdout + capped.stderr, capped.stdout[-3000:]
    assert "--max-cost-usd 1e-12 reached" in capped.stdout
    fs = _s3(env)
    done = _markers(fs, f"{out}/results")
    assert 1 <= len(done) < 3
    assert len(_results(env, out)) == 2 * len(done)  # what started was finished and written whole

    dry = _submit(address, env, "caption.py", *args, "--dry-run")
    _ok(dry, "dry run")
    assert f"3 shards: {3 - len(done)} new, 0 changed, {len(done)} unchanged" in dry.stdout
    assert "cost estimate: ~$" in dry.stdout and _markers(fs, f"{out}/results") == done

    rest = _submit(address, env, "caption.py", *args)
    _ok(rest, "the run after the cap")
    after = _markers(fs, f"{out}/results")
    assert len(after) == 3 and {k: after[k] for k in done} == done
    results = _results(env, out)
    assert len(results) == 6 and results["id"].is_unique
