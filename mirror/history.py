"""Checkpoint history at the target: each committed unit's undo log is kept, so the replica can be
read as it was at any retained checkpoint while it stays a plain image at the latest one.

The undo log of the unit that takes checkpoint b to checkpoint e holds, for every block the unit
overwrote, the block's content at b (undo.py). At the commit of e the target hard-links that log
into ``NAME.history/`` as ``UNIT`` = ``{e:020d}.{e_ns}.{b}.{b_ns}.undo`` and puts a fresh log in
its place (two atomic steps; a crash between them leaves a log whose base is older than the
committed checkpoint, which the next start archives instead of dropping). The file names are the
per-checkpoint summary: listing a history is one ``listdir`` and a ``stat`` per unit.

A view of checkpoint j (``HistoryView``) reads each block from the oldest unit after j that saved
it (the units of the chain j -> ... -> latest, then the unit in progress), else from the replica.
The merged index is built once at open (a direct table per touched GiB: O(1) per block), and the
unit in progress is followed by tailing its log: the target makes an undo record durable before the
replica block it saves is written, so a reader that reads the replica, then finds no new record for
that block, read the right bytes; if it finds one, it reads again.

Retention (``prune``): the oldest units go while their base checkpoint is older than the window or
the history is over its size, but never past a pin: a reader (`vdisk recover`, another process)
holds ``NAME.history/pins/*.pin`` under ``flock`` naming the oldest checkpoint it reads; a pin
whose holder died (its lock is free) is removed.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockdev.backend import Layer

from .undo import BLOCK, HEADER, HEADER_MAGIC, HOLE_POS, UNDO_SUFFIX, _digest, read_checkpoint, scan_records

log = logging.getLogger("vdisk.target")

HISTORY_SUFFIX = ".history"  # NAME + suffix: the directory of kept units
UNIT_RE = re.compile(r"(\d{20})\.(\d+)\.(\d+)\.(\d+)\.undo")
PINS = "pins"
CHUNK_SHIFT = 18  # a direct table per 2^18 blocks (1 GiB): 6 bytes per block of a touched GiB


@dataclass(frozen=True)
class Unit:
    """A kept unit: its log restores checkpoint ``base`` from checkpoint ``end``."""

    base: int
    base_ns: int
    end: int
    end_ns: int
    path: Path
    bytes: int


@dataclass(frozen=True)
class CheckpointInfo:
    """One recoverable checkpoint: ``bytes`` is the history its successor's unit costs (0: the latest)."""

    id: int
    time_ns: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time_ns": self.time_ns, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                                             time.localtime(self.time_ns / 1e9)),
                "bytes": self.bytes}


def history_dir(root: Path, name: str) -> Path:
    return root / f"{name}{HISTORY_SUFFIX}"


