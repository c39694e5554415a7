"""Replica seals: how a target knows that nobody but itself wrote a replica since it last did.

A replica changes only through its target (vdisk refuses to open it writable: vdisk/replicas.py), so
a change made any other way (``dd`` into the image, an older vdisk, a copy promoted and written) is
a split brain: the source's dirty map does not cover it, and resyncing only what the source knows
would leave the replica silently different. The target keeps, in the ``replica`` section of the
replica's metadata:

    seal          the image's identity and change times (st_ino, st_size, st_mtime_ns, st_ctime_ns)
                  and the volume's generation, recorded after an fdatasync whenever the target
                  stops writing: at the end of every session, and at idle points within one
    session_open  set before a session's first write, cleared with the seal at its end

On connect the target compares the seal with the image as it is now (``judge``):
  - generation, inode or size changed, the image is gone, or mtime changed with no session left
    open: split brain. The link is refused (code ``split-brain``) until the source asks for
    ``--discard-replica`` (then an image of the wrong size or a missing one is put back to the
    volume's size, a Merkle compare finds what differs and the source resends it).
  - only ctime changed (chmod, chown, a hard link: attributes, maybe not data), or only mtime and
    the last session never closed (the target died: its own writes after the last idle seal
    explain any change): no refusal, but the source is told to Merkle-compare first
    (Welcome.verify), so whatever changed is found and resent instead of trusted; the target logs why.
Residual risk: after a target crash, a foreign write is indistinguishable from the target's own;
data written and its mtime put back (``touch -d``) leaves only ctime changed, like a chmod: both
are then overwritten by the compare, not reported as split brain; a write within one kernel timestamp tick of a
seal may go unseen by the stat comparison; a foreign write while the source keeps writing is hidden
by the target's next write (only a Merkle verify finds it). The mtime comparison assumes the
kernel that writes the replica stamps its times (a local filesystem, not a network one whose
server's clock runs ahead, which would report false split brains). ctime cannot be set back, which
is what makes ``touch -d`` tampering visible at all (as a compare, above).

Within a session, a write by someone else shows as an mtime later than the end of the target's own
last write (``foreign_write``): the kernel stamps mtime from a coarse clock that never runs ahead of
``time.time_ns()``.
"""
from __future__ import annotations

import datetime as dt
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blockdev.volume import VolumeError, VolumeMeta, VolumeStore

SPLIT_BRAIN = "split-brain"  # ErrorMsg code: the source stops retrying until the operator decides
DISCARD_REPLICA = "discard-replica"  # Hello capability: the operator chose to overwrite the replica
IDLE = 1.0  # seconds without a write after which the target seals (the source pings every second)


@dataclass(frozen=True)
class Verdict:
    """What a connect may do with a replica: refuse (split brain), compare first, or go on."""

    split_brain: str | None = None  # why, for the one-line message
    verify: bool = False
    note: str | None = field(default=None, compare=False)  # why a compare, for the target's log


def image_seal(path: Path, generation: int) -> dict[str, int]:
    st = os.stat(path)
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "generation": generation}


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="seconds")


