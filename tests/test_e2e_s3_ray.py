"""End to end, all real: a SeaweedFS S3 server and a Ray head (`ray start --head`) on loopback, shards uploaded with
boto3, both jobs sent with `ray job submit`, outputs read back from S3; then a job stopped half-way with
`ray job stop` and submitted again."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import boto3
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline_data import (VENV_BIN, bad_images, good_images, odd_images, ray_head, save_test_model, seaweedfs,
                           write_parquet_shard, write_tar_shard)
from reference.test_models import LlavaSpec, save_tiny

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "trimlens"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(jobs API address, environment with the S3 settings and Ray's token auth, work dir)."""
    work = tmp_path_factory.mktemp("e2e")
    with seaweedfs(work / "s3", BUCKET) as s3_env, ray_head(s3_env) as (address, env):
        yield address, {**env, "RAY_AUTH_MODE": "token"}, work


def _s3(env: dict[str, str]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                             secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"])


def _upload(env: dict[str, str], local: Path, prefix: str) -> None:
    """boto3 finds the endpoint and keys in the standard variables, as a user's own tools would."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        for path in sorted(local.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local)}")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _read_table(env: dict[str, str], path: str) -> pd.DataFrame:
    fs = _s3(env)
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")]
    return pd.concat([pq.read_table(f, filesystem=fs).to_pandas() for f in files], ignore_index=True)


def _summary(env: dict[str, str], path: str) -> dict:
    with _s3(env).open_input_stream(f"{path}/summary.json") as f:
        return json.loads(f.read())


def _ray(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=check)


def _submit(address: str, env: dict[str, str], script: str, *args: str, wait: bool = True,
            submission_id: str | None = None) -> subprocess.CompletedProcess:
    extra = [] if wait else ["--no-wait"]
    extra += ["--submission-id", submission_id] if submission_id else []
    return _ray(env, "job", "submit", "--address", address, "--working-dir", ".", *extra, "--",
                "python", f"jobs/{script}", *args, check=False)


@pytest.fixture(scope="module")
def samples() -> dict[str, bytes]:
    return {**odd_images(), **bad_images(), **{f"good{i}.jpg": b for i, b in enumerate(good_images(3))}}


def test_both_jobs_through_ray_job_submit_on_s3(cluster, samples):
    address, env, work = cluster
    model = str(save_test_model(work / "model"))
    names = sorted(samples)
    for i in range(2):
        write_parquet_shard(work / "parquet" / f"part-{i}.parquet", {n: samples[n] for n in names[i::2]},
                            {names[i]: "What colour?"})
        write_tar_shard(work / "tars" / f"{i:05d}.tar", {n: samples[n] for n in names[i::2]},
                        {names[i]: "Is it round?"})
    _upload(env, work / "parquet", "in/parquet")
    _upload(env, work / "tars", "in/tars")
    common = ["--model", model, "--max-new-tokens", "3", "--batch-size", "4", "--dtype", "fp32"]

    caption = _submit(address, env, "caption.py", "--input", f"s3://{BUCKET}/in/parquet",
                      "--output", f"s3://{BUCKET}/out/caption", "--reducer", "fastv", "--visual-tokens", "32", *common)
    assert caption.returncode == 0, caption.stdout[-3000:] + caption.stderr[-3000:]
    vqa = _submit(address, env, "vqa.py", "--input", f"s3://{BUCKET}/in/tars", "--output", f"s3://{BUCKET}/out/vqa",
                  "--reducer", "ficoco-v", "--ratio", "0.25", *common)
    assert vqa.returncode == 0, vqa.stdout[-3000:] + vqa.stderr[-3000:]
    assert "trimlens" in vqa.stdout  # the driver's progress bar is in the job log, and so is Ray Data's
    assert "MapBatches(ModelActor)" in vqa.stdout

    for job, ids in (("caption", names), ("vqa", [n.rsplit(".", 1)[0] for n in names])):
        results = _read_table(env, f"{BUCKET}/out/{job}/results")
        costs = _read_table(env, f"{BUCKET}/out/{job}/costs")
        summary = _summary(env, f"{BUCKET}/out/{job}")
        assert sorted(results["id"]) == sorted(ids) and results["id"].is_unique
        bad = {n if job == "caption" else n.rsplit(".", 1)[0] for n in bad_images()}
        assert set(results.loc[results["error"].notna(), "id"]) == bad
        assert results.loc[results["error"].isna(), "text"].notna().all()
        assert costs["n_rows"].sum() == len(results) and costs["n_errors"].sum() == len(bad)
        assert (summary["rows"], summary["errors"], summary["rows_this_run"]) == (len(ids), len(bad), len(ids))
        assert summary["device_seconds"] == pytest.approx(costs["device_seconds"].sum())
    vqa_results = _read_table(env, f"{BUCKET}/out/vqa/results")
    assert set(vqa_results["reducer"]) == {"ficoco-v"}
    assert (vqa_results["visual_tokens_budget"].dropna() == 16).all()
    asked = dict(zip(vqa_results["id"], vqa_results["question"]))
    assert asked[names[0].rsplit(".", 1)[0]] == "Is it round?"
    assert asked[names[2].rsplit(".", 1)[0]] == "What is shown in the image?"  # --question's default


def _markers(fs: pafs.S3FileSystem, path: str) -> dict[str, object]:
    """Completed shard folder -> its marker's modification time."""
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {f.path.split("/")[-2]: f.mtime for f in found if f.path.endswith("/_SUCCESS")}


def test_stop_half_way_then_resubmit(cluster):
    address, env, work = cluster
    # The 576-token, 32-layer tiny model and one image per batch: slow enough to stop between shards.
    model = work / "slow-model"
    save_tiny(str(model), LlavaSpec())
    shards = 8
    for i in range(shards):
        write_parquet_shard(work / "many" / f"{i:02d}.parquet",
                            {f"s{i}-{j}": b for j, b in enumerate(good_images(3, seed=10 * i))})
    _upload(env, work / "many", "in/many")
    args = ["--input", f"s3://{BUCKET}/in/many", "--output", f"s3://{BUCKET}/out/stopped", "--model", str(model),
            "--max-new-tokens", "8", "--batch-size", "1", "--dtype", "fp32"]
    first = _submit(address, env, "caption.py", *args, wait=False, submission_id="half-way")
    assert first.returncode == 0, first.stderr[-2000:]
    fs = _s3(env)
    deadline = time.monotonic() + 240
    while not _markers(fs, f"{BUCKET}/out/stopped/results") and time.monotonic() < deadline:
        time.sleep(0.25)
    _ray(env, "job", "stop", "--address", address, "half-way")
    status = _ray(env, "job", "status", "--address", address, "half-way").stdout
    assert "was stopped" in status, status
    done = _markers(fs, f"{BUCKET}/out/stopped/results")
    assert 0 < len(done) < shards, f"stopped after {len(done)} of {shards} shards: no half-way state to resume"

    second = _submit(address, env, "caption.py", *args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = _markers(fs, f"{BUCKET}/out/stopped/results")
    assert len(after) == shards
    assert {k: after[k] for k in done} == done  # finished shards were not redone
    summary = _summary(env, f"{BUCKET}/out/stopped")
    assert summary["shards_skipped"] == len(done) and summary["rows_this_run"] == 3 * (shards - len(done))
    assert summary["rows"] == 3 * shards
    results = _read_table(env, f"{BUCKET}/out/stopped/results")
    costs = _read_table(env, f"{BUCKET}/out/stopped/costs")
    assert len(results) == 3 * shards and results["id"].is_unique and costs["n_rows"].sum() == 3 * shards
