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


# Rates: NUMBER [PREFIX][i] [UNIT] [/s]. The unit's case carries meaning only in the one place the
# world agrees on it: a lone ``b`` (or ``bps``) is bits, a lone ``B`` (or ``Bps``) is bytes, as on link
# datasheets. ``bit``/``bits`` and ``byte``/``bytes`` are spelled out and so case-insensitive.
_RATE_RE = re.compile(r" *([0-9]{1,15}(?:\.[0-9]{1,9})?) *(?:([kKmMgGtT])(i?))?(bits?|BITS?|Bits?|bps|Bps|b|B|"
                      r"bytes?|BYTES?|Bytes?)?(/s|/S)? *", re.ASCII)
_RATE_HELP = "use e.g. 2Mbit, 512kbit, 10MB/s, 10MiB/s or unlimited"
MAX_RATE = 1e15  # bytes/s (8 Pbit/s): anything larger is a typo, and floats stay exact in the bucket


def parse_rate(text: str) -> float | None:
    """Bytes per second from '2Mbit' (250000.0), '10MB/s' (10e6), '10MiB/s' (10*2**20); None for 'unlimited'.

    Bits or bytes: ``bit``, ``bps`` or a lowercase ``b`` mean bits; ``B``, ``Bps`` or ``byte(s)`` mean
    bytes; no unit means bytes. k/M/G/T are decimal (links are sold that way), Ki/Mi/Gi/Ti binary.
    Zero is an error (say ``unlimited``), so a stray 0 never silently stops or unthrottles a mirror.
    """
    raw = str(text)
    if raw.strip().lower() == "unlimited":
        return None
    m = _RATE_RE.fullmatch(raw)
    if not m:
        raise ValueError(f"invalid rate {raw!r}: {_RATE_HELP}")
    num, prefix, binary, unit = float(m.group(1)), (m.group(2) or "").lower(), m.group(3), m.group(4) or "B"
    if binary and not prefix:
        raise ValueError(f"invalid rate {raw!r}: {_RATE_HELP}")
    mult = (1024 if binary else 1000) ** _POW[prefix]
    is_bits = unit.lower().startswith("bit") or unit in ("b", "bps")
    value = num * mult / 8 if is_bits else num * mult
    if value <= 0:
        raise ValueError(f"invalid rate {raw!r}: must be positive (use unlimited for no limit)")
    if value > MAX_RATE:
        raise ValueError(f"invalid rate {raw!r}: too large (at most 8 Pbit/s)")
    return value


def format_rate(bytes_per_s: float | None) -> str:
    """250000.0 -> '2.0 Mbit/s' (bits, decimal, like link speeds); None -> 'unlimited'."""
    if bytes_per_s is None:
        return "unlimited"
    bits = float(bytes_per_s) * 8
    if abs(bits) < 1000:
        return f"{bits:.0f} bit/s"
    for unit in ("kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"):
        bits /= 1000
        if abs(bits) < 1000 or unit == "Tbit/s":
            break
    return f"{bits:.1f} {unit}"


_CLOCK_RE = re.compile(r" *([0-9]{1,2}):([0-9]{2}) *", re.ASCII)


def parse_clock(text: str, *, allow_24: bool = False) -> tuple[int, int]:
    """'08:30' -> (8, 30): a wall-clock time of day; '24:00' only with ``allow_24`` (a window's end)."""
    m = _CLOCK_RE.fullmatch(str(text))
    if m:
        hour, minute = int(m.group(1)), int(m.group(2))
        if (hour < 24 and minute < 60) or (allow_24 and hour == 24 and minute == 0):
            return hour, minute
    raise ValueError(f"invalid time {str(text)!r}: use HH:MM, e.g. 08:00")
