"""Recovery on a multi-node Ray cluster: a worker node, a model actor or the driver killed mid-job, and the S3 server
stopped mid-job for less and for more than the retry window. Every test ends with every input id exactly once in
the results, read back with pyarrow alone.

The cluster is `ray.cluster_utils.Cluster` (a head and a worker node, each a real raylet with its own object store,
on loopback), as Ray's own fault-tolerance tests build theirs: it starts in seconds, needs no `ray start` /
`ray stop` subprocess dance, and `remove_node(allow_graceful=False)` SIGKILLs one node's raylet and workers, which
is exactly "a node died". The job itself runs as a subprocess (`jobs/caption.py` with RAY_ADDRESS), so its driver
can be killed like a user's. The S3 server is SeaweedFS on ports above 20000 (outside Ray's worker ports); an outage
is SIGSTOP / SIGCONT on its process, which leaves clients hanging exactly as an unreachable store does.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from ray.cluster_utils import Cluster

from pipeline_data import good_images, seaweedfs_server, write_parquet_shard

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "recovery"
SHARDS, ROWS_PER_SHARD = 12, 4
IDS = sorted(f"s{i:02d}-{j}" for i in range(SHARDS) for j in range(ROWS_PER_SHARD))
# The bundled model on CPU, one image per model batch: a few seconds of work, long enough to act in the middle.
JOB_FLAGS = ["--batch-size", "1", "--max-new-tokens", "8", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(AWS_* environment, the server process); the input shards are uploaded under in/."""
    work = tmp_path_factory.mktemp("recovery")
    with seaweedfs_server(work / "s3", BUCKET) as (env, server):
        fs = _s3(env)
        for i in range(SHARDS):
            local = work / "in" / f"{i:02d}.parquet"
            write_parquet_shard(local, {f"s{i:02d}-{j}": b for j, b in enumerate(good_images(ROWS_PER_SHARD, 9 * i))})
            with fs.open_output_stream(f"{BUCKET}/in/{local.name}") as f:
                f.write(local.read_bytes())
        yield env, server


