"""The part of a mirror that every mode shares, and the seam's behaviour with no replica to send to.

A mirrored volume keeps one dirty map, one activity log and one list of held writes for as long as
it is mirrored (``MirrorState``); replicators come and go on top of them (a reconfiguration, later
a switch between sync and async), each handed the same state, so nothing one of them learnt is lost
in the hand-over.

``Marking`` is what the seam holds while a volume has a mirror configured but no replicator is
attached (its configuration is invalid, the daemon is shutting down): every write is admitted to the
activity log and marked dirty, never lost. It is also the base of the real replicators: their
"link is down" path is exactly this.

A replicator is two interfaces on one object: the data-path ``Replicator`` of mirror/layer.py
(``Marking`` gives every method a default: admit to the activity log, mark what cannot be sent), and
the ``Control`` below, which is all the daemon (vdisk/mirroring.py) calls. A mode is one class:
``SyncReplicator`` (sync.py) and ``AsyncReplicator`` (asyncrep.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import trio

from blockdev.backend import Completion, WriteResult
from blockdev.errors import BlockError

from .dirty import ActivityLog, DirtyMap
from .hold import HeldWrites


@dataclass
class MirrorState:
    """What may differ (dirty map), what may be in flight (activity log), what waits for the replica
    (held writes): mode-independent, and outliving any one replicator."""

    dirty: DirtyMap
    al: ActivityLog
    held: HeldWrites

    def close(self) -> None:
        """Once no front end can write any more: persist the map, drop idle extents, close the log."""
        self.dirty.save()
        self.al.clear()
        self.al.close()


class Control(Protocol):
    """What the daemon does with a replicator: run it, report it, verify through it, retire it."""

    mode: str
    state: str
    on_link_loss: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, ship, reconnect with backoff: until cancelled."""
    def close(self, fail_held: bool = True) -> None:
        """After ``run`` was cancelled: mark what the replica may lack; fail or hand over held writes."""
    def statistics(self) -> Any:
        """A JSON-safe snapshot (a record for sync, a dict for async) for ``vdisk status``."""
    async def query_hashes(self, leaf_size: int, level: int, indices: list[int]) -> bytes:
        """The replica's Merkle digests (verify.compare)."""
    def request_resync(self) -> None:
        """Dirty bits were added from outside (verify --repair): send them."""
    async def wait_in_sync(self, timeout: float) -> bool:
        """True once nothing is left to send (False after ``timeout`` seconds)."""


class Marking:
    """The Replicator of mirror/layer.py with no replica: writes are recorded in the dirty map (and
    held in ``block`` mode, if a replicator will release them). Thread-safe."""

    on_link_loss = "degrade"
    releases = False  # True for a replicator: it releases held writes once in sync; Marking never does

    def __init__(self, state: MirrorState) -> None:
        self.state = state
        self.dirty, self.al = state.dirty, state.al
        self._held = state.held

    def admit(self, offset: int, length: int) -> WriteResult:
        """The range goes into the activity log before the op is issued (see Replicator.admit)."""
        return self.al.admit(offset, length)

    def withdraw(self, offset: int, length: int) -> None:
        self.al.end(offset, length)

    def _unsent(self, offset: int, length: int) -> Completion | None:
        """A write the replica will not get now: marked (the map is saved before its extent may
        leave the activity log, which holds it until then), then held or done."""
        self.dirty.mark(offset, length)
        self.al.end(offset, length)
        if self.on_link_loss != "block":
            return None
        if self.releases:
            return self._held.hold()
        # ``block`` and no replicator to send it: the host must not be told it is mirrored.
        failed = Completion()
        failed.finish(BlockError("the mirror is not running: a write is not acknowledged unmirrored (--on-link-loss block)"))
        return failed

    def on_write(self, offset: int, data: memoryview | bytes, fua: bool,
                 done: Completion | None = None) -> WriteResult:
        return self._unsent(offset, len(data))

    def on_zero(self, offset: int, length: int, fua: bool, trim: bool) -> WriteResult:
        return self._unsent(offset, length)

    def on_flush(self) -> WriteResult:
        # What the replica lacks should be durable before the host's flush returns; if the map
        # cannot be written now, the activity log still holds those extents (see DirtyMap.save).
        self.dirty.save()
        return None

    def hold(self) -> None:
        pass

    def push(self) -> None:
        pass

    def local_done(self, offset: int, length: int, ok: bool) -> None:
        if not ok:  # the replica may hold what the volume refused
            self.dirty.mark(offset, length)

    def landed(self, ranges: list[tuple[int, int]]) -> None:
        pass


def ping_period(keepalive: float, timeout: float) -> tuple[float, float]:
    """(how often the keepalive task looks, how long without a frame from the peer before it pings).
    The peer answers a ping at once, so the longest silence the source sees is about one period
    plus a round trip: a third of the timeout at most. (Sleeping ``keepalive`` and pinging after
    ``keepalive`` of silence let an idle link go 2 x keepalive without a frame: a 2 s timeout with
    the 1 s keepalive reconnected an idle mirror every few seconds.)"""
    period = min(keepalive, timeout / 3)
    return period, period / 2
