"""Host writes held while the replica is unreachable, for ``--on-link-loss block``.

A held write is acknowledged only once the replica has it: ``release`` when the mirror is back in
sync; EIO (BlockError) after the block timeout, or at once when the mirror stops (``fail``), because
then the replica will never have it and the host must not be told otherwise.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import trio

from blockdev.backend import Completion
from blockdev.errors import BlockError


class HeldWrites:
    """Completions waiting for the link, each with its deadline. Thread-safe."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._held: list[tuple[float, Completion]] = []

    def __len__(self) -> int:
        return len(self._held)

    def hold(self) -> Completion:
        """A new held write's Completion."""
        c = Completion()
        self.add((c,))
        return c

    def add(self, completions: Iterable[Completion]) -> None:
        deadline = time.monotonic() + self.timeout
        with self._lock:
            self._held += [(deadline, c) for c in completions]

    async def expire_forever(self) -> None:
        """Fail held writes whose deadline passed (checked ten times a second)."""
        while True:
            await trio.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                expired = [c for d, c in self._held if d <= now]
                self._held = [(d, c) for d, c in self._held if d > now]
            for c in expired:
                c.finish(BlockError("replica unreachable: the mirror blocks writes (--on-link-loss block)"))

    def release(self) -> None:
        """The replica has every held write (the mirror is in sync again)."""
        self._finish_all(None)

    def fail(self, exc: BaseException) -> None:
        self._finish_all(exc)

    def _finish_all(self, exc: BaseException | None) -> None:
        with self._lock:
            held, self._held = self._held, []
        for _, c in held:
            c.finish(exc)
