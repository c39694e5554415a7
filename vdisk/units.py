"""Human units for the CLI: sizes (10G, 512M, 4KiB), durations (30s, 2m, 500ms) and rates.

Every size and duration flag of every command goes through ``parse_size`` / ``parse_duration``, so a
bad number is one clear error at the command line, never a traceback or a hung write later. Sizes are
exact: the digits are parsed as integers (never through float, where ``1.0000000000000001G`` is 1 GiB).
"""
from __future__ import annotations

import math
import re

# ASCII digits only (\d also matches other scripts' digits), spaces only (no newline), fullmatch.
_SIZE_RE = re.compile(r" *([0-9]{1,30})(?:\.([0-9]{1,30}))? *([kmgtpe]?)(i?b?) *", re.IGNORECASE | re.ASCII)
_POW = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
MAX_SIZE = 1 << 63  # nothing we address is larger (NBD and file offsets are 64-bit)


def parse_size(text: str, *, multiple: int = 1, minimum: int = 1) -> int:
    """'10G' -> 10 GiB, exactly. K/M/G/T are binary multiples (as dd, qemu-img and truncate use them).

    A fraction is fine when it is a whole number of bytes (1.5G); the result must be at least
    ``minimum`` and a multiple of ``multiple``. ValueError with a message for the user otherwise.
    """
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise ValueError(f"invalid size {text!r}: use a number with an optional unit, e.g. 512M, 10G")
    whole, frac, unit = m.group(1), m.group(2) or "", m.group(3).lower()
    scaled = int(whole + frac) * (1 << (10 * _POW[unit]))
    value, rest = divmod(scaled, 10 ** len(frac))
    if rest:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    if value > MAX_SIZE:
        raise ValueError(f"invalid size {text!r}: too large (at most 8 EiB)")
    if value < minimum:
        raise ValueError(f"invalid size {text!r}: at least {minimum} bytes")
    if value % multiple:
        raise ValueError(f"invalid size {text!r}: must be a multiple of {multiple} bytes")
    return value


_DURATION_RE = re.compile(r" *([0-9]{1,15}(?:\.[0-9]{1,9})?) *(ms|s|sec|m|min|h|d)? *", re.IGNORECASE | re.ASCII)
_SECONDS = {"ms": 0.001, "": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
MAX_DURATION = 365 * 86400.0  # larger timeouts overflow socket timeouts (C timeval) and mean "never"


def parse_duration(value: str | float, what: str = "duration") -> float:
    """Seconds from '30s', '2m', '1h', '500ms' or a plain number of seconds; strictly positive, finite,
    at most a year. Numbers already parsed (e.g. from a saved configuration) are checked the same way."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION_RE.fullmatch(str(value))
        if not m:
            raise ValueError(f"invalid {what} {value!r}: use a number of seconds or a unit, e.g. 30s, 2m, 500ms")
        seconds = float(m.group(1)) * _SECONDS[(m.group(2) or "").lower()]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"invalid {what} {value!r}: must be a positive time, e.g. 30s, 2m, 500ms")
    if seconds > MAX_DURATION:
        raise ValueError(f"invalid {what} {value!r}: at most a year")
    return seconds


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


_RATE_RE = re.compile(r" *([0-9]{1,15}(?:\.[0-9]{1,9})?) *([kmgt]?)(bit|bps|b|byte|bytes)?(/s)? *",
                      re.IGNORECASE | re.ASCII)


def parse_rate(text: str) -> float:
    """A rate in bytes per second: '2Mbit' -> 250000.0, '10MB/s' -> 10e6 (decimal, as links are sold)."""
    m = _RATE_RE.fullmatch(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"invalid rate {text!r}: e.g. 2Mbit, 100Mbit, 10MB/s")
    num, prefix, unit = float(m.group(1)), m.group(2).lower(), (m.group(3) or "B")
    mult = 1000 ** _POW[prefix]
    is_bits = unit.lower() in ("bit", "bps") or unit == "b"
    return num * mult / 8 if is_bits else num * mult
