"""The NBD server's bounds: what one client, one volume and one listener may hold, and the pieces
that enforce them without costing the hot path more than a comparison per batch.

- ``Limits``: the numbers, one frozen object passed down from the server (no module globals).
- ``WriteBudget``: bytes of host writes in flight on one volume, over all its connections; a
  connection stops reading while the budget is used up (back-pressure to the client).
- ``raise_fd_limit``: idle connections are descriptors; the soft limit goes up to the hard one.
- ``RateLimited``: a log line that may repeat (accept failures, refusals) at most once per interval.
"""
from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

log = logging.getLogger("blockdev.nbd")


@dataclass(frozen=True)
class Limits:
    """Bounds of one NBD server. Defaults are far above what a real client uses (QD32 of 4 KiB,
    QD8 of 1 MiB) and low enough that a hostile client cannot grow the server without bound."""

    reply_bytes: int = 64 << 20  # queued reply bytes of one connection before it stops reading
    reply_parts: int = 16384  # queued reply pieces (a read reply is two): tiny replies count too
    inflight: int = 4096  # ops of one connection still running on workers or waiting on a Completion
    batch: int = 2048  # requests parsed from the receive buffer in one pass
    write_bytes: int = 64 << 20  # host write bytes in flight per volume (all its connections)
    connections: int = 1000  # open connections per listener, handshakes included
    refusing: int = 32  # refused connections told why (NBD_REP_ERR_POLICY) at once; others just closed
    refuse_timeout: float = 5.0  # how long a refused client may take to hear it

    def __post_init__(self) -> None:
        for name in ("reply_bytes", "reply_parts", "inflight", "batch", "write_bytes", "connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"NBD limit {name} must be at least 1")


@dataclass(frozen=True)
class BudgetStats:
    cap: int
    used: int
    peak: int
    waiting: int


class WriteBudget:
    """Bytes of host writes in flight on one volume: taken when a write leaves its batch (a worker,
    or a Completion still pending), given back when it finishes. Trio thread only (NBD finishes ops
    there), so a take or a give is an addition, no lock.

    ``full()`` is checked once per batch; a single write larger than the cap still proceeds, alone.
    """

    __slots__ = ("_waiters", "cap", "peak", "used")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self.peak = 0
        self._waiters: list[trio.Event] = []

    def full(self) -> bool:
        return self.used >= self.cap

    def take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, f"write budget gave back more than it took ({self.used})"  # a bug, not a floor
        if self._waiters and self.used < self.cap:
            waiters, self._waiters = self._waiters, []
            for ev in waiters:
                ev.set()

    async def room(self) -> None:
        """Wait until the budget is not full (cancellable: a closing connection stops waiting)."""
        while self.used >= self.cap:
            ev = trio.Event()
            self._waiters.append(ev)
            await ev.wait()

    def statistics(self) -> BudgetStats:
        return BudgetStats(self.cap, self.used, self.peak, len(self._waiters))


def raise_fd_limit(want: int | None = None) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit (or ``want``); returns the soft limit now.

    Every idle client is a descriptor: the default soft limit of 1024 is far below what a server
    with a 1000-connection cap needs, while the hard limit usually allows it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if want is not None:
        target = min(target, want)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:  # e.g. above fs.nr_open: keep what we have
            log.info("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft


class RateLimited:
    """A log line that may repeat (a failing accept, refused clients) at most once per ``every``
    seconds, saying how many were left out since the last one. Pure but for ``logger``: the clock is
    a parameter, so tests need no sleeping."""

    def __init__(self, logger: logging.Logger, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.every, self._clock = logger, every, clock
        self._next = float("-inf")
        self.dropped = 0
        self._key: object = None

    def __call__(self, level: int, msg: str, *args: object, key: object = None) -> bool:
        """Log ``msg % args`` unless one was logged less than ``every`` ago; True if logged. A
        ``key`` other than the last one's (a different error) is logged at once."""
        now = self._clock()
        if key != self._key:
            self._key, self._next, self.dropped = key, float("-inf"), 0
        if now < self._next:
            self.dropped += 1
            return False
        suffix = f" ({self.dropped} more since the last message)" if self.dropped else ""
        self._next, self.dropped = now + self.every, 0
        self.logger.log(level, msg + suffix, *args)
        return True


class Backoff:
    """Doubling delays between ``low`` and ``high``; ``reset()`` after a success."""

    def __init__(self, low: float = 0.05, high: float = 1.0) -> None:
        self.low, self.high = low, high
        self._next = low

    def next(self) -> float:
        delay = self._next
        self._next = min(self.high, delay * 2)
        return delay

    def reset(self) -> None:
        self._next = self.low
