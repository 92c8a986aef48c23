"""Object-store calls that wait out a short outage: retried with exponential backoff for up to
`--io-retry-seconds` of continuous failure, one log line per wait, then one clear error.

pyarrow's S3 client retries a request a few times within seconds and Ray Data's `DataContext.retried_io_errors`
covers only Ray's own file readers and writers; this job reads through its own datasource and writes on the
driver, so both sides wrap their calls here. Only errors that say the store could not be reached (or was
overloaded) are retried; a missing file or a refused permission fails at once, as before.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("trimlens.retry")

# Substrings of the messages pyarrow (AWS SDK / curl), gcsfs and the OS give when a store is unreachable or busy.
TRANSIENT_MARKS = ("curlCode", "NETWORK_CONNECTION", "Couldn't connect", "Connection refused", "Connection reset",
                   "timed out", "Timeout", "Broken pipe", "SlowDown", "ServiceUnavailable", "Service Unavailable",
                   "InternalError", "RequestTimeout", "HTTP response code: 5", "Unable to connect")
FIRST_WAIT_S = 1.0
LONGEST_WAIT_S = 15.0


class ObjectStoreUnavailable(RuntimeError):
    """The store stayed unreachable for longer than the retry window; the message is one line for the user."""


def is_transient(error: BaseException) -> bool:
    return isinstance(error, OSError) and any(mark in str(error) for mark in TRANSIENT_MARKS)


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