def unit_name(base: tuple[int, int], end: tuple[int, int]) -> str:
    return f"{end[0]:020d}.{end[1]}.{base[0]}.{base[1]}.undo"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class History:
    """One replica's kept units (the module doc). Read-only methods need no lock: any process may list."""

    def __init__(self, root: Path, name: str) -> None:
        self.root, self.name = root, name
        self.dir = history_dir(root, name)

    def units(self) -> list[Unit]:
        """Every unit file, oldest first (by end checkpoint)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            m = UNIT_RE.fullmatch(n)
            if not m:
                continue
            p = self.dir / n
            try:
                size = os.stat(p).st_size
            except FileNotFoundError:  # pruned meanwhile
                continue
            out.append(Unit(int(m.group(3)), int(m.group(4)), int(m.group(1)), int(m.group(2)), p, size))
        out.sort(key=lambda u: u.end)
        return out

    def chain(self, committed: tuple[int, int] | None = None, units: list[Unit] | None = None) -> list[Unit]:
        """The units that connect to the committed checkpoint without a gap, oldest first."""
        cp = committed if committed is not None else read_checkpoint(self.root, self.name)
        by_end = {u.end: u for u in (units if units is not None else self.units())}
        out: list[Unit] = []
        at = cp[0]
        while at in by_end and by_end[at].base < at:
            u = by_end[at]
            out.append(u)
            at = u.base
        out.reverse()
        return out

    def checkpoints(self) -> list[CheckpointInfo]:
        """Recoverable checkpoints, oldest first; the last is the replica's committed one."""
        for _attempt in range(20):
            cp = read_checkpoint(self.root, self.name)
            if cp[0] == 0:
                return []
            units = self.units()
            chain = self.chain(cp, units)
            # A commit in progress (recorded, its unit not linked yet) hides the chain for a moment.
            if chain or not units or units[-1].end >= cp[0]:
                break
            time.sleep(0.02)
        out = [CheckpointInfo(u.base, u.base_ns, max(0, u.bytes - HEADER.size - 8)) for u in chain]
        out.append(CheckpointInfo(cp[0], cp[1], 0))
        return out

    # -- the target's side -----------------------------------------------------------------------
    def archive(self, path: Path, base: tuple[int, int], end: tuple[int, int]) -> None:
        """Keep the log at ``path`` (unit base -> end) by a hard link; idempotent."""
        self.dir.mkdir(exist_ok=True)
        dest = self.dir / unit_name(base, end)
        try:
            os.link(path, dest)
        except FileExistsError:
            pass
        _fsync_dir(self.dir)

    def clear(self, why: str) -> None:
        """The chain no longer leads to the replica (it was written without undo): drop it."""
        units = self.units()
        if units:
            log.warning("replica %s: checkpoint history dropped (%s)", self.name, why)
        for u in units:
            u.path.unlink(missing_ok=True)

    def pinned(self) -> int | None:
        """The oldest checkpoint a live reader holds (stale pins of dead readers are removed)."""
        pins = self.dir / PINS
        try:
            names = os.listdir(pins)
        except FileNotFoundError:
            return None
        low: int | None = None
        for n in names:
            if not n.endswith(".pin"):
                continue
            p = pins / n
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # held: a live reader
                    try:
                        at = int(os.pread(fd, 32, 0).decode() or "0")
                    except ValueError:
                        at = 0
                    low = at if low is None else min(low, at)
                    continue
                p.unlink(missing_ok=True)  # its holder died
            finally:
                os.close(fd)
        return low

    def prune(self, keep_seconds: float | None, keep_bytes: int | None, now_ns: int | None = None) -> int:
        """Drop the oldest units past the window or the size (never a pinned one); units dropped."""
        units = self.units()
        if not units:
            return 0
        now_ns = now_ns if now_ns is not None else time.time_ns()
        total = sum(u.bytes for u in units)
        pin = self.pinned()
        dropped = 0
        for u in units:
            old = keep_seconds is not None and u.base_ns < now_ns - int(keep_seconds * 1e9)
            big = keep_bytes is not None and total > keep_bytes
            if not (old or big) or (pin is not None and u.base >= pin):
                break
            u.path.unlink(missing_ok=True)
            total -= u.bytes
            dropped += 1
        # Units below a gap (a sync session wrote the replica without undo) lead nowhere.
        chain = {u.path for u in self.chain(None, units[dropped:])}
        for u in units[dropped:]:
            if u.path not in chain and (pin is None or u.base < pin):
                u.path.unlink(missing_ok=True)
                dropped += 1
        return dropped

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Pin:
    """A reader's hold on checkpoint ``at`` and everything after it (flock'd; the kernel drops it
    with the process). Created under a temporary name and renamed once locked, so the target never
    sees an unlocked pin of a live reader."""

    def __init__(self, history: History, at: int) -> None:
        pins = history.dir / PINS
        pins.mkdir(parents=True, exist_ok=True)
        tmp = pins / f".{os.getpid()}.{time.monotonic_ns()}.tmp"
        self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.pwrite(self.fd, str(at).encode(), 0)
        self.path = tmp.with_name(tmp.name[1:].removesuffix(".tmp") + ".pin")
        os.rename(tmp, self.path)

    def release(self) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


class NotRecoverable(Exception):
    """The checkpoint asked for is not (or no longer) in the history."""


