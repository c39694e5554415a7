"""Two plain worker threads for big writes, so a 1 MiB pwrite overlaps the next FUSE request.

A ``trio.to_thread`` hop costs ≈ 250 µs; a plain thread fed by a queue and answering through
``run_sync_soon`` costs ≈ 80 µs, which is noise next to a 1 MiB write and wasted on a 4 KiB one: only
writes of ``BIG_WRITE`` bytes or more come here. In-flight jobs are bounded upstream: by the FUSE
requests the kernel has outstanding (its max_background) for ``submit``, by pyfuse3's task count for
``run``.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio

BIG_WRITE = 128 * 1024
log = logging.getLogger("blockdev.fuse")


def _ignore(result: outcome.Outcome) -> None:
    if isinstance(result, outcome.Error):  # submit()'s jobs catch their own errors: this is a bug
        log.error("worker job failed", exc_info=result.error)


class WorkerPool:
    """``await pool.run(fn, *args)`` runs ``fn`` on one of ``n`` daemon threads."""

    def __init__(self, n: int = 2) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Callable[[Any], None]] | None]
        self._jobs = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"vdisk-fuse-io-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            done(outcome.capture(fn, *args))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        token = trio.lowlevel.current_trio_token()
        event = trio.Event()
        box: list[outcome.Outcome] = []

        def done(result: outcome.Outcome) -> None:
            box.append(result)
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

        self._jobs.put((fn, args, done))
        # Shielded: the thread still uses the caller's buffer, so the caller must not move on without it.
        with trio.CancelScope(shield=True):
            await event.wait()
        return box[0].unwrap()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on a worker; it reports its own result (a FUSE reply), nothing waits here."""
        self._jobs.put((fn, args, _ignore))

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout=5)
