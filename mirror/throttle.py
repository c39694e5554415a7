"""The async mirror's bandwidth limiter: a token bucket that says how long to wait, never waits.

Like nbdkit's rate filter, the limiter is pure arithmetic on a clock value the caller passes in
(``time.monotonic()`` or ``trio.current_time()``): it never sleeps and never reads a clock, so the
shipper's ``await trio.sleep(bucket.reserve(n, trio.current_time()))`` is the only I/O, and tests
drive it with a fake clock or trio's ``MockClock``.

Accounting is by debt: ``reserve`` takes the bytes at once (tokens may go negative, so a frame larger
than the burst is allowed) and returns the time until the tokens for them have been earned. A caller
that waits that long before sending never exceeds ``burst + rate * t`` bytes by time ``t``, and one
that keeps the link busy sends at least ``rate * t - largest frame``. A caller that oversleeps (timer
slack, a busy loop) earns tokens meanwhile, up to ``burst``, and catches up on the next frames.

The default burst is ``rate * 0.1 s`` (``DEFAULT_BURST_SECONDS``): it absorbs oversleeping of up to a
tenth of a second, and costs at most 1 % of a 10 s window as an initial spike. No floor in bytes is
needed, because debt lets any frame through. Accuracy over a window ``W`` is therefore within
``max(burst, largest frame) / (rate * W)``: within ±10 % over 10 s whenever frames are at most one
second's worth of bytes. At 64 kbit/s a 4 MiB frame alone is 9 minutes of link time; no limiter can
send it faster without breaking the rate, so there the average holds over the frame's own duration.
"""
from __future__ import annotations

import math

DEFAULT_BURST_SECONDS = 0.1


def _check_rate(rate: float | None) -> float | None:
    if rate is None:
        return None
    rate = float(rate)
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"invalid rate {rate!r}: must be a positive number of bytes per second, or None")
    return rate


class TokenBucket:
    """Bytes per second with a burst; ``rate=None`` is unlimited. Not thread-safe: one shipper owns it."""

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        if burst is not None and (not math.isfinite(burst) or burst <= 0):
            raise ValueError(f"invalid burst {burst!r}: must be a positive number of bytes")
        self._fixed_burst = None if burst is None else float(burst)
        self.rate: float | None = _check_rate(rate)
        self._tokens = self.burst  # starts full
        self._last: float | None = None  # the clock value of the last update; None until first use

    @property
    def burst(self) -> float:
        """The most tokens the bucket holds (bytes); 0 when unlimited."""
        if self.rate is None:
            return 0.0
        return self._fixed_burst if self._fixed_burst is not None else self.rate * DEFAULT_BURST_SECONDS

    def _tokens_at(self, now: float) -> float:
        if self.rate is None:
            return 0.0
        if self._last is None or now <= self._last:  # a clock that steps back earns nothing
            return self._tokens
        return min(self.burst, self._tokens + (now - self._last) * self.rate)

    def _advance(self, now: float) -> None:
        self._tokens = self._tokens_at(now)
        if self._last is None or now > self._last:
            self._last = now

    def set_rate(self, rate: float | None, now: float) -> None:
        """Change the rate from ``now``: bytes earned so far count at the old rate, debt is kept in
        bytes (repaid at the new rate), and the tokens are capped at the new burst, so no spike."""
        rate = _check_rate(rate)
        if rate == self.rate:
            return
        was_unlimited = self.rate is None
        self._advance(now)
        self.rate = rate
        if rate is None:
            self._tokens = 0.0
        elif was_unlimited:
            self._tokens = 0.0  # no stored-up burst on top of what just went out unthrottled
        else:
            self._tokens = min(self._tokens, self.burst)

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` now; return the seconds to wait before sending them (0.0 if none)."""
        if nbytes < 0:
            raise ValueError(f"invalid reservation {nbytes!r}: must be at least 0 bytes")
        if self.rate is None:
            return 0.0
        self._advance(now)
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def delay(self, nbytes: int, now: float) -> float:
        """What ``reserve(nbytes, now)`` would return, without taking anything."""
        if self.rate is None:
            return 0.0
        short = nbytes - self._tokens_at(now)
        return 0.0 if short <= 0 else short / self.rate