class _Index:
    """Block -> (segment, file position | HOLE_POS) of the first record that saved it; a direct
    table per touched GiB (segment 0 means "not saved")."""

    def __init__(self) -> None:
        self.seg: dict[int, array] = {}
        self.pos: dict[int, array] = {}
        self.blocks = 0

    def add(self, first: int, last: int, seg: int, where: int) -> None:
        blk = first
        while blk <= last:
            c = blk >> CHUNK_SHIFT
            s = self.seg.get(c)
            if s is None:
                self.pos[c] = array("q", bytes(8 << CHUNK_SHIFT))  # before seg: readers look up seg first
                s = self.seg[c] = array("I", bytes(4 << CHUNK_SHIFT))
            p = self.pos[c]
            a = blk & ((1 << CHUNK_SHIFT) - 1)
            n = min(last - blk + 1, (1 << CHUNK_SHIFT) - a)
            for i in range(a, a + n):
                if s[i] == 0:  # the oldest record wins; the position first (lock-free readers)
                    p[i] = where if where == HOLE_POS else where + (blk - first + i - a) * BLOCK
                    s[i] = seg
                    self.blocks += 1
            blk += n

    def get(self, blk: int) -> tuple[int, int]:
        c = blk >> CHUNK_SHIFT
        s = self.seg.get(c)
        if s is None:
            return 0, 0
        i = blk & ((1 << CHUNK_SHIFT) - 1)
        return s[i], self.pos[c][i]


class _Segment:
    """One log file the view reads: a kept unit, or the unit in progress (followed by tailing)."""

    def __init__(self, fd: int, ino: int, base: int, pos: int) -> None:
        self.fd, self.ino, self.base, self.pos = fd, ino, base, pos
        self.runs: list[tuple[int, int]] = []  # the block runs indexed from it (the live one's)
        self.check = b""  # the bytes just before ``pos``: a log rewritten in place differs there


