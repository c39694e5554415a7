"""The async mirror's source buffer: an append-only, checksummed journal of host writes.

Every write, zero and trim of an async-mirrored volume is appended here (the payload copied into the
file) before the host is acknowledged, so the host never waits for the WAN; a shipper reads the
records back in order and sends them to the replica; once the replica acknowledges a checkpoint, the
records up to it are released. Sequence numbers (a checkpoint's id is its seq) are persistent: the
replica's Welcome names the last checkpoint it applied and the shipper resumes after it.

On disk (a directory next to the volume, e.g. ``DATA/NAME.mirror-journal/``):

- ``<first_seq:020d>.seg``: segment files of records, rolled over at ``segment_bytes``. A record is a
  48-byte header (magic, kind, flags, seq, offset, length, time_ns, checksum) and, for WRITE, the
  payload. The checksum is xxh3_64 over the payload followed by the first 40 header bytes: the
  payload part is hashed before the lock is taken, so a 1 MiB append does not hash under it.
- ``state``: two checksummed slots written alternately (as ``mirror/dirty.py`` does) holding
  ``(next_seq, released_upto)``, so seqs survive a restart even when every record was released.

Why the state needs no fsync on ``release`` but does on ``reset``: release never deletes the segment
holding the newest record, so a stale state cannot lower ``next_seq``; a stale release point only
resurrects records the replica already committed (its Welcome releases them again). ``reset`` deletes
every segment, so the state is then the only carrier of ``next_seq``, and its release point must be
durable before the files go: records resurrected after a reset would be shipped after the
catch-up that replaced them, putting old data over new on the replica.

The state's ``next_seq`` is the *synced* end of the journal, not the appended one: after a power loss
the tail past the last fdatasync may vanish, and a state that names seqs the files no longer hold
would be indistinguishable from lost durable records (which is damage).

In memory, per segment, an index of compact arrays (position, offset, length, time_ns as 8-byte
words, kind and flags as bytes): 34 bytes a record (plus array slack), 34 MB for a million records;
a record's seq is its segment's first seq plus its index, so it is not stored. Appends hold one lock
while they write (seq order = file order without a second bookkeeping step); a pwrite of 4 KiB into
the page cache is a few µs, so this is cheap, but it does serialise large appends from several threads.
"""
from __future__ import annotations

import bisect
import contextlib
import os
import re
import struct
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Self

import xxhash

WRITE, ZERO, CHECKPOINT = 1, 2, 3
FUA, TRIM = 1, 2
F_FUA, F_TRIM = FUA, TRIM  # the wire codec's names for the same bits
_KINDS = (WRITE, ZERO, CHECKPOINT)
MAGIC = b"VDJR"
_HEAD = struct.Struct("<4sBBHQQQQ")  # magic, kind, flags, reserved, seq, offset, length, time_ns
HEADER_SIZE = _HEAD.size + 8  # + checksum (xxh3_64 digest, big-endian bytes)
_STATE_SLOT = struct.Struct(">8sQQQ")  # magic, slot seq, next_seq, released_upto
_STATE_MAGIC = b"VDJSTAT1"
_STATE_SLOT_SIZE = 512  # one sector each, so a torn write of one slot leaves the other intact
_SEG_NAME = re.compile(r"^(\d{20})\.seg$")
_STALE_TMP = re.compile(r"^state\.\d+\.tmp$")
_READ_CHUNK = 8 << 20  # the open scan reads segments in windows of this size
_IOV_MAX = 1024


class JournalCorrupt(Exception):
    """A retained record failed its checksum when read back (names the file and offset)."""


class JournalGap(KeyError):
    """The requested seq is older than anything retained (it was released or dropped)."""


class JournalClosed(RuntimeError):
    """The journal was used after ``close``: a bug in the caller."""


class Record(NamedTuple):
    seq: int
    kind: int
    flags: int
    offset: int
    length: int
    time_ns: int
    data: bytes | memoryview | None


