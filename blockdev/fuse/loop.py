"""Our request loop for pyfuse3's session (replaces ``pyfuse3.main`` when the adapter is installed).

pyfuse3's own loop reads /dev/fuse with the GIL held (a 1 MiB write is copied by the kernel while no
worker thread can run), passes through trio's scheduler twice per request, and reuses one buffer per
task, so a write's payload must be copied before the next read. This loop, per task:

    fuse_session_receive_buf   (ctypes call, GIL released during the kernel's copy; the fd is
                               non-blocking: only on EAGAIN does the task wait in trio)
    fuse_session_process_buf   (GIL held: pyfuse3's Cython handlers and our ctypes slots run here)
    run what pyfuse3's handler left in its ``py_retval`` static (its coroutine), if anything

One task leads (reads and processes); the others are parked. Only when a handler really has to wait
does the leader promote a follower and finish that request itself, so a request that does not wait
(nearly all: I/O is inline or on workers) costs no task switch and no lock.

A handler may *pin* the current buffer (a big write handed to a worker thread, zero-copy): the task
then swaps in a spare buffer and goes on at once; the worker returns the pinned buffer to the spare
list when its pwrite is done. No trio crossing per write.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import trio

from .adapter import Adapter, libfuse_path

CHECKPOINT_EVERY = 64  # requests read back to back between two forced scheduler passes (NBD, control)


class FuseBuf(ctypes.Structure):
    """struct fuse_buf (fuse_common.h)."""

    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


_lib = ctypes.CDLL(libfuse_path())  # foreign calls release the GIL
_lib.fuse_session_receive_buf.argtypes = [ctypes.c_void_p, ctypes.POINTER(FuseBuf)]
_lib.fuse_session_receive_buf.restype = ctypes.c_int
_lib.fuse_session_exited.argtypes = [ctypes.c_void_p]
_lib.fuse_session_exited.restype = ctypes.c_int
_lib_gil = ctypes.PyDLL(libfuse_path())  # ...except these: pyfuse3's handlers need the GIL
_lib_gil.fuse_session_process_buf.argtypes = [ctypes.c_void_p, ctypes.POINTER(FuseBuf)]
_lib_gil.fuse_session_process_buf.restype = None
_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]
_libc.free.restype = None


class SpareBuffers:
    """Request buffers (malloc'ed by libfuse) that are free for the next read; thread-safe."""

    def __init__(self) -> None:
        self._free: list[int] = []
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None  # None: libfuse mallocs a new one

    def give(self, mem: int) -> None:
        with self._lock:
            self._free.append(mem)

    def free_all(self) -> None:
        with self._lock:
            mems, self._free = self._free, []
        for mem in mems:
            _libc.free(mem)


class _Pin:
    """One pinned request buffer: released by a worker, maybe before the loop has handed it over."""

    __slots__ = ("_lock", "_mem", "_released", "_spares")

    def __init__(self, spares: SpareBuffers) -> None:
        self._spares = spares
        self._lock = threading.Lock()
        self._mem: int | None = None
        self._released = False

    def keep(self, mem: int) -> bool:
        """Called by the loop after processing: False if the worker is already done with ``mem``."""
        with self._lock:
            if self._released:
                return False
            self._mem = mem
            return True

    def release(self) -> None:
        with self._lock:
            self._released = True
            mem, self._mem = self._mem, None
        if mem is not None:
            self._spares.give(mem)


class SessionLoop:
    """Runs ``tasks`` request loops on the adapter's session until it exits or is cancelled."""

    def __init__(self, adapter: Adapter, tasks: int = 4) -> None:
        self.adapter = adapter
        self.session = adapter.session
        self.tasks = tasks
        self.spares = SpareBuffers()
        self._fd = adapter.fd()
        os.set_blocking(self._fd, False)  # reads return EAGAIN instead of blocking the trio thread
        self._followers = trio.lowlevel.ParkingLot()
        self._has_leader = False
        self._streak = 0
        self._pin: _Pin | None = None
        self._draining = False
        self._wait_scope: trio.CancelScope | None = None
        self._waiting = 0  # requests whose handler is suspended (awaiting in trio)
        self.requests = 0  # requests read
        self.waits = 0  # times the leader found nothing queued and waited in trio

    def pin(self) -> Callable[[], None]:
        """Keep the buffer of the request being processed; call the result (any thread) to release it."""
        if self._pin is not None:
            raise RuntimeError("the current request buffer is already pinned")
        pin = self._pin = _Pin(self.spares)
        return pin.release

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.tasks):
                nursery.start_soon(self._one_task)
        await self._replied()  # after drain(): the session (and the mount) must outlive every reply owed

    async def _replied(self) -> None:
        gate = self.adapter.gate
        while self._draining and (gate.owed or self._waiting):
            await trio.sleep(0.01)  # replies come from worker threads: no trio wake-up to wait on

    async def drain(self) -> None:
        """Shutdown, before the replicas and images close: read no more requests, and wait until every
        request read so far has been replied to (big writes on workers, and their Completions: a
        sync mirror's replica ack). The tasks then end; what the kernel still queues fails at unmount."""
        self._draining = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        await self._replied()

    async def _wait(self) -> bool:
        """Wait until /dev/fuse is readable; False when the session is over. Only the leader waits,
        so at most one task waits on the fd (as trio requires)."""
        if _lib.fuse_session_exited(self.session) or self._draining:
            return False
        try:
            with trio.CancelScope() as self._wait_scope:  # drain() ends the wait
                await trio.lowlevel.wait_readable(self._fd)
        except trio.ClosedResourceError:  # pyfuse3.terminate()
            return False
        finally:
            self._wait_scope = None
        return not self._draining

    async def _one_task(self) -> None:
        """Leader/followers: the leader reads and processes requests; when a handler has to wait
        (a Completion, a flush), the leader promotes a parked follower and finishes that request as a
        follower. Requests that never wait (nearly all) cost no task switch at all."""
        buf = FuseBuf()
        try:
            while True:
                while self._has_leader:
                    await self._followers.park()
                self._has_leader = True
                suspended = await self._lead(buf)
                self._has_leader = False
                if suspended is None:  # the session is over
                    self._followers.unpark_all()
                    return
                self._followers.unpark()
                self._waiting += 1
                try:
                    await _continue(*suspended)
                finally:
                    self._waiting -= 1
        finally:
            if buf.mem:
                _libc.free(buf.mem)

    async def _lead(self, buf: FuseBuf) -> tuple[Coroutine[Any, Any, Any], Any] | None:
        """Serve requests until one has to wait: return it (coroutine, what it yielded), or None."""
        ref, session = ctypes.byref(buf), self.session
        receive, process, take_retval = _lib.fuse_session_receive_buf, _lib_gil.fuse_session_process_buf, \
            self.adapter.take_retval
        while True:
            if self._draining:
                return None
            # The fd is non-blocking: try the read first, wait only when nothing is queued.
            res = receive(session, ref)
            if res == -errno.EAGAIN:
                self._streak = 0
                if not await self._wait():
                    return None
                self.waits += 1
                continue
            if res == -errno.EINTR:
                continue
            if res < 0:
                raise OSError(-res, f"reading /dev/fuse: {errno.errorcode.get(-res, -res)}")
            if res == 0:  # unmounted
                return None
            self.requests += 1
            self._streak += 1
            if self._streak >= CHECKPOINT_EVERY:  # let NBD and the control socket run
                self._streak = 0
                await trio.lowlevel.checkpoint()
            process(session, ref)
            pin, self._pin = self._pin, None
            if pin is not None and pin.keep(buf.mem):
                buf.mem = self.spares.take()  # a worker still uses the old one
            pending = take_retval()
            if pending is None:
                continue
            try:  # run pyfuse3's coroutine until it completes or first has to wait
                first = pending.send(None)  # type: ignore[attr-defined]
            except StopIteration:
                continue
            return pending, first  # type: ignore[return-value]


@types.coroutine
def _continue(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Finish a coroutine that was started by hand and has yielded ``yielded`` to trio: pass trio's
    answers (and exceptions, e.g. Cancelled) on to it, as ``await`` would have from the start."""
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # noqa: BLE001 (thrown in by trio: hand it to the coroutine)
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value
