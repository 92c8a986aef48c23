"""pipeline.retry: which errors are waited out, how long, what is logged, and that a reopened stream never hands
an item on twice. The errors come from a real pyarrow S3 client talking to a closed port, and to a real SeaweedFS
server that is stopped (SIGSTOP) and resumed."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Iterator
from unittest import mock

import pyarrow.fs as pafs
import pytest

from pipeline import retry
from pipeline.retry import ObjectStoreUnavailable, Outage
from pipeline.sources import open_uri
from pipeline_data import seaweedfs_server


@pytest.fixture(autouse=True)
def short_waits(monkeypatch):
    monkeypatch.setattr(retry, "FIRST_WAIT_S", 0.01)
    monkeypatch.setattr(retry, "LONGEST_WAIT_S", 0.05)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def unreachable_s3() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{_closed_port()}", scheme="http", access_key="k",
                             secret_key="s", region="us-east-1", connect_timeout=1, request_timeout=1,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))


def test_an_unreachable_store_is_retried_for_the_window_then_one_clear_error(unreachable_s3, caplog):
    caplog.set_level(logging.WARNING, "trimlens.retry")
    with pytest.raises(ObjectStoreUnavailable) as failure:
        retry.call(lambda: unreachable_s3.get_file_info("bucket/in"), "listing s3://bucket/in", window_s=0.3)
    message = str(failure.value)
    assert message.startswith("object store unreachable for 0 s (--io-retry-seconds 0.3) while listing s3://bucket/in")
    assert "\n" not in message and retry.is_transient(failure.value.__context__)
    waits = [r.getMessage() for r in caplog.records]
    assert len(waits) >= 2 and all("retrying in" in w and "listing s3://bucket/in" in w for w in waits)


class FlakyStore:
    """Fails `failures` times with a real connection error, then answers."""

    def __init__(self, failures: int, error: OSError):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answer"


@pytest.fixture
def connection_error(unreachable_s3) -> OSError:
    try:
        unreachable_s3.get_file_info("bucket/x")
    except OSError as e:
        return e
    raise AssertionError("a closed port answered")


def test_a_short_outage_is_waited_out(connection_error, caplog):
    caplog.set_level(logging.WARNING, "trimlens.retry")
    store = FlakyStore(3, connection_error)
    assert retry.call(store, "writing shard a", window_s=30) == "answer"
    assert store.calls == 4 and len(caplog.records) == 3


def test_errors_that_are_not_about_reaching_the_store_fail_at_once():
    store = FlakyStore(1, FileNotFoundError("bucket/in/a.parquet: No such file or directory"))
    with pytest.raises(FileNotFoundError):
        retry.call(store, "opening a.parquet", window_s=30)
    assert store.calls == 1


def test_the_window_counts_continuous_failure_and_restarts_after_a_success(connection_error):
    now = [0.0]
    slept: list[float] = []
    outage = Outage(10, sleep=lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)), clock=lambda: now[0])
    for _ in range(4):
        outage.wait(connection_error, "reading")
    assert slept == [0.01, 0.02, 0.04, 0.05]  # doubling, capped
    outage.ok()
    now[0] += 100
    outage.wait(connection_error, "reading")  # a new stretch: not over the window although 100 s passed
    now[0] += 10
    with pytest.raises(ObjectStoreUnavailable, match="unreachable for 10 s"):
        outage.wait(connection_error, "reading")


def test_a_reopened_stream_skips_what_it_already_handed_on(connection_error):
    opened = []

    def rows() -> Iterator[int]:
        opened.append(len(opened))
        for i in range(6):
            if len(opened) < 3 and i == 2 * len(opened):  # the first open breaks after row 1, the second after row 3
                raise connection_error
            yield i

    assert list(retry.resumable(rows, "reading shard a", window_s=30)) == [0, 1, 2, 3, 4, 5]
    assert len(opened) == 3


def test_a_stream_that_stays_down_fails_after_the_rows_it_delivered(connection_error):
    def rows() -> Iterator[int]:
        yield 0
        raise connection_error

    delivered = []
    with pytest.raises(ObjectStoreUnavailable, match="while reading shard a"):
        for row in retry.resumable(rows, "reading shard a", window_s=0.1):
            delivered.append(row)
    assert delivered == [0]


@pytest.fixture(scope="module")
def stoppable_s3(tmp_path_factory):
    """A real SeaweedFS S3 server and a filesystem made the way jobs make theirs (from an s3:// URI)."""
    with seaweedfs_server(tmp_path_factory.mktemp("retry") / "s3", "retry") as (env, server):
        with mock.patch.dict(os.environ, env):  # the keys are read from the environment at every call
            fs, _ = open_uri("s3://retry/x", "--input")
            yield fs, server


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


@contextmanager
def stopped(server: subprocess.Popen):
    server.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.send_signal(signal.SIGCONT)


def test_a_store_that_stops_answering_fails_after_the_window_not_after_pyarrows_own_retries(stoppable_s3):
    fs, server = stoppable_s3
    started = time.monotonic()
    with stopped(server), pytest.raises(ObjectStoreUnavailable, match="curlCode: 28"):
        retry.call(lambda: fs.get_file_info("retry/x"), "probing", window_s=1)
    assert time.monotonic() - started < 20  # pyarrow's default strategy alone keeps trying for ~100 s


def test_a_stopped_and_resumed_store_is_waited_for(stoppable_s3, caplog):
    fs, server = stoppable_s3
    caplog.set_level(logging.WARNING, "trimlens.retry")
    with stopped(server):
        resume = threading.Timer(8, server.send_signal, [signal.SIGCONT])  # longer than pyarrow's 2 tries
        resume.start()
        retry.call(lambda: _write(fs, "retry/written", b"x"), "writing", window_s=60)
    resume.join()
    assert fs.get_file_info("retry/written").size == 1 and caplog.records
