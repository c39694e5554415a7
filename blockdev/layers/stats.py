"""Count ops and bytes per op; status reads ``statistics()``."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from ..backend import Layer, WriteResult


@dataclass(frozen=True)
class OpStats:
    reads: int
    read_bytes: int
    writes: int
    write_bytes: int
    zeroes: int
    zero_bytes: int
    trims: int
    trim_bytes: int
    flushes: int
    errors: int


class StatsLayer(Layer):
    """Per-op counters. Plain integer adds under the GIL; the lock is only for a consistent snapshot."""

    intercepts_writes = True

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        super().__init__(inner)
        self._lock = threading.Lock()
        self.reads = self.read_bytes = 0
        self.writes = self.write_bytes = 0
        self.zeroes = self.zero_bytes = 0
        self.trims = self.trim_bytes = 0
        self.flushes = self.errors = 0

    def pread(self, buf: memoryview, offset: int) -> None:
        self.reads += 1
        self.read_bytes += len(buf)
        try:
            self.inner.pread(buf, offset)
        except Exception:
            self.errors += 1
            raise

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        self.writes += 1
        self.write_bytes += len(data)
        try:  # inline rather than _counted: this is every host write's path
            return self.inner.pwrite(data, offset, fua)
        except Exception:
            self.errors += 1
            raise

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        self.zeroes += 1
        self.zero_bytes += length
        return self._counted(self.inner.write_zeroes, length, offset, fua, may_trim, fast)

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        self.trims += 1
        self.trim_bytes += length
        return self._counted(self.inner.trim, length, offset, fua)

    def flush(self) -> WriteResult:
        self.flushes += 1
        return self._counted(self.inner.flush)

    def _counted(self, fn, *args) -> WriteResult:  # type: ignore[no-untyped-def]
        try:
            return fn(*args)
        except Exception:
            self.errors += 1
            raise

    def statistics(self) -> OpStats:
        with self._lock:
            return OpStats(self.reads, self.read_bytes, self.writes, self.write_bytes, self.zeroes,
                           self.zero_bytes, self.trims, self.trim_bytes, self.flushes, self.errors)
