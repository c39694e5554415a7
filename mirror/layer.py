"""The interception seam: every write-like op of a served volume passes through MirrorLayer.

With no replicator attached it is a pass-through: that is an unmirrored volume. A mirrored volume
always has one (mirror/base.py ``Marking`` while no replica can be sent to), so no write is ever
unrecorded; ``attach`` swaps replicators atomically for writes (each op uses the one it started
with). A replicator (sync now; async later) admits each op's range before it is issued, sees the op
before it is applied locally (a fast zero: just after), so the replica frame can be on the wire
while the local write runs, and may return a Completion that delays the host's acknowledgement until
the replica has the write. It is also told when the local write has finished (``local_done``): a
resync that reads the volume must not read a region while a write to it is still landing, or it
could ship older data after newer.

Batches (DESIGN.md, "The sync mirror: what was measured"): between ``plug()`` and ``unplug()`` on one
thread (the NBD server plugs around each run of small inline writes of a receive batch) the local
halves of writes are deferred: ``unplug`` first has the replicator send every queued frame in one
``sendmsg``, then does the local pwrites, so the replica applies the batch while the source writes it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from blockdev.backend import Backend, Completion, Layer, WriteResult, combine


class Replicator(Protocol):
    """What the seam hands writes to. Each method is called from the thread that issued the op (or,
    after an admission that had to wait, from the thread that finished it)."""

    def admit(self, offset: int, length: int) -> WriteResult:
        """Before a write/zero/trim is issued: None to go ahead, or a Completion to wait for (the
        mirror's activity log must record the range first; the caller's thread must not block on
        that). Each admission is closed exactly once, by ``local_done``/``landed`` once the op was
        issued, or by ``withdraw``; one whose Completion fails was not made."""
    def on_write(self, offset: int, data: memoryview | bytes, fua: bool,
                 done: Completion | None = None) -> WriteResult:
        """Queue the write for the replica. Returns None when there is nothing to wait for, else the
        Completion to wait on: ``done`` if given (one ``finish`` when the replica has it), or a new one."""
    def hold(self) -> None:
        """Frames this thread queues from now on need not leave before ``push`` (a batch is open)."""
    def push(self) -> None:
        """Send what is queued now, without blocking (the caller is about to do slow local work)."""
    def on_zero(self, offset: int, length: int, fua: bool, trim: bool) -> WriteResult: ...
    def on_flush(self) -> WriteResult: ...
    def withdraw(self, offset: int, length: int) -> None:
        """An admitted op was never issued (the local image refused it before anything was sent)."""

    def local_done(self, offset: int, length: int, ok: bool) -> None:
        """The local half of a write/zero announced by on_write/on_zero finished (ok=False: it failed)."""
    def landed(self, ranges: list[tuple[int, int]]) -> None:
        """``local_done(offset, length, True)`` for each range (a batch, under one lock)."""


class MirrorLayer(Layer):
    """Applies writes locally and hands them to the attached replicator (if any)."""

    intercepts_writes = True

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.replicator: Replicator | None = None
        # Local halves deferred by plug(): (data, offset, fua, completion); the plugging thread's id
        # and the replicator they were handed to.
        self._deferred: list[tuple[memoryview | bytes, int, bool, Completion]] = []
        self._plug_thread = 0
        self._plug_rep: Replicator | None = None
        self._plug_lock = threading.Lock()

    def attach(self, replicator: Replicator | None) -> None:
        """Hand later ops to ``replicator`` (one assignment: atomic for writes; ops already started
        finish with the replicator they began with, which must mark what it cannot send)."""
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

    @classmethod
    def _admitted(cls, rep: Replicator, offset: int, length: int, issue: Callable[[], WriteResult]) -> WriteResult:
        """``issue()`` once the replicator admits the range; at once in the usual case."""
        gate = rep.admit(offset, length)
        if gate is None:
            return issue()
        return cls._after(gate, issue)

    @staticmethod
    def _after(gate: Completion, issue: Callable[[], WriteResult]) -> WriteResult:
        """``issue()`` once the activity log has the range (from the log's thread)."""
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
        gate = rep.admit(offset, len(data))
        if gate is not None:  # rare: the activity log is being written first
            return self._after(gate, lambda: self._write(rep, data, offset, fua))
        return self._write(rep, data, offset, fua)

    def _write(self, rep: Replicator, data: memoryview | bytes, offset: int, fua: bool) -> WriteResult:
        """The hot path: one two-part Completion per write (replica, local), replica frame first."""
        done = Completion(2)
        remote = rep.on_write(offset, data, fua, done)
        if remote is None:
            done.finish()  # nothing to wait for from the replica (degraded)
        elif remote is not done:
            remote.add_done_callback(done.finish)
        if self._plug_thread == threading.get_ident() and rep is self._plug_rep:
            self._deferred.append((data, offset, fua, done))
        else:
            self._write_local(rep, data, offset, fua, done)
        return done

    def _write_local(self, rep: Replicator, data: memoryview | bytes, offset: int, fua: bool,
                     done: Completion) -> None:
        n = len(data)
        try:
            res = self.inner.pwrite(data, offset, fua)
        except BaseException as e:  # noqa: BLE001 - the host gets it once the replica half is done too
            rep.local_done(offset, n, False)
            done.finish(e)
            return
        if res is None:
            rep.local_done(offset, n, True)
            done.finish()
        else:
            self._landing(rep, res, offset, n, done)

    @staticmethod
    def _landing(rep: Replicator, res: Completion, offset: int, n: int, done: Completion) -> None:
        def landed(exc: BaseException | None) -> None:
            rep.local_done(offset, n, exc is None)
            done.finish(exc)
        res.add_done_callback(landed)

    def plug(self) -> None:
        """Defer this thread's local writes until unplug(). One thread plugs at a time (the NBD
        server's trio thread); other threads, and a second plug meanwhile, write at once."""
        rep = self.replicator
        with self._plug_lock:
            if self._plug_thread == 0 and rep is not None:
                self._plug_thread = threading.get_ident()
                self._plug_rep = rep
                rep.hold()
                return
        self.inner.plug()

    def unplug(self) -> None:
        with self._plug_lock:
            if self._plug_thread != threading.get_ident():
                mine = False
            else:
                mine, self._plug_thread = True, 0
                deferred, self._deferred = self._deferred, []
                rep, self._plug_rep = self._plug_rep, None
        if not mine:
            self.inner.unplug()
            return
        if rep is None:
            return
        rep.push()  # the batch's frames leave in one sendmsg; the replica applies while we write
        inner = self.inner
        landed: list[tuple[int, int]] = []
        finished: list[Completion] = []
        for data, offset, fua, done in deferred:
            try:
                res = inner.pwrite(data, offset, fua)
            except BaseException as e:  # noqa: BLE001 - this write's host reply carries it
                rep.local_done(offset, len(data), False)
                done.finish(e)
                continue
            if res is None:
                landed.append((offset, len(data)))
                finished.append(done)
            else:
                self._landing(rep, res, offset, len(data), done)
        rep.landed(landed)  # before the host may hear of them (resync reads only landed regions)
        for done in finished:
            done.finish()

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        rep = self.replicator
        if rep is None:
            return self.inner.write_zeroes(length, offset, fua, may_trim, fast)

        def issue() -> WriteResult:
            if fast:
                # FastZeroUnsupported must reach the host before anything is sent to the replica,
                # so the local half goes first; admit() has already registered the range as
                # landing, so an overlapping write issued meanwhile is seen as a conflict.
                try:
                    local = self.inner.write_zeroes(length, offset, fua, may_trim, fast)
                except BaseException:
                    rep.withdraw(offset, length)
                    raise
                remote = rep.on_zero(offset, length, fua, False)
                return combine([self._local(rep, offset, length, lambda: local), remote])
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
