"""The op table every front end speaks and every layer wraps (after nbdkit's backend/filter split).

Ops are plain synchronous methods, safe to call from the trio thread or from a worker thread.
Write-like ops may finish later (a sync mirror waits for its replica): they return ``None`` when
done, or a :class:`Completion` that the front end waits on before replying to its host.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

# Every op of the table. A write-like op changes what the disk holds or makes it durable; a layer
# that intercepts writes (the mirror) must implement every one of them itself, and
# tests/test_layers.py fails when an op is added here without being classified.
WRITE_OPS: frozenset[str] = frozenset({"pwrite", "write_zeroes", "trim", "flush"})
READ_OPS: frozenset[str] = frozenset({"pread", "extents"})
INFO_OPS: frozenset[str] = frozenset(
    {"size", "block_size", "can_write", "can_flush", "can_fua", "can_trim", "can_zero",
     "can_fast_zero", "can_extents", "allocated", "close"}
)
# Hints around a run of writes (like the block layer's plug): a layer may defer the local half of
# writes issued between plug() and unplug() on the same thread until unplug(), so that a mirror can put
# a whole batch's replica frames on the wire before the local pwrites start.
BATCH_OPS: frozenset[str] = frozenset({"plug", "unplug"})

# extents() flags, the same bits as NBD's base:allocation context.
EXTENT_HOLE = 1
EXTENT_ZERO = 2


class Completion:
    """A write that finishes later. Thread-safe; callbacks run once, in the thread that completes it.

    ``parts`` > 1: it finishes when ``finish`` has been called that many times (the first error wins).
    A mirrored write is one Completion of two parts, local and replica, with no combining wrapper.
    """

    __slots__ = ("_callbacks", "_done", "_exc", "_left", "_lock")

    def __init__(self, parts: int = 1) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[BaseException | None], None]] = []
        self._left = parts

    @property
    def done(self) -> bool:
        return self._done

    @property
    def exception(self) -> BaseException | None:
        return self._exc

    def add_done_callback(self, fn: Callable[[BaseException | None], None]) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(fn)
                return
        fn(self._exc)

    def finish(self, exc: BaseException | None = None) -> None:
        """One part is done (``exc``: it failed); extra calls once done are ignored."""
        with self._lock:
            if self._done:
                return
            if self._exc is None:
                self._exc = exc
            self._left -= 1
            if self._left > 0:
                return
            self._done = True
            exc = self._exc
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(exc)


WriteResult = Completion | None


def combine(results: list[WriteResult]) -> WriteResult:
    """One completion that finishes when all of ``results`` have (first error wins)."""
    pending = [r for r in results if r is not None]
    if not pending:
        return None
    if len(pending) == 1:
        return pending[0]
    out = Completion(len(pending))
    for r in pending:
        r.add_done_callback(out.finish)
    return out


async def wait(result: WriteResult) -> None:
    """Await a write result from trio; raises the op's error."""
    if result is None:
        return
    if not result.done:
        import trio

        event = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_exc: BaseException | None) -> None:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

        result.add_done_callback(wake)
        await event.wait()
    if result.exception is not None:
        raise result.exception


@runtime_checkable
class Backend(Protocol):
    """The op table. Offsets and lengths are validated by the front end before they get here."""

    def size(self) -> int: ...
    def block_size(self) -> int: ...
    def can_write(self) -> bool: ...
    def can_flush(self) -> bool: ...
    def can_fua(self) -> bool: ...
    def can_trim(self) -> bool: ...
    def can_zero(self) -> bool: ...
    def can_fast_zero(self) -> bool: ...
    def can_extents(self) -> bool: ...

    def allocated(self) -> int | None:
        """Bytes the volume occupies on its store (a sparse file's st_blocks * 512); None if unknown."""

    def pread(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""

    def extents(self, length: int, offset: int) -> list[tuple[int, int]]:
        """(length, EXTENT_* flags) runs covering at least the first byte of the range."""

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult: ...
    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult: ...
    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult: ...
    def flush(self) -> WriteResult: ...
    def plug(self) -> None:
        """A run of writes from this thread follows (see BATCH_OPS)."""
    def unplug(self) -> None:
        """The run ended: issue whatever was deferred since plug()."""
    def close(self) -> None: ...


class Layer:
    """A backend that wraps another with the same table; passes through what it does not handle.

    Subclasses that must see every write (the mirror) set ``intercepts_writes = True``; the test
    suite then requires them to define every op in WRITE_OPS themselves.
    """

    intercepts_writes = False

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def size(self) -> int:
        return self.inner.size()

    def block_size(self) -> int:
        return self.inner.block_size()

    def can_write(self) -> bool:
        return self.inner.can_write()

    def can_flush(self) -> bool:
        return self.inner.can_flush()

    def can_fua(self) -> bool:
        return self.inner.can_fua()

    def can_trim(self) -> bool:
        return self.inner.can_trim()

    def can_zero(self) -> bool:
        return self.inner.can_zero()

    def can_fast_zero(self) -> bool:
        return self.inner.can_fast_zero()

    def can_extents(self) -> bool:
        return self.inner.can_extents()

    def allocated(self) -> int | None:
        return self.inner.allocated()

    def pread(self, buf: memoryview, offset: int) -> None:
        self.inner.pread(buf, offset)

    def extents(self, length: int, offset: int) -> list[tuple[int, int]]:
        return self.inner.extents(length, offset)

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        return self.inner.pwrite(data, offset, fua)

    def write_zeroes(
        self, length: int, offset: int, fua: bool = False, may_trim: bool = True, fast: bool = False
    ) -> WriteResult:
        return self.inner.write_zeroes(length, offset, fua, may_trim, fast)

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        return self.inner.trim(length, offset, fua)

    def flush(self) -> WriteResult:
        return self.inner.flush()

    def plug(self) -> None:
        self.inner.plug()

    def unplug(self) -> None:
        self.inner.unplug()

    def close(self) -> None:
        self.inner.close()

    def find_layer(self, cls: type) -> object | None:
        """The first layer of type ``cls`` in this stack, outermost first."""
        node: object = self
        while node is not None:
            if isinstance(node, cls):
                return node
            node = getattr(node, "inner", None)
        return None
