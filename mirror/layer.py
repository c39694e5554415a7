"""The interception seam: every write-like op of a served volume passes through MirrorLayer.

With no replicator attached it is a pass-through. A replicator (sync now; async later) sees each op
after it is applied locally (or in parallel with it) and may return a Completion that delays the
host's acknowledgement until the replica has the write.
"""
from __future__ import annotations

from typing import Protocol

from blockdev.backend import Backend, Layer, WriteResult, combine


class Replicator(Protocol):
    """What the seam hands writes to. Each method is called from the thread that issued the op."""

    def on_write(self, offset: int, data: memoryview | bytes, fua: bool) -> WriteResult: ...
    def on_zero(self, offset: int, length: int, fua: bool, trim: bool) -> WriteResult: ...
    def on_flush(self) -> WriteResult: ...


class MirrorLayer(Layer):
    """Applies writes locally and hands them to the attached replicator (if any)."""

    intercepts_writes = True

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.replicator: Replicator | None = None

    def attach(self, replicator: Replicator | None) -> None:
        self.replicator = replicator

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        rep = self.replicator
        if rep is None:
            return self.inner.pwrite(data, offset, fua)
        # Replica first, so the frame is on the wire while the local write runs.
        remote = rep.on_write(offset, data, fua)
        return combine([self.inner.pwrite(data, offset, fua), remote])

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        rep = self.replicator
        if rep is None:
            return self.inner.write_zeroes(length, offset, fua, may_trim, fast)
        local = self.inner.write_zeroes(length, offset, fua, may_trim, fast)  # FastZeroUnsupported first
        return combine([local, rep.on_zero(offset, length, fua, False)])

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        rep = self.replicator
        if rep is None:
            return self.inner.trim(length, offset, fua)
        # Our images read back zeroes after trim, so the replica must as well.
        local = self.inner.trim(length, offset, fua)
        return combine([local, rep.on_zero(offset, length, fua, True)])

    def flush(self) -> WriteResult:
        rep = self.replicator
        if rep is None:
            return self.inner.flush()
        remote = rep.on_flush()
        return combine([self.inner.flush(), remote])
