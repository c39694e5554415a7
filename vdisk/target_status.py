"""What `vdisk status` says about the replicas of a target's data directory: from the running
target's control socket (links, applied checkpoints) or, when none runs, from the metadata alone."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from blockdev.volume import VolumeStore
from mirror.target import LOCK_FILE, read_checkpoint, replica_names

from .control import ControlError, ControlServer, call, control_address
from .events import EventRing
from .replicas import replica_section

if TYPE_CHECKING:
    from mirror.target import TargetServer

log = logging.getLogger("vdisk.target")



def replica_records(store: VolumeStore, server: TargetServer | None = None) -> list[dict[str, Any]]:
    """One record per replica: its source, link, last applied checkpoint and lag (the status JSON)."""
    now = time.time()
    out = []
    for name in replica_names(store):
        rep = replica_section(store.meta(name)) or {}
        link = server.links.get(name, {}) if server is not None else {}
        connected = server is not None and name in server.active
        cp = server.checkpoints.get(name) if server is not None else None
        cp_id, cp_ns = cp if cp is not None else read_checkpoint(store.root, name)
        lag = None
        if connected:
            lag = 0.0 if link.get("mode") == "sync" else (round(max(0.0, now - cp_ns / 1e9), 3) if cp_ns else None)
        out.append({
            "name": name,
            "source": {"name": rep.get("source_name"), "uuid": rep.get("source_uuid"),
                       "addr": server.active.get(name) if connected and server is not None else rep.get("source_addr")},
            "connected": connected, "connected_since": link.get("since") if connected else None,
            "disconnected_since": None if connected else link.get("since"),
            "mode": link.get("mode") if connected else None,
            "last_connected": rep.get("last_connected"),
            "last_checkpoint": {"id": cp_id, "time": cp_ns / 1e9 if cp_ns else None},
            "lag_seconds": lag,
        })
    return out


class TargetWatch:
    """The target's event ring: a source connecting to or leaving a replica, seen from the target's
    side. Not logged again (mirror/target.py logs each as it happens, with its reason)."""

    def __init__(self, server: TargetServer) -> None:
        self.server = server
        self.ring = EventRing(log)
        self._active: dict[str, str] = {}

    def update(self, now: float) -> None:
        active = dict(self.server.active)
        for name, peer in active.items():
            if self._active.get(name) != peer:
                mode = self.server.links.get(name, {}).get("mode")
                self.ring.add(now, name, "info", f"source {peer} connected ({mode})", logged=False)
        for name, peer in self._active.items():
            if active.get(name) != peer:
                self.ring.add(now, name, "warning", f"source {peer} disconnected", logged=False)
        self._active = active

    async def run(self) -> None:
        while True:
            self.update(time.time())
            await trio.sleep(1.0)


def register(control: ControlServer, store: VolumeStore, server: TargetServer, watch: TargetWatch) -> None:
    """The target's control commands: ``status`` (replicas, events) and ``hello`` (built in)."""

    async def status(req: dict[str, Any]) -> dict[str, Any]:
        reps = replica_records(store, server)
        names = req.get("names")
        if isinstance(names, list):
            reps = [r for r in reps if r["name"] in names]
        return {"time": time.time(), "data_dir": str(store.root), "replicas": reps,
                "statistics": server.statistics(),
                "events": watch.ring.list(set(names) if isinstance(names, list) else None)}

    control.register("status", status)


def running_target(store: VolumeStore) -> str | None:
    """The control address of a target running on this data directory, or None."""
    try:
        pid = int((store.root / LOCK_FILE).read_text().strip() or 0)  # the running target's pid
    except (OSError, ValueError):
        return None
    return control_address(store.root, pid) if pid > 0 else None


def target_replicas(store: VolumeStore) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(replica records, the target's events): asked of the running target, else from the metadata
    (nothing connected, no events)."""
    addr = running_target(store)
    if addr is not None:
        try:
            reply = call(addr, "status", timeout=5.0)
            return reply["replicas"], reply.get("events", [])
        except ControlError:
            pass  # no target answers: it is gone (its lock file outlives it)
    return replica_records(store), []
