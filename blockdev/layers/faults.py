"""Fault injection for tests: fail chosen ops (optionally within a byte range) with a chosen errno, or
hold write-like ops as a stalled replica would."""
from __future__ import annotations

import errno as errno_mod
import threading
from dataclasses import dataclass

from ..backend import Completion, Layer, WriteResult, combine
from ..errors import BlockError


@dataclass
class Fault:
    op: str
    err: int = errno_mod.EIO
    offset: int = 0
    length: int | None = None  # None: the whole volume
    count: int | None = None  # None: every time

    def hits(self, op: str, offset: int, length: int) -> bool:
        if op != self.op or self.count == 0:
            return False
        if self.length is not None and not (offset < self.offset + self.length and self.offset < offset + length):
            return False
        if self.count is not None:
            self.count -= 1
        return True


class FaultLayer(Layer):
    """Raises BlockError(err) for ops matching an armed fault."""

    intercepts_writes = True

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        super().__init__(inner)
        self.faults: list[Fault] = []

    def arm(self, fault: Fault) -> None:
        self.faults.append(fault)

    def _check(self, op: str, offset: int = 0, length: int = 0) -> None:
        for f in self.faults:
            if f.hits(op, offset, length):
                raise BlockError(f"injected fault in {op}", f.err)

    def pread(self, buf: memoryview, offset: int) -> None:
        self._check("pread", offset, len(buf))
        self.inner.pread(buf, offset)

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        self._check("pwrite", offset, len(data))
        return self.inner.pwrite(data, offset, fua)

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        self._check("write_zeroes", offset, length)
        return self.inner.write_zeroes(length, offset, fua, may_trim, fast)

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        self._check("trim", offset, length)
        return self.inner.trim(length, offset, fua)

    def flush(self) -> WriteResult:
        self._check("flush")
        return self.inner.flush()


class StallLayer(Layer):
    """Test injection: a stalled replica. Write-like ops are applied at once, but each returns a
    Completion that finishes only when ``release()`` is called, as a sync mirror's would while its
    replica is stuck; the front end must keep the payload (and the host's reply) until then."""

    intercepts_writes = True

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        super().__init__(inner)
        self._lock = threading.Lock()
        self._held: list[Completion] = []
        self.stalled = True

    def _hold(self, result: WriteResult) -> WriteResult:
        with self._lock:
            if not self.stalled:
                return result
            c = Completion()
            self._held.append(c)
        return combine([result, c])

    def held(self) -> int:
        """Ops waiting for ``release()``."""
        with self._lock:
            return len(self._held)

    def release(self) -> None:
        """Finish every held op and stop holding new ones."""
        with self._lock:
            self.stalled = False
            held, self._held = self._held, []
        for c in held:
            c.finish()

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        return self._hold(self.inner.pwrite(data, offset, fua))

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        return self._hold(self.inner.write_zeroes(length, offset, fua, may_trim, fast))

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        return self._hold(self.inner.trim(length, offset, fua))

    def flush(self) -> WriteResult:
        return self._hold(self.inner.flush())