def judge(rep: dict[str, Any], now: dict[str, int]) -> Verdict:
    """Compare the recorded seal of a replica (its ``replica`` section) with its image ``now``."""
    recorded = rep.get("split_brain")
    if isinstance(recorded, dict):  # stays split until the operator decides, whatever the image does
        return Verdict(split_brain=str(recorded.get("reason")))
    seal = rep.get("seal")
    crashed = bool(rep.get("session_open"))
    if not isinstance(seal, dict):
        # No seal yet: a replica from before seals existed, or its first session died: compare.
        return Verdict(verify=True)
    if seal.get("generation") != now["generation"]:
        return Verdict(split_brain=f"it was opened writable outside the mirror (generation "
                                   f"{seal.get('generation')} -> {now['generation']})")
    if seal.get("ino") != now["ino"]:
        return Verdict(split_brain="its image file was replaced")
    if seal.get("size") != now["size"] or seal.get("mtime_ns") != now["mtime_ns"]:
        # The target died mid-session: it may have written after its last seal itself (never
        # resized: it writes within the volume's size only).
        if crashed and seal.get("size") == now["size"]:
            return Verdict(verify=True, note="its last session did not end cleanly (the target stopped "
                                             "mid-session): the source compares and resends what differs")
        resized = f", resized from {seal.get('size')} to {now['size']} bytes" if seal.get("size") != now["size"] else ""
        return Verdict(split_brain=f"its image was modified at {_when(now['mtime_ns'])}{resized}")
    if seal.get("ctime_ns") != now["ctime_ns"]:
        # chmod, chown, a hard link... or data written and its mtime put back (touch -d): the
        # compare overwrites whatever differs, without a split-brain stop (the stat cannot tell).
        return Verdict(verify=True, note=f"its image's attributes changed at {_when(now['ctime_ns'])} (its "
                                         "data may have too): the source compares and overwrites what differs")
    return Verdict()


def foreign_write(now: dict[str, int], own_write_end_ns: int) -> str | None:
    """Within a session: why the image was written by someone else after the target's last write."""
    if now["mtime_ns"] > own_write_end_ns:
        return f"its image was modified at {_when(now['mtime_ns'])}, after the target's last write"
    return None


