"""The interception seam: every write-like op of a served volume passes through MirrorLayer.

With no replicator attached it is a pass-through. A replicator (sync now; async later) sees each op
before it is applied locally, so the replica frame can be on the wire while the local write runs, and
may return a Completion that delays the host's acknowledgement until the replica has the write. It is
also told when the local write has finished (``local_done``): a resync that reads the volume must not
read a region while a write to it is still landing, or it could ship older data after newer.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from blockdev.backend import Backend, Completion, Layer, WriteResult, combine


class Replicator(Protocol):
    """What the seam hands writes to. Each method is called from the thread that issued the op (or,
    after an admission that had to wait, from the thread that finished it)."""

    def admit(self, offset: int, length: int) -> WriteResult:
        """Before a write/zero is issued: None to go ahead, or a Completion to wait for (the mirror's
        activity log must record the range first; the caller's thread must not block on that)."""
    def on_write(self, offset: int, data: memoryview | bytes, fua: bool) -> WriteResult: ...
    def on_zero(self, offset: int, length: int, fua: bool, trim: bool) -> WriteResult: ...
    def on_flush(self) -> WriteResult: ...
    def withdraw(self, offset: int, length: int) -> None:
        """An admitted op was never issued (the local image refused it before anything was sent)."""

    def local_done(self, offset: int, length: int, ok: bool) -> None:
        """The local half of a write/zero announced by on_write/on_zero finished (ok=False: it failed)."""


class MirrorLayer(Layer):
    """Applies writes locally and hands them to the attached replicator (if any)."""

    intercepts_writes = True

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.replicator: Replicator | None = None

    def attach(self, replicator: Replicator | None) -> None:
        self.replicator = replicator

    @staticmethod
    def _local(rep: Replicator, offset: int, length: int, op: Callable[[], WriteResult]) -> WriteResult:
        try:
            res = op()
        except BaseException:
            rep.local_done(offset, length, False)
            raise
        if res is None:
            rep.local_done(offset, length, True)
        else:
            res.add_done_callback(lambda exc: rep.local_done(offset, length, exc is None))
        return res

    @staticmethod
    def _admitted(rep: Replicator, offset: int, length: int, issue: Callable[[], WriteResult]) -> WriteResult:
        """``issue()`` once the replicator admits the range; at once in the usual case."""
        gate = rep.admit(offset, length)
        if gate is None:
            return issue()
        out = Completion()

        def go(exc: BaseException | None) -> None:
            if exc is not None:
                out.finish(exc)
                return
            try:
                res = issue()
            except BaseException as e:  # noqa: BLE001 - the host gets it as the op's error
                out.finish(e)
                return
            if res is None:
                out.finish()
            else:
                res.add_done_callback(out.finish)

        gate.add_done_callback(go)
        return out

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        rep = self.replicator
        if rep is None:
            return self.inner.pwrite(data, offset, fua)

        def issue() -> WriteResult:
            # Replica first, so the frame is on the wire while the local write runs.
            remote = rep.on_write(offset, data, fua)
            local = self._local(rep, offset, len(data), lambda: self.inner.pwrite(data, offset, fua))
            return combine([local, remote])

        return self._admitted(rep, offset, len(data), issue)

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        rep = self.replicator
        if rep is None:
            return self.inner.write_zeroes(length, offset, fua, may_trim, fast)

        def issue() -> WriteResult:
            if fast:  # FastZeroUnsupported must reach the host before anything is sent to the replica
                try:
                    local = self.inner.write_zeroes(length, offset, fua, may_trim, fast)
                except BaseException:
                    rep.withdraw(offset, length)
                    raise
                remote = rep.on_zero(offset, length, fua, False)
                rep.local_done(offset, length, True)
                return combine([local, remote])
            remote = rep.on_zero(offset, length, fua, False)
            local = self._local(rep, offset, length, lambda: self.inner.write_zeroes(length, offset, fua, may_trim))
            return combine([local, remote])

        return self._admitted(rep, offset, length, issue)

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        rep = self.replicator
        if rep is None:
            return self.inner.trim(length, offset, fua)

        def issue() -> WriteResult:
            # Our images read back zeroes after trim, so the replica must as well.
            remote = rep.on_zero(offset, length, fua, True)
            local = self._local(rep, offset, length, lambda: self.inner.trim(length, offset, fua))
            return combine([local, remote])

        return self._admitted(rep, offset, length, issue)

    def flush(self) -> WriteResult:
        rep = self.replicator
        if rep is None:
            return self.inner.flush()
        remote = rep.on_flush()
        return combine([self.inner.flush(), remote])