class HistoryView(Layer):
    """The replica as of checkpoint ``at``, read-only, in any process (the module doc)."""

    def __init__(self, inner: Any, root: Path, name: str, size: int, at: int) -> None:
        super().__init__(inner)
        self.root, self.name, self.vol_size, self.at = root, name, size, at
        self.history = History(root, name)
        self.live_path = os.fspath(root / f"{name}{UNDO_SUFFIX}")  # a str: stat'ed at every read
        self.lock = threading.Lock()
        self.index = _Index()
        self.segs: list[_Segment] = [_Segment(-1, 0, 0, 0)]  # 1-based: index 0 is "not saved"
        self.closed = False
        self.live: _Segment | None = None
        self.committed = (0, 0)
        self.pin = Pin(self.history, at)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        for _attempt in range(20):
            cp = read_checkpoint(self.root, self.name)
            chain = self.history.chain(cp)
            if self.at == cp[0]:
                units = []
            else:
                units = [u for u in chain if u.base >= self.at]
                if not units or units[0].base != self.at:
                    ids = [c.id for c in self.history.checkpoints()]
                    have = f"{ids[0]}..{ids[-1]}" if ids else "none"
                    raise NotRecoverable(f"checkpoint {self.at} of {self.name} is not in its history "
                                         f"(recoverable: {have})")
            try:
                inos = set()
                for u in units:
                    fd = os.open(u.path, os.O_RDONLY | os.O_CLOEXEC)
                    seg = self._add_segment(fd, u.base)
                    inos.add(seg.ino)
                    self._tail_kept(len(self.segs) - 1, u)
            except FileNotFoundError:  # pruned or re-archived meanwhile: start over
                self._reset()
                continue
            live = self._open_live()
            if live is not None and live.ino in inos:  # being archived right now: not a new unit
                os.close(live.fd)
                live = None
            if read_checkpoint(self.root, self.name) != cp:  # a commit raced the open: start over
                if live is not None:
                    os.close(live.fd)
                self._reset()
                continue
            self.live = live
            if live is not None:
                self.segs.append(live)
                self._tail(len(self.segs) - 1)
            self.committed = cp
            return
        raise NotRecoverable(f"replica {self.name} changes too fast to open its history; try again")

    def _reset(self) -> None:
        for s in self.segs[1:]:
            os.close(s.fd)
        self.segs = self.segs[:1]
        self.index = _Index()

    def _add_segment(self, fd: int, base: int) -> _Segment:
        head = os.pread(fd, HEADER.size + 8, 0)
        st = os.fstat(fd)
        seg = _Segment(fd, st.st_ino, base, HEADER.size + 8)
        self.segs.append(seg)
        if len(head) < HEADER.size + 8 or HEADER.unpack(head[:HEADER.size])[0] != HEADER_MAGIC or \
                _digest(head[:HEADER.size]) != head[HEADER.size:]:
            raise NotRecoverable(f"history of {self.name}: a unit log has a damaged header")
        return seg

    def _open_live(self) -> _Segment | None:
        try:
            fd = os.open(self.live_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        head = os.pread(fd, HEADER.size + 8, 0)
        if len(head) < HEADER.size + 8 or _digest(head[:HEADER.size]) != head[HEADER.size:]:
            os.close(fd)
            return None
        base = HEADER.unpack(head[:HEADER.size])[1]
        return _Segment(fd, os.fstat(fd).st_ino, base, HEADER.size + 8)

    def _tail(self, k: int) -> list[tuple[int, int]]:
        """Index the records appended to segment ``k`` since the last look; the new block runs."""
        seg = self.segs[k]
        end = os.fstat(seg.fd).st_size
        if end <= seg.pos:
            return []
        entries, seg.pos = scan_records(seg.fd, self.vol_size, seg.pos, end)
        for first, last, where in entries:
            self.index.add(first, last, k, where)
        runs = [(f, l_) for f, l_, _w in entries]
        if seg is self.live:
            seg.runs += runs
            seg.check = os.pread(seg.fd, 32, seg.pos - 32)
        return runs

    def _drop_live(self) -> list[tuple[int, int]]:
        """The unit in progress was rolled back (or its log rewritten): the target put the saved
        bytes back into the replica first, so its blocks are read from the replica again."""
        seg = self.live
        assert seg is not None
        k = self.segs.index(seg)
        idx = self.index
        mask = (1 << CHUNK_SHIFT) - 1
        for first, last in seg.runs:
            for blk in range(first, last + 1):
                arr = idx.seg.get(blk >> CHUNK_SHIFT)
                if arr is not None and arr[blk & mask] == k:
                    arr[blk & mask] = 0
                    idx.blocks -= 1
        dropped, seg.runs = seg.runs, []
        seg.pos, seg.check = HEADER.size + 8, b""
        return dropped + self._tail(k)

    def _tail_kept(self, k: int, unit: Unit) -> list[tuple[int, int]]:
        """A kept unit is whole: a record that fails its checksum is damage, not a torn tail, and
        reading past it would silently return newer data for its blocks."""
        runs = self._tail(k)
        if self.segs[k].pos != os.fstat(self.segs[k].fd).st_size:
            raise NotRecoverable(f"history of {self.name}: {unit.path.name} is damaged at byte {self.segs[k].pos}: "
                                 f"checkpoints up to {unit.base} cannot be recovered exactly")
        return runs

    def _refresh(self) -> list[tuple[int, int]]:
        """Follow the unit in progress (new records, a commit that rotated it); the new runs. One
        ``stat`` when nothing changed (every read pays it)."""
        try:
            st: os.stat_result | None = os.stat(self.live_path)
        except FileNotFoundError:
            st = None
        live = self.live
        if live is not None and st is not None and st.st_ino == live.ino:
            if st.st_size == live.pos:
                return []
            if st.st_size < live.pos or (live.check and os.pread(live.fd, 32, live.pos - 32) != live.check):
                return self._drop_live()  # truncated in place: rolled back (or reset and rewritten)
            return self._tail(len(self.segs) - 1)
        if st is None:
            return self._tail(len(self.segs) - 1) if live is not None else []
        new: list[tuple[int, int]] = []
        nxt = self._open_live()
        if nxt is None:
            return new
        if live is not None and nxt.ino == live.ino:
            os.close(nxt.fd)
            return new
        if live is not None:
            new += self._tail(len(self.segs) - 1)  # complete: committed before the rotation
        # Units committed between two looks (two rotations) are in the history by now.
        lo = live.base + 1 if live is not None else self.committed[0]
        for u in self.history.units():
            if lo <= u.base < nxt.base:
                fd = os.open(u.path, os.O_RDONLY | os.O_CLOEXEC)
                self._add_segment(fd, u.base)
                new += self._tail_kept(len(self.segs) - 1, u)
        self.segs.append(nxt)
        self.live = nxt
        new += self._tail(len(self.segs) - 1)
        return new

    # -- reads -----------------------------------------------------------------------------------
    def pread(self, buf: memoryview, offset: int) -> None:
        """Plan, read (workers read in parallel: the index only grows, a block's position is set
        before its segment), then look for records the target added meanwhile: one covering this
        range means the replica may have been overwritten after it was read: read again."""
        end = offset + len(buf)
        b0, b1 = offset // BLOCK, (end - 1) // BLOCK
        for _attempt in range(100):
            short = False
            for fd, where, a, b in self._plan(offset, end):
                view = buf[a - offset:b - offset]
                if fd == -1:
                    self.inner.pread(view, a)
                elif fd == -2:
                    view[:] = bytes(len(view))
                elif os.preadv(fd, [view], where) < len(view):
                    short = True  # the unit in progress was rolled back under us: look again
            if short:
                with self.lock:
                    self._refresh()
                continue
            try:  # the common case, one stat: the unit in progress did not grow
                st = os.stat(self.live_path)
                live = self.live
                if live is not None and st.st_ino == live.ino and st.st_size == live.pos:
                    return
            except FileNotFoundError:
                if self.live is None:
                    return
            with self.lock:
                new = self._refresh()
            if not any(f <= b1 and b0 <= last for f, last in new):
                return
        raise OSError(f"replica {self.name}: cannot read a stable view (changing too fast, or a unit log "
                      "is shorter than its index)")

    def _plan(self, offset: int, end: int) -> list[tuple[int, int, int, int]]:
        """(fd | -1 replica | -2 zeroes, file position, start, stop) pieces of a read."""
        idx = self.index
        blk = offset // BLOCK
        c0, c1 = blk >> CHUNK_SHIFT, ((end - 1) // BLOCK) >> CHUNK_SHIFT
        if c0 == c1 and c0 not in idx.seg:  # nothing saved anywhere near: the replica
            return [(-1, 0, offset, end)]
        if end <= (blk + 1) * BLOCK:  # one block (4 KiB random reads)
            seg, where = idx.get(blk)
            if seg == 0:
                return [(-1, 0, offset, end)]
            if where == HOLE_POS:
                return [(-2, 0, offset, end)]
            return [(self.segs[seg].fd, where + offset - blk * BLOCK, offset, end)]
        out: list[tuple[int, int, int, int]] = []
        get = idx.get
        pos = offset
        while pos < end:
            blk = pos // BLOCK
            seg, where = get(blk)
            stop = min(end, (blk + 1) * BLOCK)
            while stop < end:  # extend over blocks read from the same place
                s2, w2 = get(stop // BLOCK)
                if s2 != seg or (seg and (w2 == HOLE_POS) != (where == HOLE_POS)) or \
                        (seg and where != HOLE_POS and w2 != where + (stop // BLOCK - blk) * BLOCK):
                    break
                stop = min(end, stop + BLOCK)
            if seg == 0:
                out.append((-1, 0, pos, stop))
            elif where == HOLE_POS:
                out.append((-2, 0, pos, stop))
            else:
                out.append((self.segs[seg].fd, where + (pos - blk * BLOCK), pos, stop))
            pos = stop
        return out

    def extents(self, length: int, offset: int) -> list[tuple[int, int]]:
        return [(length, 0)]  # a block may be a hole now and data then: say "data"

    def changed_blocks(self) -> int:
        """Blocks whose content differs (possibly) from the replica's now."""
        return self.index.blocks

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.inner.close()
        finally:
            for s in self.segs[1:]:
                try:
                    os.close(s.fd)
                except OSError:
                    pass
            self.segs = self.segs[:1]
            self.pin.release()