class _Segment:
    """One segment file and its index. ``users`` counts readers/syncers that hold its fd outside the
    lock; a segment released meanwhile is unlinked at once and its fd closed by the last user."""

    __slots__ = ("doomed", "end", "fd", "first", "flags", "kind", "length", "off", "path", "pos", "time", "users")

    def __init__(self, first: int, path: Path, fd: int) -> None:
        self.first, self.path, self.fd = first, path, fd
        self.end = 0  # bytes written (pushed) to the file
        self.pos, self.off, self.length, self.time = array("Q"), array("Q"), array("Q"), array("q")
        self.kind, self.flags = array("B"), array("B")
        self.users = 0
        self.doomed = False

    @property
    def count(self) -> int:
        return len(self.pos)

    @property
    def stop(self) -> int:
        """One past the seq of its last indexed record."""
        return self.first + len(self.pos)

    def add(self, pos: int, kind: int, flags: int, offset: int, length: int, t: int) -> None:
        self.pos.append(pos)
        self.off.append(offset)
        self.length.append(length)
        self.time.append(t)
        self.kind.append(kind)
        self.flags.append(flags)

    def truncate(self, n: int) -> None:
        for a in (self.pos, self.off, self.length, self.time, self.kind, self.flags):
            del a[n:]

    def size_of(self, i: int) -> int:
        return HEADER_SIZE + (self.length[i] if self.kind[i] == WRITE else 0)

    def end_of(self, i: int) -> int:
        """File position just past record i."""
        return self.pos[i] + self.size_of(i)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwritev_all(fd: int, bufs: list, pos: int) -> None:
    """pwritev every buffer at ``pos``, however short the kernel's writes are."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        batch = views[:_IOV_MAX]
        n = os.pwritev(fd, batch, pos)
        pos += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _checksum(prefix: bytes, payload: bytes | memoryview | None) -> bytes:
    h = xxhash.xxh3_64(payload) if payload is not None else xxhash.xxh3_64()
    h.update(prefix)
    return h.digest()


class _Window:
    """Sequential reads of a file through a large buffer (the open scan): one pread per window,
    not two per record."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.base, self.buf = 0, b""

    def get(self, pos: int, n: int) -> memoryview:
        if pos < self.base or pos + n > self.base + len(self.buf):
            self.base = pos
            self.buf = os.pread(self.fd, max(n, _READ_CHUNK), pos)
        rel = pos - self.base
        return memoryview(self.buf)[rel:rel + n]


def _valid_at(win: _Window, pos: int, seqs: range) -> tuple | None:
    """(kind, flags, seq, offset, length, time_ns) of a valid record at ``pos`` whose seq is in
    ``seqs`` (checksum verified), or None."""
    if win.size - pos < HEADER_SIZE:
        return None
    head = win.get(pos, HEADER_SIZE)
    magic, kind, flags, _r, seq, off, length, t = _HEAD.unpack_from(head)
    if magic != MAGIC or kind not in _KINDS or seq not in seqs:
        return None
    plen = length if kind == WRITE else 0
    if pos + HEADER_SIZE + plen > win.size:
        return None
    stored = bytes(head[_HEAD.size:])
    prefix = bytes(head[:_HEAD.size])
    payload = win.get(pos + HEADER_SIZE, plen) if plen else None
    if _checksum(prefix, payload) != stored:
        return None
    return kind, flags, seq, off, length, t


