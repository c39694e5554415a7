"""Human units for the CLI: sizes (10G, 512M, 4KiB) and rates (2Mbit, 10MB/s)."""
from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.I)
_POW = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str) -> int:
    """'10G' -> 10 GiB. K/M/G/T are binary multiples (as dd, qemu-img and truncate use them)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"invalid size {text!r}: use a number with an optional unit, e.g. 512M, 10G")
    num, unit = m.group(1), m.group(2).lower()
    value = float(num) * (1024 ** _POW[unit])
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(bit|bps|b|byte|bytes)?(/s)?\s*$", re.I)


def parse_rate(text: str) -> float:
    """A rate in bytes per second: '2Mbit' -> 250000.0, '10MB/s' -> 10e6 (decimal, as links are sold)."""
    m = _RATE_RE.match(str(text))
    if not m:
        raise ValueError(f"invalid rate {text!r}: e.g. 2Mbit, 100Mbit, 10MB/s")
    num, prefix, unit = float(m.group(1)), m.group(2).lower(), (m.group(3) or "B")
    mult = 1000 ** _POW[prefix]
    is_bits = unit.lower() in ("bit", "bps") or unit == "b"
    return num * mult / 8 if is_bits else num * mult