@pytest.fixture(scope="module")
def cluster(store):
    """A head node (2 logical CPUs) whose processes hold the S3 settings in their environment, as a real cluster's
    would; Ray's files in a private folder of a short path (Unix socket paths are limited to ~107 characters)."""
    env, _ = store
    settings = {**env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-recovery-", dir="/tmp")}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(settings["RAY_TMPDIR"], ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


@pytest.fixture
def worker(cluster):
    """The worker node, (re)started for every test: one test kills it."""
    node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield node
    if node in cluster.worker_nodes:
        cluster.remove_node(node)


def _s3(env: dict[str, str]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                             secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"])


def _start_job(cluster, env: dict[str, str], output: str, *extra: str) -> subprocess.Popen:
    """jobs/caption.py on the cluster, input and output on S3; stdout and stderr together in .stdout."""
    command = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--input", f"s3://{BUCKET}/in",
               "--output", f"s3://{BUCKET}/{output}", *JOB_FLAGS, *extra]
    return subprocess.Popen(command, env={**os.environ, **env, "RAY_ADDRESS": cluster.address}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(job: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = job.communicate(timeout=timeout)
    return job.returncode, out


def _tail(out: str) -> str:
    """The end of a job's output without the raylets' own log lines (Ray forwards those to the driver)."""
    return "\n".join(line for line in out.splitlines() if "(raylet)" not in line)[-3000:]


def _markers(env: dict[str, str], output: str) -> dict[str, object]:
    """Finished shard folder -> its marker's modification time."""
    found = _s3(env).get_file_info(pafs.FileSelector(f"{BUCKET}/{output}/results", recursive=True,
                                                     allow_not_found=True))
    return {f.path.split("/")[-2]: f.mtime for f in found if f.path.endswith("/_SUCCESS")}


def _wait_until_some_shards_are_done(env: dict[str, str], output: str, job: subprocess.Popen) -> dict[str, object]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and job.poll() is None:
        done = _markers(env, output)
        if done:
            return done
        time.sleep(0.1)
    out = job.communicate(timeout=60)[0] if job.poll() is not None else ""
    raise AssertionError(f"no shard finished before the job ended (exit status {job.poll()}): {_tail(out)}")


def _result_ids(env: dict[str, str], output: str) -> list[str]:
    table = pq.read_table(f"{BUCKET}/{output}/results", filesystem=_s3(env), columns=["id", "error"])
    assert table.column("error").null_count == table.num_rows, "a good image became an error row"
    return sorted(table.column("id").to_pylist())


def _actor_pids(cluster) -> list[int]:
    """Processes of our cluster's nodes (descendants of their raylets, never anyone else's Ray) that host a model
    actor."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    raylets = {node.all_processes["raylet"][0].process.pid for node in [cluster.head_node, *cluster.worker_nodes]}

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid in raylets:
                return True
            pid = parents.get(pid, 0)
        return False

    found = []
    for pid in parents:
        try:
            title = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ModelActor" in title and ours(pid):
            found.append(pid)
    return found


def test_worker_node_killed_mid_job(cluster, store, worker):
    env, _ = store
    job = _start_job(cluster, env, "node")
    _wait_until_some_shards_are_done(env, "node", job)
    cluster.remove_node(worker, allow_graceful=False)  # SIGKILL: raylet, object store and workers of the node
    code, out = _finish(job)
    assert code == 0, _tail(out)
    assert _result_ids(env, "node") == IDS


def test_model_actor_killed_mid_job(cluster, store, worker):
    env, _ = store
    job = _start_job(cluster, env, "actor")
    _wait_until_some_shards_are_done(env, "actor", job)
    (pid,) = _actor_pids(cluster)
    os.kill(pid, signal.SIGKILL)
    code, out = _finish(job)
    assert code == 0, _tail(out)
    assert _result_ids(env, "actor") == IDS


def test_driver_killed_mid_job_then_the_same_command_resumes(cluster, store, worker):
    env, _ = store
    job = _start_job(cluster, env, "driver")
    _wait_until_some_shards_are_done(env, "driver", job)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    done = _markers(env, "driver")
    assert 0 < len(done) < SHARDS
    code, out = _finish(_start_job(cluster, env, "driver"))
    assert code == 0, _tail(out)
    after = _markers(env, "driver")
    assert len(after) == SHARDS and {k: after[k] for k in done} == done  # finished shards were not redone
    assert _result_ids(env, "driver") == IDS


def test_a_15_s_store_outage_is_waited_out_without_a_rerun(cluster, store, worker):
    env, server = store
    job = _start_job(cluster, env, "outage")
    _wait_until_some_shards_are_done(env, "outage", job)
    server.send_signal(signal.SIGSTOP)
    try:
        time.sleep(15)
    finally:
        server.send_signal(signal.SIGCONT)
    code, out = _finish(job)
    assert code == 0, _tail(out)
    assert "object store unreachable while" in out  # the outage was met, and waited out
    assert _result_ids(env, "outage") == IDS


def test_an_outage_longer_than_the_window_fails_cleanly_and_a_rerun_completes(cluster, store, worker):
    env, server = store
    job = _start_job(cluster, env, "long-outage", "--io-retry-seconds", "3")
    _wait_until_some_shards_are_done(env, "long-outage", job)
    server.send_signal(signal.SIGSTOP)
    try:
        code, out = _finish(job, timeout=180)
    finally:
        server.send_signal(signal.SIGCONT)
    assert code == 1, _tail(out)
    last = out.strip().splitlines()[-1]
    assert last.startswith("caption.py: error: object store unreachable for") and "run the same command" in last
    code, out = _finish(_start_job(cluster, env, "long-outage", "--io-retry-seconds", "3"))
    assert code == 0, _tail(out)
    assert _result_ids(env, "long-outage") == IDS
