"""What a sync replicator reports (``vdisk status``, ``verify --repair``), apart from its data path."""
from __future__ import annotations

from typing import Any

import trio

from .records import MirrorStats


class SyncStatus:
    """Mixed into SyncReplicator: reads its counters, changes nothing."""

    pairing: Any
    dirty: Any
    al: Any
    config: Any
    state: str
    _held: Any
    _pending: Any
    rtt: float | None

    async def wait_in_sync(self, timeout: float) -> bool:
        """True once the state is in_sync (as reported), False after ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while self.statistics().state != "in_sync":
                await trio.sleep(0.05)
            return True
        return False

    def statistics(self) -> MirrorStats:
        """A snapshot; ``in_sync`` only with nothing dirty and no resync frame unacknowledged."""
        p = self.pairing
        total = p.sync_total
        dirty = self.dirty.dirty_bytes
        remaining = dirty if not p.initial_sync_done else 0
        state = self.state
        if state == "in_sync" and (dirty or self._resync_inflight):
            state = "syncing"  # in_sync means nothing dirty and no resync frame unacknowledged
        return MirrorStats(
            mode="sync", state=state, target=f"{self.config.host}:{self.config.port}",
            on_link_loss=self.on_link_loss, dirty_bytes=dirty,
            in_flight=len(self._pending), acked_seq=self._acked, sent_seq=self._seq,
            resync_bytes_sent=self.resync_bytes_sent, resync_regions_sent=self.resync_regions_sent,
            conflicts=self.conflicts,
            initial_sync={"done": p.initial_sync_done, "total_bytes": total,
                          "copied_bytes": max(0, total - remaining),
                          "percent": 100.0 if p.initial_sync_done or not total else
                          round(100.0 * max(0, total - remaining) / total, 1)},
            blocked=len(self._held), connects=self.connects, al_hot=self.al.hot, al_writes=self.al.writes,
            replica=p.replica_id, last_error=self.last_error, save_error=self.dirty.save_error,
            rtt_ms=None if self.rtt is None else round(self.rtt * 1000, 2))
