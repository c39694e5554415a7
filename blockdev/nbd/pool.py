"""The NBD server's receive buffers and its plain worker threads (for slow ops: big or FUA writes,
flushes, trims, big reads), kept apart from the transmission loop in server.py."""
from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Callable
from typing import Any


class Buffer:
    """A receive buffer; ``pins`` counts ops still holding slices of it."""

    __slots__ = ("data", "pins", "view")

    def __init__(self, size: int) -> None:
        # Anonymous mmap: pages are zeroed lazily by the kernel, so an idle connection costs no RAM
        # (bytearray(16 MiB) would memset, and hold, all of it).
        self.data = mmap.mmap(-1, size)
        self.view = memoryview(self.data)
        self.pins = 0


class WorkerPool:
    """Plain threads for slow ops; each job's callback runs in the thread that finished it."""

    def __init__(self, n: int) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Callable[[Any, BaseException | None], None]] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"nbd-worker-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], done: Callable[[Any, BaseException | None], None]) -> None:
        self._q.put((fn, args, done))

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            fn, args, done = job
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported to the client, never lost
                done(None, e)
            else:
                done(result, None)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the threads once the ops they are running are done (before images are closed)."""
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join(timeout)