class Journal:
    """The async mirror's source buffer (see the module docstring). Thread-safe."""

    def __init__(self, path: Path, segment_bytes: int) -> None:
        self.path, self.segment_bytes = path, segment_bytes
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one fdatasync round at a time: a sync returns only when durable
        self._segments: list[_Segment] = []
        self._firsts: list[int] = []  # segment first seqs, for bisect
        self._next = 1  # seqs start at 1: checkpoint id 0 means "none" on the wire
        self._first = 1
        self._written = 1  # records < this are in the files (pushed)
        self._synced = 1  # records < this were in the files when the last fdatasync began
        self._tail = 0  # reserved end of the active segment (written end + pending)
        self._bytes = 0
        self._count = 0
        self._pending: list = []
        self._pending_first = 0
        self._pending_bytes = 0
        self._holder = 0
        self._hold_depth = 0
        self._hold_error: OSError | None = None
        self._unsynced: set[_Segment] = set()
        self._dir_dirty = False  # a segment was created since the directory was last fsync'd
        self._state_fd = -1
        self._state_seq = 0
        self._state_next = 1
        self._released = 0
        self._closed = False
        self.appended_bytes_total = 0
        self.syncs = 0
        self.recovery: dict = {"records": 0, "torn_bytes": 0, "damaged": False, "dropped_ranges": []}

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, segment_bytes: int = 64 << 20) -> Journal:
        """Open (creating if missing) and validate the journal at ``path``; see ``recovery``."""
        path = Path(path)
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_dir(path.parent)
        j = cls(path, segment_bytes)
        j._open_state()
        j._recover()
        return j

    def _open_state(self) -> None:
        p = self.path / "state"
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._state_fd = fd
        raw = os.pread(fd, 2 * _STATE_SLOT_SIZE, 0)
        best: tuple[int, int, int] | None = None
        n = _STATE_SLOT.size
        for base in (0, _STATE_SLOT_SIZE):
            body, check = raw[base:base + n], raw[base + n:base + n + 8]
            if len(check) < 8 or xxhash.xxh3_64_digest(body) != check:
                continue
            magic, seq, next_seq, released = _STATE_SLOT.unpack(body)
            if magic == _STATE_MAGIC and (best is None or seq > best[0]):
                best = (seq, next_seq, released)
        if best is not None:
            self._state_seq, self._state_next, self._released = best
        if len(raw) < 2 * _STATE_SLOT_SIZE:
            # Sized once, so later updates overwrite in place (no allocation, no metadata to commit).
            os.pwrite(fd, bytes(2 * _STATE_SLOT_SIZE - len(raw)), len(raw))
            os.fsync(fd)
            _fsync_dir(self.path)

    def _write_state(self, durable: bool) -> None:
        self._state_next = max(self._state_next, self._synced, self._released + 1)
        if durable:
            self._state_next = max(self._state_next, self._next)
        self._state_seq += 1
        body = _STATE_SLOT.pack(_STATE_MAGIC, self._state_seq, self._state_next, self._released)
        os.pwrite(self._state_fd, body + xxhash.xxh3_64_digest(body), (self._state_seq % 2) * _STATE_SLOT_SIZE)
        if durable:
            os.fdatasync(self._state_fd)

    def _recover(self) -> None:
        rec = self.recovery
        listing = os.listdir(self.path)
        names = sorted((int(m.group(1)), self.path / name) for name in listing if (m := _SEG_NAME.match(name)))
        for name in listing:  # ours and stale: the temp files of an earlier state format
            if _STALE_TMP.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / name)
        released = self._released
        prev_stop: int | None = None
        damage_at: int | None = None  # the seq from which records were dropped
        changed_dir = False
        for k, (first, p) in enumerate(names):
            last = k == len(names) - 1
            if damage_at is not None:
                os.unlink(p)
                changed_dir = True
                continue
            if prev_stop is not None and (first < prev_stop or (first != prev_stop and prev_stop - 1 > released)):
                damage_at = prev_stop  # a seq gap (or overlap) between segments
                os.unlink(p)
                changed_dir = True
                continue
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
            seg = _Segment(first, p, fd)
            size = os.fstat(fd).st_size
            win = _Window(fd, size)
            pos, seq = 0, first
            while pos < size:
                v = _valid_at(win, pos, range(seq, seq + 1))
                if v is None:
                    break
                kind, flags, _s, off, length, t = v
                seg.add(pos, kind, flags, off, length, t)
                pos += HEADER_SIZE + (length if kind == WRITE else 0)
                seq += 1
            if pos < size:
                if last and not self._valid_follows(win, pos + 1, seq):
                    rec["torn_bytes"] += size - pos
                    rec["dropped_ranges"] += self._parseable_ranges(win, pos)
                else:
                    damage_at = seq
                    rec["damaged"] = True
                os.ftruncate(fd, pos)
                os.fsync(fd)
            seg.end = pos
            self._add_segment(seg)
            prev_stop = seg.stop
        if damage_at is not None:
            rec["damaged"] = True
        stop = prev_stop if prev_stop is not None else max(self._state_next, released + 1)
        self._next = max(stop, self._state_next, released + 1)
        lost_durable = self._state_next > stop and self._state_next - 1 > max(released, stop - 1)
        if lost_durable:
            rec["damaged"] = True
        if self._next > stop:
            # The files end before seqs the state says were used: the retained records cannot be
            # followed by new ones without a gap, so they are dropped (their ranges reported).
            for seg in self._segments:
                for i in range(max(0, released + 1 - seg.first), seg.count):
                    if seg.kind[i] != CHECKPOINT:
                        rec["dropped_ranges"].append((seg.off[i], seg.length[i]))
            released = self._next - 1
        self._released = released
        self._first = max(released + 1, self._segments[0].first if self._segments else self._next)
        self._first = min(self._first, self._next)
        self._written = self._synced = self._next
        # Segments holding only released records go, except the newest (it carries next_seq).
        while len(self._segments) > 1 and self._segments[0].stop <= self._first:
            self._drop_segment(self._segments.pop(0))
            self._firsts.pop(0)
            changed_dir = True
        for seg in self._segments:
            lo = max(0, self._first - seg.first)
            if lo < seg.count:
                self._bytes += seg.end - seg.pos[lo]
                self._count += seg.count - lo
        if self._segments:
            self._tail = self._segments[-1].end
        if changed_dir:
            _fsync_dir(self.path)
        rec["records"] = self._count
        if self._next > stop or rec["damaged"]:
            self._write_state(durable=True)

    @staticmethod
    def _valid_follows(win: _Window, start: int, after_seq: int) -> bool:
        """Whether a valid record with a seq >= ``after_seq`` lies anywhere past ``start``: then the
        bad record before it is damage, not a torn tail (a crash mid-append leaves nothing valid after).
        Only run on a bad record; candidates are found by their magic and checked in full."""
        scan, check = _Window(win.fd, win.size), _Window(win.fd, win.size)
        # Every record is at least a header: no valid seq lies beyond this.
        plausible = range(after_seq, after_seq + win.size // HEADER_SIZE + 1)
        pos = start
        while pos < win.size:
            n = min(_READ_CHUNK, win.size - pos)
            chunk = bytes(scan.get(pos, n))
            i = chunk.find(MAGIC)
            while i >= 0:
                if _valid_at(check, pos + i, plausible) is not None:
                    return True
                i = chunk.find(MAGIC, i + 1)
            if pos + n >= win.size:
                return False
            pos += n - len(MAGIC) + 1
        return False

    @staticmethod
    def _parseable_ranges(win: _Window, pos: int) -> list[tuple[int, int]]:
        """(offset, length) of a torn record whose header survived (best effort, for the caller's dirty map)."""
        if win.size - pos < HEADER_SIZE:
            return []
        magic, kind, _f, _r, _s, off, length, _t = _HEAD.unpack_from(win.get(pos, HEADER_SIZE))
        return [(off, length)] if magic == MAGIC and kind in (WRITE, ZERO) else []

    def _add_segment(self, seg: _Segment) -> None:
        self._segments.append(seg)
        self._firsts.append(seg.first)

    def _drop_segment(self, seg: _Segment) -> None:
        """Unlink now; close the fd once no reader or syncer holds it (the caller fsyncs the dir)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(seg.path)
        seg.doomed = True
        self._unsynced.discard(seg)
        if seg.users == 0:
            os.close(seg.fd)
            seg.fd = -1

    # -- appending ---------------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def first_seq(self) -> int:
        return self._first

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def count(self) -> int:
        return self._count

    @property
    def synced_seq(self) -> int:
        """Records below this seq are durable (an fdatasync covering them has completed)."""
        return self._synced

    def append_write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> int:
        """Append a WRITE record (the payload is copied into the file); its seq."""
        return self._append(WRITE, FUA if fua else 0, offset, len(data), data)

    def append_zero(self, offset: int, length: int, trim: bool = False) -> int:
        return self._append(ZERO, TRIM if trim else 0, offset, length, None)

    def append_checkpoint(self) -> int:
        """Append a checkpoint; its seq is its id."""
        return self._append(CHECKPOINT, 0, 0, 0, None)

    def _append(self, kind: int, flags: int, offset: int, length: int, data: bytes | memoryview | None) -> int:
        h = xxhash.xxh3_64(data) if data is not None else xxhash.xxh3_64()  # outside the lock
        size = HEADER_SIZE + (length if data is not None else 0)
        me = threading.get_ident()
        with self._lock:
            self._check_open()
            seq = self._next
            segs = self._segments
            seg = segs[-1] if segs else None
            if seg is None or seg.stop != seq or (seg.count and self._tail + size > self.segment_bytes):
                self._flush_locked()  # a batch never spans segments
                seg = self._new_segment_locked(seq)
            t = time.time_ns()
            prefix = _HEAD.pack(MAGIC, kind, flags, 0, seq, offset, length, t)
            h.update(prefix)
            if not self._pending:
                self._pending_first = seq
            self._pending.append(prefix + h.digest())
            if data is not None:
                self._pending.append(data)
            seg.add(self._tail, kind, flags, offset, length, t)
            self._tail += size
            self._pending_bytes += size
            self._next = seq + 1
            self._bytes += size
            self._count += 1
            if self._holder != me:
                self._flush_locked()  # not batching: written at once (with any held records before it)
        return seq

    def _check_open(self) -> None:
        if self._closed:
            raise JournalClosed(f"journal {self.path} is closed")

    def _new_segment_locked(self, first: int) -> _Segment:
        p = self.path / f"{first:020d}.seg"
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        # The directory entry is made durable by the next sync(), before any record in this file
        # is reported durable. An fsync of the directory here (under the lock, once per segment)
        # made ext4 (data=ordered) write back every dirty journal page first: 1 MiB writes at QD8
        # ran at disk speed in bursts, 0.2x of the unmirrored volume. Records not yet synced may be
        # lost in a crash anyway; recovery treats a missing later segment as the end (or a gap).
        self._dir_dirty = True
        seg = _Segment(first, p, fd)
        self._add_segment(seg)
        self._tail = 0
        # The previous segment, if wholly released, is no longer needed for next_seq.
        if len(self._segments) > 1 and self._segments[-2].stop <= self._first:
            self._drop_segment(self._segments.pop(-2))
            self._firsts.pop(-2)
        return seg

    def _flush_locked(self) -> None:
        """Write the pending records (all in the active segment) with one pwritev."""
        if not self._pending:
            return
        seg = self._segments[-1]
        bufs, self._pending = self._pending, []
        n, self._pending_bytes = self._pending_bytes, 0
        try:
            _pwritev_all(seg.fd, bufs, seg.end)
        except OSError as e:
            # Nothing of this write counts: the seqs are given out again, the file is cut back.
            first = self._pending_first
            seg.truncate(first - seg.first)
            self._count -= self._next - first
            self._bytes -= n
            self._next = first
            self._tail = seg.end
            with contextlib.suppress(OSError):
                os.ftruncate(seg.fd, seg.end)
            if self._holder and self._holder != threading.get_ident():
                self._hold_error = e  # the holder's push reports that its records were lost
            raise
        seg.end = self._tail
        self._written = self._next
        self.appended_bytes_total += n
        self._unsynced.add(seg)

    def hold(self) -> None:
        """Start a group commit: this thread's appends are buffered (no copy) until ``push``."""
        me = threading.get_ident()
        with self._lock:
            if self._holder != me:
                self._flush_locked()  # another thread's batch, if any, ends here
                self._holder, self._hold_depth, self._hold_error = me, 0, None
            self._hold_depth += 1

    def push(self) -> None:
        """Write this thread's batch (one pwritev); raises if it could not be written."""
        me = threading.get_ident()
        with self._lock:
            if self._holder != me:
                return
            self._hold_depth -= 1
            if self._hold_depth:
                return
            try:
                self._flush_locked()
            finally:
                self._holder = 0
            err, self._hold_error = self._hold_error, None
        if err is not None:
            raise err

    def sync(self) -> None:
        """fdatasync every segment written since the last sync; returns once they are durable."""
        with self._sync_lock:
            with self._lock:
                self._check_open()
                self._flush_locked()  # a held batch too: a FUA write of another thread may follow it
                segs = list(self._unsynced)
                self._unsynced.clear()
                upto = self._written
                for s in segs:
                    s.users += 1
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            try:
                for s in segs:
                    os.fdatasync(s.fd)
                if dir_dirty:
                    _fsync_dir(self.path)  # the new segments' entries (see _new_segment_locked)
            except OSError:
                with self._lock:
                    self._unsynced.update(s for s in segs if not s.doomed)
                    self._dir_dirty = self._dir_dirty or dir_dirty
                raise
            finally:
                self._unuse(segs)
            self._synced = max(self._synced, upto)
            self.syncs += 1

    def _unuse(self, segs: list[_Segment]) -> None:
        with self._lock:
            for s in segs:
                s.users -= 1
                if s.doomed and s.users == 0 and s.fd >= 0:
                    os.close(s.fd)
                    s.fd = -1

    # -- reading -----------------------------------------------------------------------------------
    def _locate(self, seq: int) -> tuple[_Segment, int]:
        k = bisect.bisect_right(self._firsts, seq) - 1
        seg = self._segments[k]
        return seg, seq - seg.first

    def read(self, from_seq: int, max_bytes: int = 4 << 20) -> list[Record]:
        """Written records with seq >= from_seq, in order, about ``max_bytes`` of them (at least
        one if any exists); checksums verified. JournalGap if from_seq was released."""
        spans: list[tuple[_Segment, int, int]] = []  # (segment, first index, end index)
        with self._lock:
            self._check_open()
            if from_seq < self._first:
                raise JournalGap(from_seq)
            seq, stop, budget = from_seq, self._written, max_bytes
            while seq < stop:
                seg, i = self._locate(seq)
                j_max = min(seg.count, stop - seg.first)
                limit = seg.pos[i] + max(budget, seg.size_of(i) if not spans else 0)
                # Records starting within the budget; the last of them may end past it.
                j = bisect.bisect_right(seg.pos, limit, i, j_max)
                while j > i and seg.end_of(j - 1) > limit:
                    j -= 1
                if j == i:
                    break
                spans.append((seg, i, j))
                seg.users += 1
                budget -= seg.end_of(j - 1) - seg.pos[i]
                seq = seg.first + j
                if j < j_max:
                    break
        out: list[Record] = []
        try:
            for seg, i, j in spans:
                out.extend(self._read_span(seg, i, j))
        finally:
            self._unuse([s for s, _i, _j in spans])
        return out

    def _read_span(self, seg: _Segment, i: int, j: int) -> list[Record]:
        base = seg.pos[i]
        buf = os.pread(seg.fd, seg.end_of(j - 1) - base, base)
        view = memoryview(buf)
        out = []
        for k in range(i, j):
            rel = seg.pos[k] - base
            seq = seg.first + k
            where = f"{seg.path} at offset {seg.pos[k]} (seq {seq})"
            if len(buf) < rel + seg.size_of(k):
                raise JournalCorrupt(f"journal record cut short: {where}")
            magic, kind, flags, _r, s, off, length, t = _HEAD.unpack_from(view, rel)
            plen = length if kind == WRITE else 0
            payload = view[rel + HEADER_SIZE:rel + HEADER_SIZE + plen] if kind == WRITE else None
            stored = view[rel + _HEAD.size:rel + HEADER_SIZE]
            if (magic, kind, s, off, length) != (MAGIC, seg.kind[k], seq, seg.off[k], seg.length[k]) \
                    or _checksum(bytes(view[rel:rel + _HEAD.size]), payload) != stored:
                raise JournalCorrupt(f"journal record fails its checksum: {where}")
            out.append(Record(seq, kind, flags, off, length, t, payload))
        return out

    def find(self, seq: int) -> Record | None:
        """The written record with this seq, if retained."""
        with self._lock:
            if not self._first <= seq < self._written:
                return None
        try:
            recs = self.read(seq, 0)
        except JournalGap:
            return None
        return recs[0] if recs and recs[0].seq == seq else None

    def ranges(self, from_seq: int) -> list[tuple[int, int]]:
        """(offset, length) of every retained WRITE/ZERO record >= from_seq (from the index)."""
        out: list[tuple[int, int]] = []
        with self._lock:
            seq = max(from_seq, self._first)
            while seq < self._next:
                seg, i = self._locate(seq)
                kind, off, length = seg.kind, seg.off, seg.length
                out.extend((off[k], length[k]) for k in range(i, seg.count) if kind[k] != CHECKPOINT and length[k])
                seq = seg.stop
        return out

    def oldest_time_ns(self, from_seq: int) -> int | None:
        """time_ns of the first retained record >= from_seq (lag of the oldest unshipped write)."""
        with self._lock:
            seq = max(from_seq, self._first)
            if seq >= self._next:
                return None
            seg, i = self._locate(seq)
            return seg.time[i]

    # -- releasing ---------------------------------------------------------------------------------
    def release(self, upto_seq: int) -> None:
        """Records <= upto_seq are no longer needed (the replica committed a checkpoint after them)."""
        changed_dir = False
        with self._lock:
            self._check_open()
            if upto_seq >= self._written:
                raise ValueError(f"release({upto_seq}): only records below {self._written} are written")
            if upto_seq < self._first:
                return
            new_first = upto_seq + 1
            while self._first < new_first:
                seg, i = self._locate(self._first)
                j = min(seg.count, new_first - seg.first)
                self._bytes -= seg.end_of(j - 1) - seg.pos[i]
                self._count -= j - i
                self._first = seg.first + j
            # Whole segments released go; the newest stays (it carries next_seq across a restart).
            while len(self._segments) > 1 and self._segments[0].stop <= self._first:
                self._drop_segment(self._segments.pop(0))
                self._firsts.pop(0)
                changed_dir = True
            self._released = upto_seq
            self._write_state(durable=False)
        if changed_dir:
            _fsync_dir(self.path)

    def reset(self, mark: Callable[[int, int], object] | None = None, persist: Callable[[], object] | None = None) -> None:
        """Drop every record; next_seq is kept. ``mark(offset, length)`` is called for each dropped
        WRITE/ZERO record, then ``persist()`` (make the marks durable), both under the journal's lock,
        so a record appended concurrently is either marked and dropped or kept, never lost (callers
        append without holding a lock of their own)."""
        with self._lock:
            self._check_open()
            if mark is not None:
                seq = self._first
                while seq < self._next:
                    seg, i = self._locate(seq)
                    kind, off, length = seg.kind, seg.off, seg.length
                    for k in range(i, seg.count):
                        if kind[k] != CHECKPOINT and length[k]:
                            mark(off[k], length[k])
                    seq = seg.stop
            if persist is not None:
                persist()
            self._pending, self._pending_bytes = [], 0
            self._released = self._next - 1
            self._write_state(durable=True)  # before the files go: see the module docstring
            for seg in self._segments:
                self._drop_segment(seg)
            self._segments, self._firsts = [], []
            self._first = self._written = self._next
            self._synced = max(self._synced, self._next)
            self._bytes = self._count = self._tail = 0
        _fsync_dir(self.path)

    # -- status ------------------------------------------------------------------------------------
    def statistics(self) -> dict:
        with self._lock:
            return {"segments": len(self._segments), "bytes": self._bytes, "count": self._count,
                    "first_seq": self._first, "next_seq": self._next, "synced_seq": self._synced,
                    "appended_bytes_total": self.appended_bytes_total, "syncs": self.syncs}

    def close(self) -> None:
        """Write any held records and close the files (no sync: call ``sync`` first if needed)."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush_locked()
            finally:
                self._closed = True
                for seg in self._segments:
                    seg.doomed = True  # closes now, or when the last reader is done
                    if seg.users == 0 and seg.fd >= 0:
                        os.close(seg.fd)
                        seg.fd = -1
                os.close(self._state_fd)
                self._state_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