def split_brain_record(reason: str) -> dict[str, str]:
    return {"reason": reason, "detected": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def message(replica: str, source_name: str, reason: str) -> str:
    """The one line both sides log and `vdisk status` shows."""
    return (f"split brain: replica {replica!r} was written outside the mirror ({reason}); it is not resynced "
            f"automatically: run `vdisk mirror {source_name} --discard-replica` on the source to overwrite what "
            "differs, or leave the pair disconnected")


def open_session(store: VolumeStore, name: str, fields: dict[str, Any]) -> VolumeMeta:
    """Before the session's first write: the replica section with ``fields``, session_open set and
    any recorded split brain cleared (the caller has decided to go on)."""
    rep = dict(store.meta(name).extra.get("replica") or {})
    rep.pop("split_brain", None)
    rep.update(fields, session_open=True)
    return store.update(name, replica=rep)


def record_split_brain(store: VolumeStore, name: str, reason: str) -> None:
    """Persist the verdict, so that it holds until the operator decides, whatever the image does next."""
    rep = dict(store.meta(name).extra.get("replica") or {})
    if not isinstance(rep.get("split_brain"), dict):
        rep["split_brain"] = split_brain_record(reason)
        store.update(name, replica=rep)


class SealedImage:
    """A replica image that remembers when the target itself last wrote it, so the seal recorded at
    an idle point or at the end of a session can tell its own writes from anybody else's."""

    def __init__(self, inner: Any, store: VolumeStore, name: str, source_name: str) -> None:
        self._inner, self.store, self.name, self.source_name = inner, store, name, source_name
        self._lock = threading.Lock()  # a write and the time it ended, against a seal's stat
        self.writes = 0
        self.sealed_writes = 0
        self.reported = False  # a split brain found within the session is already in the log
        # What was accepted at connect is "ours": only a later change can be someone else's.
        self.last_write_ns = os.stat(store.image_path(name)).st_mtime_ns

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> object:
        with self._lock:
            try:
                return self._inner.pwrite(data, offset, fua)
            finally:
                self.writes += 1
                self.last_write_ns = time.time_ns()

    def write_zeroes(self, length: int, offset: int, fua: bool = False, may_trim: bool = True,
                     fast: bool = False) -> object:
        with self._lock:
            try:
                return self._inner.write_zeroes(length, offset, fua, may_trim, fast)
            finally:
                self.writes += 1
                self.last_write_ns = time.time_ns()

    def __getattr__(self, attr: str) -> Any:  # pread, extents, flush, close...: the image's own
        return getattr(self._inner, attr)

    def seal(self, *, session_open: bool) -> str | None:
        """fdatasync, then record the seal (any thread); the reason if someone else wrote the image
        since the target's last write (the split brain is then recorded instead). None if a write
        came in meanwhile (the next idle point seals) or all is well."""
        before = self.writes
        self._inner.flush()  # not under the lock: writes go on meanwhile
        with self._lock:
            if self.writes != before and session_open:
                return None
            meta = self.store.meta(self.name)
            now = image_seal(self.store.image_path(self.name), meta.generation)
            reason = foreign_write(now, self.last_write_ns)
            sealed = self.writes
        if reason is not None:
            record_split_brain(self.store, self.name, reason)
            return reason
        rep = dict(meta.extra.get("replica") or {})
        rep.update(seal=now, session_open=session_open)
        self.store.update(self.name, replica=rep)
        self.sealed_writes = sealed
        return None

    def check(self) -> str | None:
        """Between seals (any thread): why someone else wrote the image, recorded, or None."""
        with self._lock:
            now = image_seal(self.store.image_path(self.name), 0)
            reason = foreign_write(now, self.last_write_ns)
        if reason is not None:
            record_split_brain(self.store, self.name, reason)
        return reason

    async def keep_sealed(self, limiter: trio.CapacityLimiter) -> None:
        """At idle points (no write for IDLE seconds): seal if the target wrote since the last seal
        (a target that dies later then needs no compare), else look whether someone else did (one
        stat). Raises SplitBrain if someone else wrote the image."""
        while True:
            await trio.sleep(IDLE)
            if time.time_ns() - self.last_write_ns < IDLE * 1e9:
                continue  # busy: the source's writes are flowing
            if self.writes != self.sealed_writes:
                reason = await trio.to_thread.run_sync(lambda: self.seal(session_open=True), limiter=limiter)
            else:
                reason = await trio.to_thread.run_sync(self.check, limiter=limiter)
            if reason is not None:
                self.reported = True
                raise SplitBrain(message(self.name, self.source_name, reason))


class SplitBrain(Exception):
    """The replica was written outside the mirror: the link ends with this one-line message."""

    code = SPLIT_BRAIN


def restore_image(store: VolumeStore, name: str) -> str | None:
    """``--discard-replica`` of an image that is no longer the volume's size (truncated, extended)
    or no longer there: put back a sparse image of the right size, so that the compare that follows
    finds and overwrites what differs. What was done, for the log; None if nothing was needed."""
    meta = store.meta(name)
    path = store.image_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, meta.size)
        finally:
            os.close(fd)
        return f"its image was missing: recreated empty ({meta.size} bytes)"
    if not stat.S_ISREG(st.st_mode):  # a symlink or device put in its place: not ours to write
        raise VolumeError(f"replica {name!r}: {path} is not a regular file (put back the image, or "
                          "move this one away, and try again)")
    if st.st_size == meta.size:
        return None
    os.truncate(path, meta.size)
    return f"its image was {st.st_size} bytes: resized to {meta.size}"


def admit(store: VolumeStore, name: str, source_name: str, *, created: bool, discard: bool) -> Verdict:
    """At connect, with the replica locked and before anything is written: go on, go on after a
    compare (``verify``), or raise SplitBrain (recorded in the replica's metadata)."""
    if created:  # brand new: the source copies everything, nothing to compare with
        return Verdict()
    if discard:  # the operator's decision: compare, then overwrite whatever differs here
        return Verdict(verify=True, note=restore_image(store, name))
    meta = store.meta(name)
    try:
        now = image_seal(store.image_path(name), meta.generation)
    except FileNotFoundError:
        now = None
    verdict = (Verdict(split_brain="its image file was removed") if now is None
               else judge(meta.extra.get("replica") or {}, now))
    if verdict.split_brain is not None:
        record_split_brain(store, name, verdict.split_brain)
        raise SplitBrain(message(name, source_name, verdict.split_brain))
    return verdict
