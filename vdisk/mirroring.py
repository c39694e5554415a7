"""The mirrors of the volumes a daemon serves: started from the persisted ``mirror`` section of a
volume's metadata, changed live through the control socket, reported in ``status``.

Control commands registered here: ``mirror`` (set / stop), ``throttle``, ``pause``, ``resume``,
``verify``; every request and reply field is in docs/CONTROL_API.md. A change of only async settings
(rate, schedule, ship_at, buffer_size, checkpoint_interval, paused) applies live, without a new
connection; of only ``rpo``/``stall`` (alert thresholds), without touching the replicator; a change
of mode hands the volume to a new replicator with no gap (see MirrorManager.start).

Files next to the volume: NAME.mirror-dirty (dirty map), NAME.mirror-al (activity log),
NAME.mirror-journal/ (async: the source buffer, mirror/journal.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from mirror.asyncrep import AsyncConfig, AsyncReplicator
from mirror.base import Marking, MirrorState
from mirror.dirty import ActivityLog, DirtyMap
from mirror.hold import HeldWrites
from mirror.journal import Journal
from mirror.reduce import SAVED, KnownBlocks, Reduction
from mirror.schedule import Schedule, ShipAt
from mirror.sync import Pairing, SyncConfig, SyncReplicator, VolumeIdentity
from mirror.verify import compare

from .control import ControlError
from .events import DEFAULT_STALL, EventRing, MirrorWatch
from .units import format_size, parse_duration, parse_rate, parse_size

if TYPE_CHECKING:
    from .daemon import Daemon, ServedVolume

log = logging.getLogger("vdisk.mirror")
REGION = 64 << 10
POLICIES = ("degrade", "block")
MIRROR_SIDECARS = (".mirror-dirty", ".mirror-al")  # dirty map, activity log: NAME + suffix
JOURNAL_SUFFIX = ".mirror-journal"  # the async source buffer: a directory NAME + suffix
MODES = ("sync", "async")
# Async settings: applied live to a running async replicator (no reconnect) when only they change.
ASYNC_KEYS = ("rate", "schedule", "ship_at", "buffer_size", "checkpoint_interval", "paused")
DEFAULT_BUFFER = "10G"
ALERT_KEYS = ("rpo", "stall")  # thresholds for status and alerts only: never restart a replicator
MAX_KEY_FILE = 4096


def parse_hostport(text: str, listen: bool = False, need_host: bool = False) -> tuple[str, int]:
    """HOST:PORT (port 0 only for a listener: any free port). An empty host means loopback, except
    with ``need_host`` (a mirror's --to: where the replica lives must be said, not guessed)."""
    host, sep, port = text.rpartition(":")
    if need_host and sep and not host.strip("[] "):
        raise ValueError(f"bad address {text!r}: give the target's host, e.g. 127.0.0.1{text.strip()}")
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


# What a mirror section records about the pairing (not configuration): kept when the mirror is
# configured again to the same target.
PAIRING_KEYS = ("replica_id", "initial_sync_done", "sync_total", "split_brain")


def merge_section(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The stored ``mirror`` section with ``new`` applied: keys absent from ``new`` keep their value;
    ``None`` removes one (back to its default). The pairing stays while the target is the same."""
    section = {k: v for k, v in old.items() if k not in PAIRING_KEYS and k != "discard_replica"}
    for k, v in new.items():
        if v is None:
            section.pop(k, None)
        else:
            section[k] = v
    if old.get("to") == section.get("to"):  # same target: keep the pairing (no full resync)
        for k in PAIRING_KEYS:
            if k in old:
                section[k] = old[k]
    if new.get("discard_replica"):
        section["discard_replica"] = True
    return section


def check_section(section: dict[str, Any], data_dir: Path | None = None) -> SyncConfig | AsyncConfig:
    """The replicator configuration of a ``mirror`` section; ValueError with a user message if bad.
    With ``data_dir`` (the site's keys) a link that is TLS gets its policy (vdisk/tls.py)."""
    mode = section.get("mode", "sync")
    if mode not in MODES:
        raise ValueError(f"invalid --mode {mode!r}: use sync or async")
    if section.get("on_link_loss", "degrade") not in POLICIES:
        raise ValueError(f"--on-link-loss must be one of {', '.join(POLICIES)}")
    host, port = parse_hostport(str(section.get("to", "")), need_host=True)
    alert_thresholds(section)
    psk = read_psk(section.get("psk_file"))
    timeout = parse_duration(section.get("timeout", 10.0), "timeout")
    from .tls import source_tls

    tls = source_tls(section, data_dir, host, port, psk is not None)
    if mode == "sync":
        return SyncConfig(host, port, on_link_loss=section.get("on_link_loss", "degrade"), psk=psk,
                          block_timeout=parse_duration(section.get("block_timeout", 30.0), "block_timeout"),
                          timeout=timeout, tls=tls)
    rate = section.get("rate")
    schedule, ship_at = section.get("schedule") or None, section.get("ship_at") or None
    if schedule is not None:
        Schedule.parse(str(schedule))  # ValueError naming the bad token
    if ship_at is not None:
        ShipAt.parse(str(ship_at))
    buffer = section.get("buffer_size", DEFAULT_BUFFER)
    return AsyncConfig(host, port, psk=psk, timeout=timeout, tls=tls,
                       rate=None if rate in (None, "") else parse_rate(str(rate)),
                       schedule=None if schedule is None else str(schedule),
                       ship_at=None if ship_at is None else str(ship_at),
                       buffer_size=parse_size(str(buffer), minimum=1 << 20) if not isinstance(buffer, int) else buffer,
                       checkpoint_interval=parse_duration(section.get("checkpoint_interval", 5.0), "checkpoint interval"),
                       paused=bool(section.get("paused", False)))


def shipped_counts(rep: SyncReplicator | AsyncReplicator) -> dict[str, int]:
    """A replicator's own running counts (they start at zero with it); see MirrorManager.counters."""
    if isinstance(rep, AsyncReplicator):
        red = rep.reduction_snapshot()
        return {"logical_bytes": rep.out_meter.total + rep.chunk_bytes_sent, "wire_bytes": rep.wire_meter.total,
                "connects": rep.connects, "overflows": rep.overflows, "overflow_bytes": rep.overflow_bytes,
                **{f"saved_{k}": getattr(red, k) for k in SAVED}}
    return {"logical_bytes": rep.acked_bytes, "wire_bytes": rep.outbox.sent, "connects": rep.connects,
            "overflows": 0, "overflow_bytes": 0, **{f"saved_{k}": 0 for k in SAVED}}


def alert_thresholds(section: dict[str, Any]) -> tuple[float | None, float]:
    """(rpo, stall) in seconds from a ``mirror`` section: no RPO unless set, stall 120 s."""
    rpo = section.get("rpo")
    return (None if rpo in (None, "") else parse_duration(rpo, "rpo"),
            parse_duration(section.get("stall") or DEFAULT_STALL, "stall"))


class _Mirrored:
    """One mirrored volume while it is served: its MirrorState, which outlives replicators, and the
    replicator on top of it (None: ``marking`` is attached, so writes are still recorded)."""

    def __init__(self, state: MirrorState) -> None:
        self.state = state
        self.marking = Marking(state)
        self.rep: SyncReplicator | AsyncReplicator | None = None
        self.scope: trio.CancelScope | None = None
        self.done: trio.Event | None = None  # set once the replicator's run task has returned
        self.journal: Journal | None = None  # open while an async replicator may use it
        self.rpo: float | None = None
        self.stall = DEFAULT_STALL
        self.watch: MirrorWatch | None = None


def sweep_temp_files(root: Path, name: str) -> None:
    """Remove ``.NAME.*.PID.tmp`` files of processes that are gone (an atomic write interrupted by a
    crash or a full disk); a live pid's file is its own business."""
    for tmp in root.glob(f".{name}.*.tmp"):
        pid = tmp.name[:-4].rpartition(".")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("volume %s: removing %s, left by process %s", name, tmp, pid)
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def recorded_dirty(root: Path, name: str, size: int) -> DirtyMap:
    """What the files say may differ from the replica: the saved map and every extent in the
    activity log (writes that may have been in flight, or whose bits were not saved yet: an extent
    leaves the log only once the map holding its bits is saved). The daemon starts from exactly
    this, and offline status reports it."""
    dirty_path, al_path = (root / f"{name}{suffix}" for suffix in MIRROR_SIDECARS)
    dirty = DirtyMap.load(size, REGION, dirty_path)
    extent = ActivityLog.EXTENT
    logged = ActivityLog.logged(al_path, extent)
    if ActivityLog.ALL in logged:
        dirty.mark(0, size)
    for e in logged:
        if e * extent < size:
            dirty.mark(e * extent, min(extent, size - e * extent))
    return dirty


class MirrorManager:
    """Runs one replicator per mirrored volume of a daemon, over that volume's MirrorState."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.mirrors: dict[str, _Mirrored] = {}
        self.verifying: dict[str, dict[str, Any]] = {}  # volume -> a running verify's progress
        # Counts of replicators that were replaced (new target or keys, mode switch) or stopped, per
        # volume: what metrics report is these plus the live replicator's, so no counter goes back.
        self.banked: dict[str, dict[str, int]] = {}
        # Per target address: the blocks it is known to hold, shared by this daemon's volumes
        # mirrored to it (a clone finds the template's blocks another volume shipped: reduce.py).
        self.known: dict[str, KnownBlocks] = {}
        self._nursery: trio.Nursery | None = None
        self.events = EventRing(log)
        daemon.control.register("mirror", self._cmd_mirror)
        daemon.control.register("verify", self._cmd_verify)
        daemon.control.register("throttle", self._cmd_throttle)
        daemon.control.register("pause", self._cmd_pause)
        daemon.control.register("resume", self._cmd_resume)

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
                        m = self._open(vol)  # from here on every write is recorded, whatever follows
                        if section.get("on_link_loss") in POLICIES:
                            m.marking.on_link_loss = section["on_link_loss"]
                        await self.start(vol, section)
                    except (ValueError, OSError) as e:
                        log.error("volume %s: mirror not started: %s", vol.name, e)
            nursery.start_soon(self._keep_saved)
            nursery.start_soon(self._watch_forever)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                for name, m in self.mirrors.items():
                    vol = self.daemon.volumes.get(name)
                    if m.rep is not None:  # no replicator from here on: the configured policy applies
                        m.marking.on_link_loss = m.rep.on_link_loss
                    if vol is not None:
                        vol.mirror.attach(m.marking)  # late writes (a drain that timed out) are still marked
                    # An async mirror's journal stays for the next start (it resumes from it).
                    self._retire(m.rep, m.scope, fail_held=True, fold=False)
                    m.rep = m.scope = m.done = None

    def close(self) -> None:
        """Once the front ends are stopped: save every map, drop idle extents, close the logs."""
        for m in self.mirrors.values():
            if m.journal is not None:
                m.journal.sync()
                m.journal.close()
                m.journal = None
            m.state.close()
        self.mirrors.clear()

    def _journal_path(self, name: str) -> Path:
        return self.daemon.store.root / f"{name}{JOURNAL_SUFFIX}"

    def _journal(self, m: _Mirrored, name: str) -> Journal:
        if m.journal is None:
            m.journal = Journal.open(self._journal_path(name))
            rec = getattr(m.journal, "recovery", None) or {}
            if rec.get("torn_bytes"):
                log.warning("volume %s: cut a torn journal tail of %d bytes (a crash mid-append)", name, rec["torn_bytes"])
            for o, n in rec.get("dropped_ranges", ()):  # records past a gap: resent from the image
                m.state.dirty.mark(o, n)
        return m.journal

    def _drop_journal(self, m: _Mirrored, name: str) -> None:
        """No async replicator will read the journal: whatever it holds goes into the dirty map
        (the replica lacks it), then the directory goes."""
        path = self._journal_path(name)
        if m.journal is None and not path.exists():
            return
        j = self._journal(m, name)
        for o, n in j.ranges(j.first_seq):
            m.state.dirty.mark(o, n)
        if not m.state.dirty.save(force=True):
            log.error("volume %s: journal kept: the dirty map cannot be saved", name)
            return
        j.close()
        m.journal = None
        shutil.rmtree(path, ignore_errors=True)

    def _open(self, vol: ServedVolume) -> _Mirrored:
        """The volume's MirrorState from its files (dirty = saved map | logged extents), attached
        as ``Marking`` until a replicator takes over."""
        m = self.mirrors.get(vol.name)
        if m is not None:
            return m
        root, size = self.daemon.store.root, vol.meta.size
        sweep_temp_files(root, vol.name)
        dirty = recorded_dirty(root, vol.name, size)
        al = ActivityLog(self._paths(vol.name)[1], before_evict=dirty.save)
        recovered = al.recover()  # already in ``dirty``: the last run died with these extents hot
        if recovered:
            log.warning("volume %s: %d extents from the activity log marked for resync", vol.name, len(recovered))
        if dirty.save(force=True):  # else logged, naming the file; retried by _keep_saved
            try:
                al.clear()  # the recovered extents' bits are saved now
            except OSError as e:  # the log keeps them; it is written again with the next admission
                log.error("volume %s: cannot write the activity log: %s", vol.name, e.strerror or e)
        m = self.mirrors[vol.name] = _Mirrored(MirrorState(dirty, al, HeldWrites(30.0)))
        m.watch = MirrorWatch(vol.name, self.events)
        vol.mirror.attach(m.marking)
        return m

    async def start(self, vol: ServedVolume, section: dict[str, Any]) -> SyncReplicator | AsyncReplicator:
        """Start (or replace) the volume's replicator. The new one is running before it is attached,
        and attached in one step: writes never go unrecorded, and whatever the old one had not got
        acknowledged is marked dirty in the shared map, for the new one to resend. Switching mode
        is the same hand-over: sync -> async starts the journal with the sync mirror's unacknowledged
        writes dirty (the async catch-up sends them); async -> sync folds what the replica has not
        committed into the dirty map, which the sync resync sends. An async mirror whose target
        and keys stay the same is reconfigured in place (rate, schedule...: no reconnect)."""
        config = check_section(section, self.daemon.store.root)
        m = self._open(vol)
        m.rpo, m.stall = alert_thresholds(section)
        if isinstance(config, AsyncConfig) and isinstance(m.rep, AsyncReplicator) and \
                dataclasses.replace(m.rep.config, **{f: getattr(config, f) for f in ASYNC_KEYS}) == config:
            m.rep.configure(config)
            return m.rep
        meta = vol.meta
        pairing = Pairing(section.get("replica_id"), bool(section.get("initial_sync_done")),
                          int(section.get("sync_total", 0)), discard_replica=bool(section.get("discard_replica")),
                          split_brain=section.get("split_brain") if isinstance(section.get("split_brain"), str) else None)
        promoted = meta.extra.get("promoted")
        origin = promoted.get("from_source_uuid") if isinstance(promoted, dict) else None
        ident = VolumeIdentity(meta.uuid, vol.name, meta.size, meta.block_size, meta.generation,
                               origin if isinstance(origin, str) else "")
        st = m.state
        rep: SyncReplicator | AsyncReplicator
        if isinstance(config, AsyncConfig):
            known = self.known.setdefault(f"{config.host}:{config.port}", KnownBlocks())
            rep = AsyncReplicator(config, ident, vol.image, st, self._journal(m, vol.name), pairing,
                                  save_pairing=lambda p: self._save_pairing(vol.name, p), inherited=m.rep is not None,
                                  known=known)
        else:
            if not isinstance(m.rep, AsyncReplicator):  # a journal left by an async period: fold it now
                self._drop_journal(m, vol.name)
            rep = SyncReplicator(config, ident, vol.image, st.dirty, st.al, pairing,
                                 save_pairing=lambda p: self._save_pairing(vol.name, p), held=st.held)
        assert self._nursery is not None
        scope, done = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await rep.run(task_status=task_status)
            except Exception:  # a replicator's bug ends that replicator, never the daemon
                log.exception("volume %s: the mirror stopped on an internal error", vol.name)
                rep.last_error = "internal error (see the daemon's log)"
            finally:
                done.set()

        await self._nursery.start(run)
        old, old_scope, old_done = m.rep, m.scope, m.done
        # The Marking's policy is left alone here: ops that began on it before this attach (waiting
        # for the activity log) finish on it, under the policy they were issued with, marked for the
        # new replicator; they are not failed as if no replicator ran. Shutdown gives it ours (run).
        vol.mirror.attach(rep)
        m.rep, m.scope, m.done = rep, scope, done
        seen = self._bank(vol.name, old)  # in the same step as the swap: a scrape never sees a dip
        if old is not None:
            self._retire(old, old_scope, fail_held=False, fold=not isinstance(rep, AsyncReplicator))
            if config.on_link_loss != "block":
                st.held.release()  # degrade now: writes held by the old policy complete (they are marked)
        if isinstance(old, AsyncReplicator) and not isinstance(rep, AsyncReplicator):
            await self._ended(old_done)  # its shipper may still be reading the journal in a thread
            self._bank(vol.name, old, seen)  # what it shipped meanwhile
            self._drop_journal(m, vol.name)  # folded by close(): nothing in it any more
        return rep

    def _bank(self, name: str, rep: SyncReplicator | AsyncReplicator | None,
              already: dict[str, int] | None = None) -> dict[str, int]:
        """Add a retired replicator's counts (beyond ``already`` banked) to the volume's totals."""
        if rep is None:
            return {}
        now = shipped_counts(rep)
        banked = self.banked.setdefault(name, {})
        for k, v in now.items():
            banked[k] = banked.get(k, 0) + v - (already or {}).get(k, 0)
        return now

    def counters(self, name: str) -> dict[str, int]:
        """Running totals of the volume's mirror since the daemon started, over every replicator it
        had: bytes shipped (logical and on the wire), connects, overflows. Never decrease."""
        out = dict.fromkeys(("logical_bytes", "wire_bytes", "connects", "overflows", "overflow_bytes",
                             *(f"saved_{k}" for k in SAVED)), 0)
        out.update(self.banked.get(name, {}))
        m = self.mirrors.get(name)
        if m is not None and m.rep is not None:
            for k, v in shipped_counts(m.rep).items():
                out[k] += v
        return out

    @staticmethod
    def _retire(rep: SyncReplicator | AsyncReplicator | None, scope: trio.CancelScope | None, fail_held: bool,
                fold: bool = True) -> None:
        """Stop a replicator that is no longer attached: cancel its tasks, mark what it had in flight
        (an async one keeps its journal for an async successor, ``fold=False``)."""
        if scope is not None:
            scope.cancel()
        if isinstance(rep, AsyncReplicator):
            rep.close(fail_held=fail_held, fold=fold)
        elif rep is not None:
            rep.close(fail_held=fail_held)

    @staticmethod
    async def _ended(done: trio.Event | None) -> None:
        """Wait for a cancelled run task to return (a worker thread it awaits finishes first)."""
        if done is not None:
            with trio.move_on_after(30):
                await done.wait()

    async def _stop(self, name: str) -> None:
        """``mirror --stop``: unmirrored from now on; the state goes too."""
        m = self.mirrors.pop(name, None)
        if m is None:
            return
        self.events.add(time.time(), name, "info", "mirror stopped")
        vol = self.daemon.volumes.get(name)
        if vol is not None:
            vol.mirror.attach(None)
        self._bank(name, m.rep)
        self._retire(m.rep, m.scope, fail_held=True)
        await self._ended(m.done)
        if m.journal is not None:
            m.journal.close()
            m.journal = None
        shutil.rmtree(self._journal_path(name), ignore_errors=True)
        m.state.close()

    async def _keep_saved(self) -> None:
        """Retry dirty-map saves that failed (a full disk, say), with backoff up to 5 s; the map is
        complete in memory meanwhile and the activity log keeps the extents whose bits are unsaved."""
        delay = 0.1
        while True:
            await trio.sleep(delay)
            failing = [m.state.dirty for m in self.mirrors.values() if m.state.dirty.save_error]
            for dirty in failing:
                await trio.to_thread.run_sync(dirty.save, True)
            still = any(d.save_error for d in failing)
            delay = min(delay * 2, 5.0) if still else (0.1 if failing else 1.0)

    async def _watch_forever(self) -> None:
        """Once a second: each mirror's snapshot through its watch (events, alerts, link history)."""
        while True:
            self.watch_once()
            await trio.sleep(1.0)

    def watch_once(self) -> None:
        now = time.time()
        for name, m in list(self.mirrors.items()):
            demoted = getattr(m.rep, "demoted", None)
            if demoted is not None:
                self._record_demoted(name, demoted)
            st = self._raw_status(name)
            if m.watch is not None and st is not None:
                m.watch.update(st, now, m.rpo, m.stall)

    def _record_demoted(self, name: str, checkpoint: int) -> None:
        """A planned failover demoted this volume: recorded, so that it is not served writable again
        (vdisk/replicas.py) until `vdisk failback` makes it the replica of the promoted one."""
        section = dict(self.daemon.store.meta(name).extra.get("mirror") or {})
        if isinstance(section.get("demoted"), dict):
            return
        section["demoted"] = {"checkpoint": checkpoint, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            self.daemon.store.update(name, mirror=section)
        except OSError as e:
            log.error("volume %s: cannot record its demotion (retried): %s", name, e.strerror or e)

    def _save_pairing(self, name: str, p: Pairing) -> None:
        section = dict(self.daemon.store.meta(name).extra.get("mirror") or {})
        section.update(replica_id=p.replica_id, initial_sync_done=p.initial_sync_done, sync_total=p.sync_total)
        if p.split_brain is None:
            section.pop("split_brain", None)
        else:
            section["split_brain"] = p.split_brain
        if not p.discard_replica:  # the compare it asked for is done: a later connect must not discard again
            section.pop("discard_replica", None)
        try:
            self.daemon.store.update(name, mirror=section)
        except OSError as e:
            # Safe to lose: without a recorded replica id the next start compares Merkle trees.
            log.error("volume %s: cannot save the mirror pairing in %s: %s", name,
                      self.daemon.store.root / f"{name}.json", e.strerror or e)

    def status(self, name: str) -> dict[str, Any] | None:
        """The replicator's snapshot with its watch's link, alerts and resync progress."""
        st = self._raw_status(name)
        m = self.mirrors.get(name)
        if st is not None and m is not None and m.rep is not None:
            from .tls import tls_status

            st["tls"] = tls_status(m.rep.config)
        if st is not None and name in self.verifying:
            st["verify"] = dict(self.verifying[name])
        if st is None or m is None or m.watch is None:
            return st
        return m.watch.annotate(st, m.rpo)

    def _raw_status(self, name: str) -> dict[str, Any] | None:
        m = self.mirrors.get(name)
        if m is None:
            return None
        if isinstance(m.rep, AsyncReplicator):
            st = m.rep.statistics()
            st["reduction"]["per_target"] = self._target_reduction(st["target"])
            return st
        if m.rep is not None:
            return dataclasses.asdict(m.rep.statistics())
        section = self.daemon.store.meta(name).extra.get("mirror") or {}
        dirty = m.state.dirty
        return {"mode": section.get("mode"), "state": "stopped", "target": section.get("to"),
                "on_link_loss": section.get("on_link_loss"), "dirty_bytes": dirty.dirty_bytes,
                "in_flight": 0, "initial_sync": {"done": bool(section.get("initial_sync_done"))},
                "last_error": "the mirror is not running (see the daemon's log)", "save_error": dirty.save_error}

    def _target_reduction(self, target: str) -> dict[str, Any]:
        """The reduction of every volume of this daemon mirrored (async) to ``target``, summed."""
        total, n = Reduction(), 0
        for other in self.mirrors.values():
            rep = other.rep
            if isinstance(rep, AsyncReplicator) and f"{rep.config.host}:{rep.config.port}" == target:
                total.add(rep.reduction_snapshot())
                n += 1
        return {"target": target, "volumes": n, **total.as_dict()}

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
            if vol.name not in self.mirrors and not isinstance(store.meta(vol.name).extra.get("mirror"), dict):
                raise ControlError(f"volume {vol.name!r} is not mirrored: nothing to stop")
            await self._stop(vol.name)
            store.update(vol.name, mirror=None)
            for p in self._paths(vol.name):
                p.unlink(missing_ok=True)
            return {}
        new = req.get("set")
        if not isinstance(new, dict):
            raise ControlError("mirror: give 'set' (a configuration) or 'stop'")
        m = self.mirrors.get(vol.name)
        if new and set(new) <= set(ALERT_KEYS) and m is not None and m.rep is not None:
            section = merge_section(store.meta(vol.name).extra.get("mirror") or {}, new)
            try:
                m.rpo, m.stall = alert_thresholds(section)
            except ValueError as e:
                raise ControlError(str(e)) from None
            store.update(vol.name, mirror=section)
            return {"mirror": self.status(vol.name)}
        return await self._set(vol, new)

    async def _set(self, vol: ServedVolume, new: dict[str, Any]) -> dict[str, Any]:
        """Merge ``new`` into the stored section (keys not given keep their value), persist, apply."""
        store = self.daemon.store
        old = store.meta(vol.name).extra.get("mirror") or {}
        section = merge_section(old, new)
        try:
            check_section(section, store.root)
        except ValueError as e:
            raise ControlError(str(e)) from None
        store.update(vol.name, mirror=section)
        await self.start(vol, section)
        return {"mirror": self.status(vol.name)}

    def _async_volume(self, req: dict[str, Any]) -> ServedVolume:
        vol = self._volume(req)
        section = self.daemon.store.meta(vol.name).extra.get("mirror")
        if not isinstance(section, dict):
            raise ControlError(f"volume {vol.name!r} is not mirrored")
        if section.get("mode", "sync") != "async":
            raise ControlError(f"the mirror of {vol.name!r} is sync: throttle, pause and resume apply to "
                               f"async mirrors (`vdisk mirror {vol.name} --mode async`)")
        return vol

    async def _cmd_throttle(self, req: dict[str, Any]) -> dict[str, Any]:
        vol = self._async_volume(req)
        return await self._set(vol, {"rate": req.get("rate")})

    async def _cmd_pause(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._set(self._async_volume(req), {"paused": True})

    async def _cmd_resume(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._set(self._async_volume(req), {"paused": False})

    async def _cmd_verify(self, req: dict[str, Any]) -> dict[str, Any]:
        """Verify (and repair); meanwhile the volume's status has ``verify``: phase, bytes hashed."""
        vol = self._volume(req)
        prog = self.verifying[vol.name] = {"phase": "starting", "done_bytes": 0, "total_bytes": vol.meta.size}
        try:
            return await self._verify(vol, req, prog)
        finally:
            if self.verifying.get(vol.name) is prog:
                del self.verifying[vol.name]

    async def _verify(self, vol: ServedVolume, req: dict[str, Any], prog: dict[str, Any]) -> dict[str, Any]:
        m = self.mirrors.get(vol.name)
        rep = m.rep if m is not None else None
        if rep is None:
            raise ControlError(f"volume {vol.name!r} is not mirrored" if m is None else
                               f"the mirror of {vol.name!r} is not running (see the daemon's log)")
        if isinstance(rep, AsyncReplicator):
            # The replica is at a checkpoint behind the volume: ship and commit everything first.
            if rep.state in ("disconnected", "split_brain"):
                raise ControlError(f"the mirror of {vol.name!r} is {rep.state}: verify needs a connected replica")
            prog["phase"] = "catching up"
            if not await rep.drain(float(req.get("timeout", 300))):
                raise ControlError(f"the mirror of {vol.name!r} did not catch up for verify (state "
                                   f"{rep.statistics()['state']})")
        elif rep.state not in ("in_sync", "syncing"):
            raise ControlError(f"the mirror of {vol.name!r} is {rep.state}: verify needs a connected replica")
        def hashed(pos: int) -> None:  # the hashing thread; then the target's tree is awaited
            prog["done_bytes"] = pos
            prog["phase"] = "hashing" if pos < vol.meta.size else "comparing with the replica"

        prog["phase"] = "hashing"
        try:
            report = await compare(vol.image, vol.meta.size, REGION, rep.query_hashes, hashed)
        except Exception as e:  # noqa: BLE001 (link errors end up as one line for the user)
            raise ControlError(f"verify failed: {e}") from None
        out = {"ranges": report.ranges, "differing_bytes": report.differing_bytes,
               "differing_blocks": len(report.differing_blocks), "block_size": report.leaf_size,
               "digests_exchanged": report.digests_exchanged,
               "local_hash_seconds": round(report.local_hash_seconds, 3), "repaired": False}
        if req.get("repair") and report.differing_blocks:
            prog["phase"] = "repairing"
            if isinstance(rep, AsyncReplicator):
                before = rep.chunk_bytes_sent
                for b in report.differing_blocks:
                    rep.dirty.mark_region(b)
                rep.request_resync()
                ok = await rep.drain(float(req.get("timeout", 300)))
                out.update(repaired=ok, resent_bytes=rep.chunk_bytes_sent - before)
                self._verified(vol.name, out)
                return {"verify": out}
            before = rep.resync_bytes_sent
            for b in report.differing_blocks:
                rep.dirty.mark_region(b)
            rep.request_resync()
            ok = await rep.wait_in_sync(float(req.get("timeout", 300)))
            out.update(repaired=ok, resent_bytes=rep.resync_bytes_sent - before)
        self._verified(vol.name, out)
        return {"verify": out}

    def _verified(self, name: str, out: dict[str, Any]) -> None:
        n = len(out["ranges"])
        text = "verify: the replica matches" if not n else (
            f"verify: {n} differing range{'s' if n != 1 else ''}, {format_size(out['differing_bytes'])}"
            + (f", repaired ({format_size(out.get('resent_bytes', 0))} resent)" if out["repaired"] else ""))
        self.events.add(time.time(), name, "warning" if n and not out["repaired"] else "info", text)

