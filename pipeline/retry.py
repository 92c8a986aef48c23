"""Object-store calls that wait out a short outage: retried with exponential backoff for up to
`--io-retry-seconds` of continuous failure, one log line per wait, then one clear error.

Why not only the knobs that exist: pyarrow's S3 client retries a request a few times within seconds
(AwsStandardS3RetryStrategy counts attempts, it has no time budget). Ray Data retries I/O errors listed in
`DataContext.retried_io_errors` only inside its own file readers and writers, which this job does not use (its
datasource reads shards itself; the driver writes), and `retried_map_errors` / `max_map_retries` replay a map task
a number of times with full-jitter backoff; both log at debug level and neither has a time window. So listing,
reads and writes go through here, which uses Ray's list of retried errors (plus curl's connection errors) to decide
what is worth waiting for, and replays a read the way Ray does (skipping what was already handed on). S3 clients
are made to give up quickly (`fail_fast`) so that this window is the one that counts. A missing file or a refused
permission fails at once, as before.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, TypeVar

import pyarrow.fs as pafs
from ray.data import DataContext

T = TypeVar("T")
log = logging.getLogger("trimlens.retry")

# What says "the store could not be reached or was busy", beyond Ray Data's own list (DataContext.retried_io_errors,
# the AWS SDK's NETWORK_CONNECTION / SLOW_DOWN / 503 ...): curl's and the OS's words for refused or timed-out
# connections, as pyarrow's S3 client and other filesystems report them.
CONNECTION_MARKS = ("curlCode", "Could not connect", "Couldn't connect", "Connection refused", "Connection reset",
                    "timed out", "Timeout", "Broken pipe", "Unable to connect", "Service Unavailable")
S3_ATTEMPTS = 2  # per call inside pyarrow's S3 client; the waiting is done here
FIRST_WAIT_S = 1.0
LONGEST_WAIT_S = 15.0


class ObjectStoreUnavailable(RuntimeError):
    """The store stayed unreachable for longer than the retry window; the message is one line for the user."""


def is_transient(error: BaseException) -> bool:
    if not isinstance(error, OSError):
        return False
    text = str(error)
    return any(mark in text for mark in (*DataContext.get_current().retried_io_errors, *CONNECTION_MARKS))


class Outage:
    """Tracks one stretch of failures: `wait(error, what)` sleeps before the next try or raises once the stretch is
    longer than the window; `ok()` ends the stretch."""

    def __init__(self, window_s: float, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.window_s, self.sleep, self.clock = window_s, sleep, clock
        self.started: float | None = None
        self.next_wait = FIRST_WAIT_S

    def ok(self) -> None:
        self.started, self.next_wait = None, FIRST_WAIT_S

    def wait(self, error: Exception, what: str) -> None:
        if not is_transient(error):
            raise error
        now = self.clock()
        self.started = now if self.started is None else self.started
        left = self.started + self.window_s - now
        reason = str(error).strip().splitlines()[0]
        if left <= 0:
            raise ObjectStoreUnavailable(f"object store unreachable for {now - self.started:.0f} s (--io-retry-seconds "
                                         f"{self.window_s:g}) while {what}: {reason}") from None
        pause = min(self.next_wait, left)
        log.warning("object store unreachable while %s (%s); retrying in %.1f s, %.0f s left of --io-retry-seconds",
                    what, reason, pause, left)
        self.sleep(pause)
        self.next_wait = min(2 * self.next_wait, LONGEST_WAIT_S)


def fail_fast(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The same filesystem, but an S3 one gives up a call after S3_ATTEMPTS tries (~3 s each against a store that
    does not answer) instead of pyarrow's default of retrying silently for ~100 s, so the outage window, its log
    lines and its error are this module's. The retry strategy does not survive pickling: apply this again after
    a filesystem has been shipped to a Ray task."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    _, (settings,) = fs.__reduce__()  # every option the filesystem was made with (endpoint, region, keys, ...)
    return pafs.S3FileSystem(**settings, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))


def call(fn: Callable[[], T], what: str, window_s: float) -> T:
    """fn(), retried while the store is unreachable. fn must be safe to repeat (reads, listings, whole-file writes)."""
    outage = Outage(window_s)
    while True:
        try:
            return fn()
        except OSError as e:
            outage.wait(e, what)


def resumable(open_rows: Callable[[], Iterator[T]], what: str, window_s: float) -> Iterator[T]:
    """The items of a stream that is reopened from the start after a transient error, skipping the items already
    yielded, so a reader that has handed rows downstream never hands them twice. The window restarts with every
    item that gets through."""
    outage = Outage(window_s)
    delivered = 0
    while True:
        try:
            for index, item in enumerate(open_rows()):
                if index >= delivered:
                    outage.ok()
                    yield item
                    delivered += 1
            return
        except OSError as e:
            outage.wait(e, what)
