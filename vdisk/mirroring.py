"""The mirrors of the volumes a daemon serves: started from the persisted ``mirror`` section of a
volume's metadata, changed live through the control socket, reported in ``status``.

Control API (JSON lines, see vdisk/control.py):

    {"cmd": "mirror", "name": N, "set": {"to": "HOST:PORT", "mode": "sync", "on_link_loss": "degrade",
                                         "psk_file": PATH|null, "block_timeout": S, "timeout": S}}
        start (or reconfigure) the mirror of N and persist the configuration -> {"mirror": STATUS}
    {"cmd": "mirror", "name": N, "stop": true}       stop it and forget the pairing -> {}
    {"cmd": "verify", "name": N, "repair": bool}     Merkle compare with the replica -> {"verify": REPORT}
    {"cmd": "status", "name": N}                     each volume's record has "mirror": STATUS or null

Files next to the volume: NAME.mirror-dirty (dirty map), NAME.mirror-al (activity log).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from mirror.dirty import ActivityLog, DirtyMap
from mirror.sync import Pairing, SyncConfig, SyncReplicator, VolumeIdentity
from mirror.verify import compare

from .control import ControlError
from .units import parse_duration

if TYPE_CHECKING:
    from .daemon import Daemon, ServedVolume

log = logging.getLogger("vdisk.mirror")
REGION = 64 << 10
POLICIES = ("degrade", "block")
MIRROR_SIDECARS = (".mirror-dirty", ".mirror-al")  # dirty map, activity log: NAME + suffix
MAX_KEY_FILE = 4096


def parse_hostport(text: str, listen: bool = False) -> tuple[str, int]:
    """HOST:PORT (port 0 only for a listener: any free port)."""
    host, sep, port = text.rpartition(":")
    try:
        p = int(port)
        if not sep or not (0 if listen else 1) <= p <= 65535:
            raise ValueError
    except ValueError:
        raise ValueError(f"bad address {text!r}: use HOST:PORT") from None
    return host.strip("[]") or "127.0.0.1", p


def read_psk(path: str | Path | None) -> bytes | None:
    """The pre-shared key in a file (surrounding whitespace ignored); None without a file.

    As ssh does with private keys, a key file that group or others may access is refused: a key
    anyone on the host can read authenticates nothing. Only a regular file of at most
    MAX_KEY_FILE bytes is read (``--psk-file /dev/zero`` must not read gigabytes).
    """
    if not path:
        return None
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below anyway.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ValueError(f"cannot read the key file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"the key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ValueError(f"the key file {path} is accessible by group or others (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}`")
        raw = os.read(fd, MAX_KEY_FILE + 1)
    except OSError as e:
        raise ValueError(f"cannot read the key file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_FILE:
        raise ValueError(f"the key file {path} is too large (a key file holds at most {MAX_KEY_FILE} bytes)")
    key = raw.strip()
    if not key:
        raise ValueError(f"the key file {path} is empty")
    if len(key) < 16:
        raise ValueError(f"the key in {path} is too short (at least 16 bytes)")
    return key


def check_section(section: dict[str, Any]) -> SyncConfig:
    """The replicator configuration of a ``mirror`` section; ValueError with a user message if bad."""
    if section.get("mode", "sync") != "sync":
        raise ValueError(f"mirror mode {section.get('mode')!r} is not supported yet (only 'sync')")
    if section.get("on_link_loss", "degrade") not in POLICIES:
        raise ValueError(f"--on-link-loss must be one of {', '.join(POLICIES)}")
    host, port = parse_hostport(str(section.get("to", "")))
    return SyncConfig(host, port, on_link_loss=section.get("on_link_loss", "degrade"),
                      psk=read_psk(section.get("psk_file")),
                      block_timeout=parse_duration(section.get("block_timeout", 30.0), "block_timeout"),
                      timeout=parse_duration(section.get("timeout", 10.0), "timeout"))


class MirrorManager:
    """Runs one replicator per mirrored volume of a daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.running: dict[str, tuple[SyncReplicator, trio.CancelScope]] = {}
        self._nursery: trio.Nursery | None = None
        daemon.control.register("mirror", self._cmd_mirror)
        daemon.control.register("verify", self._cmd_verify)

    def _paths(self, name: str) -> tuple[Path, Path]:
        root = self.daemon.store.root
        dirty, al = MIRROR_SIDECARS
        return root / f"{name}{dirty}", root / f"{name}{al}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the configured mirrors (before any front end accepts writes), then keep them."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for vol in self.daemon.volumes.values():
                section = self.daemon.store.meta(vol.name).extra.get("mirror")
                if isinstance(section, dict):
                    try:
                        await self.start(vol, section)
                    except ValueError as e:
                        log.error("volume %s: mirror not started: %s", vol.name, e)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                for name in list(self.running):
                    self._stop(name)

    async def start(self, vol: ServedVolume, section: dict[str, Any]) -> SyncReplicator:
        config = check_section(section)
        self._stop(vol.name)
        meta = vol.meta
        dirty_path, al_path = self._paths(vol.name)
        dirty = DirtyMap.load(meta.size, REGION, dirty_path)
        al = ActivityLog(al_path, before_evict=dirty.save)
        recovered = al.recover()
        if recovered:  # the last run died with these extents hot: their writes may be on one side only
            log.warning("volume %s: %d extents from the activity log marked for resync", vol.name, len(recovered))
            for e in recovered:
                off, n = al.byte_range(e)
                dirty.mark(off, min(n, meta.size - off))
        dirty.save(force=True)
        al.clear()
        pairing = Pairing(section.get("replica_id"), bool(section.get("initial_sync_done")),
                          int(section.get("sync_total", 0)))
        ident = VolumeIdentity(meta.uuid, vol.name, meta.size, meta.block_size, meta.generation)
        rep = SyncReplicator(config, ident, vol.image, dirty, al, pairing,
                             save_pairing=lambda p: self._save_pairing(vol.name, p))
        assert self._nursery is not None
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await rep.run(task_status=task_status)

        await self._nursery.start(run)
        vol.mirror.attach(rep)
        self.running[vol.name] = (rep, scope)
        return rep

    def _stop(self, name: str) -> None:
        entry = self.running.pop(name, None)
        if entry is None:
            return
        rep, scope = entry
        vol = self.daemon.volumes.get(name)
        if vol is not None:
            vol.mirror.attach(None)
        scope.cancel()
        rep.close()
        rep.al.close()

    def _save_pairing(self, name: str, p: Pairing) -> None:
        section = dict(self.daemon.store.meta(name).extra.get("mirror") or {})
        section.update(replica_id=p.replica_id, initial_sync_done=p.initial_sync_done, sync_total=p.sync_total)
        self.daemon.store.update(name, mirror=section)

    def status(self, name: str) -> dict[str, Any] | None:
        entry = self.running.get(name)
        return dataclasses.asdict(entry[0].statistics()) if entry else None

    # -- control commands ------------------------------------------------------------------------
    def _volume(self, req: dict[str, Any]) -> ServedVolume:
        vol = self.daemon.volumes.get(str(req.get("name")))
        if vol is None:
            raise ControlError(f"volume {req.get('name')!r} is not served by this daemon")
        return vol

    async def _cmd_mirror(self, req: dict[str, Any]) -> dict[str, Any]:
        vol = self._volume(req)
        store = self.daemon.store
        if req.get("stop"):
            self._stop(vol.name)
            store.update(vol.name, mirror=None)
            for p in self._paths(vol.name):
                p.unlink(missing_ok=True)
            return {}
        new = req.get("set")
        if not isinstance(new, dict):
            raise ControlError("mirror: give 'set' (a configuration) or 'stop'")
        old = store.meta(vol.name).extra.get("mirror") or {}
        section = {**new}
        if old.get("to") == new.get("to"):  # same target: keep the pairing (no full resync)
            for k in ("replica_id", "initial_sync_done", "sync_total"):
                if k in old:
                    section[k] = old[k]
        try:
            check_section(section)
        except ValueError as e:
            raise ControlError(str(e)) from None
        store.update(vol.name, mirror=section)
        await self.start(vol, section)
        return {"mirror": self.status(vol.name)}

    async def _cmd_verify(self, req: dict[str, Any]) -> dict[str, Any]:
        vol = self._volume(req)
        entry = self.running.get(vol.name)
        if entry is None:
            raise ControlError(f"volume {vol.name!r} is not mirrored")
        rep = entry[0]
        if rep.state not in ("in_sync", "syncing"):
            raise ControlError(f"the mirror of {vol.name!r} is {rep.state}: verify needs a connected replica")
        try:
            report = await compare(vol.image, vol.meta.size, REGION, rep.query_hashes)
        except Exception as e:  # noqa: BLE001 (link errors end up as one line for the user)
            raise ControlError(f"verify failed: {e}") from None
        out = {"ranges": report.ranges, "differing_bytes": report.differing_bytes,
               "differing_blocks": len(report.differing_blocks), "block_size": report.leaf_size,
               "digests_exchanged": report.digests_exchanged,
               "local_hash_seconds": round(report.local_hash_seconds, 3), "repaired": False}
        if req.get("repair") and report.differing_blocks:
            before = rep.resync_bytes_sent
            for b in report.differing_blocks:
                rep.dirty.mark_region(b)
            rep.request_resync()
            ok = await rep.wait_in_sync(float(req.get("timeout", 300)))
            out.update(repaired=ok, resent_bytes=rep.resync_bytes_sent - before)
        return {"verify": out}
