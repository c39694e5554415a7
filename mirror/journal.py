"""The async mirror's source buffer: append-only, checksummed segment files next to the volume.

Every host write, zero and trim of an async-mirrored volume is appended here (its payload copied
into the file) before the host is acknowledged; the shipper (asyncrep.py) reads the records back in
order; records are released once the replica has committed a checkpoint after them. A checkpoint is
a record of its own; its id is its sequence number.

Layout: ``DIR/<first seq, 20 digits>.seg`` and ``DIR/state``. A record is a 48-byte header
``>IBBHQQQQQ`` (magic, kind, flags, 0, seq, offset, length, time_ns, checksum) and, for a WRITE,
``length`` payload bytes; ``checksum = xxh3_64(payload, seed=xxh3_64(header[:40]))``. Sequence
numbers are strictly consecutive and persistent: ``state`` keeps the next one (and the release
point) even when every record was released.

Crash safety: on open every segment is read and checked. A short or bad record at the end of the
last segment is a torn append (kill -9 or power loss mid-write): it is cut. A bad record anywhere
else, or a gap in the sequence, is damage: everything from it on is dropped and ``recovery
["damaged"]`` says so (the mirror then compares the whole volume). Writes the host was acknowledged
for but whose records were torn away are in the activity log, which the mirror sends again.

The index kept in memory is one small tuple per retained record (about 100 bytes in CPython):
a 10 GiB buffer of 4 KiB writes is 2.6 M records, ~260 MiB; of 1 MiB writes, 10 k records.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

import xxhash

WRITE, ZERO, CHECKPOINT = 1, 2, 3
F_FUA, F_TRIM = 1, 2
MAGIC = 0x56444A31  # "VDJ1"
HEADER = struct.Struct(">IBBHQQQQQ")
HEADER_SIZE = HEADER.size  # 48
_PREFIX = struct.Struct(">IBBHQQQQ")
IOV_MAX = 1024
_xxh = xxhash.xxh3_64_intdigest


class JournalCorrupt(Exception):
    """A retained record failed its checksum on read (the disk changed it under us)."""


class JournalGap(KeyError):
    """Records before the first retained one were asked for."""


class Record(NamedTuple):
    seq: int
    kind: int
    flags: int
    offset: int
    length: int
    time_ns: int
    data: bytes | None


class _Entry(NamedTuple):
    seq: int
    kind: int
    flags: int
    offset: int
    length: int
    time_ns: int
    seg: int  # first seq of its segment (the file name)
    pos: int  # header position in the file

    @property
    def size(self) -> int:
        return HEADER_SIZE + (self.length if self.kind == WRITE else 0)


def _header(kind: int, flags: int, seq: int, offset: int, length: int, time_ns: int,
            payload: bytes | memoryview) -> bytes:
    prefix = _PREFIX.pack(MAGIC, kind, flags, 0, seq, offset, length, time_ns)
    return prefix + _xxh(payload, _xxh(prefix)).to_bytes(8, "big")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Thread-safe. ``hold``/``push`` batch appends of one caller into one write (group commit)."""

    def __init__(self, path: Path, segment_bytes: int) -> None:
        self.path, self.segment_bytes = path, segment_bytes
        self._lock = threading.Lock()
        self._idx: deque[_Entry] = deque()
        self._fds: dict[int, int] = {}  # segment first seq -> fd
        self._sizes: dict[int, int] = {}  # segment first seq -> bytes written
        self._active = -1
        self._unsynced: set[int] = set()
        self._held: list[tuple[_Entry, bytes, bytes | memoryview | None]] | None = None
        self.next_seq = 1
        self._released = 0
        self.bytes = 0
        self.appended_bytes = 0
        self.syncs = 0
        self.recovery: dict[str, object] = {"records": 0, "torn_bytes": 0, "damaged": False}

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, segment_bytes: int = 64 << 20) -> Journal:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        j = cls(path, segment_bytes)
        j._load_state()
        j._scan()
        return j

    def _load_state(self) -> None:
        try:
            st = json.loads((self.path / "state").read_text())
            self.next_seq = max(1, int(st.get("next_seq", 1)))
            self._released = max(0, int(st.get("released", 0)))
        except (OSError, ValueError, TypeError, AttributeError):
            pass

    def _scan(self) -> None:
        segs = sorted(int(p.name[:-4]) for p in self.path.glob("*.seg") if p.name[:-4].isdigit())
        for p in self.path.glob("*.tmp"):
            p.unlink(missing_ok=True)
        expect: int | None = None
        damaged = False
        for i, first in enumerate(segs):
            file = self.path / f"{first:020d}.seg"
            if damaged:
                file.unlink(missing_ok=True)
                continue
            raw = file.read_bytes()
            pos, seq, last = 0, first, i == len(segs) - 1
            if expect is not None and first != expect:
                damaged = True  # a gap between segments
                file.unlink(missing_ok=True)
                continue
            while pos < len(raw):
                ok = len(raw) - pos >= HEADER_SIZE
                if ok:
                    magic, kind, flags, _r, rseq, off, length, t, check = HEADER.unpack_from(raw, pos)
                    end = pos + HEADER_SIZE + (length if kind == WRITE else 0)
                    ok = (magic == MAGIC and kind in (WRITE, ZERO, CHECKPOINT) and rseq == seq and end <= len(raw)
                          and _xxh(raw[pos + HEADER_SIZE:end] if kind == WRITE else b"",
                                   _xxh(raw[pos:pos + HEADER_SIZE - 8])) == check)
                if not ok:
                    if last:
                        self.recovery["torn_bytes"] = len(raw) - pos
                    else:
                        damaged = True
                    os.truncate(file, pos)
                    break
                if seq > self._released:
                    e = _Entry(seq, kind, flags, off, length, t, first, pos)
                    self._idx.append(e)
                    self.bytes += e.size
                pos = end
                seq += 1
            expect = seq
            self._sizes[first] = min(pos, len(raw))
            self.next_seq = max(self.next_seq, seq)
        self.recovery["records"] = len(self._idx)
        self.recovery["damaged"] = damaged
        if self._idx and self._idx[0].seq != self._released + 1 and self._released:
            self.recovery["damaged"] = True  # records the state says are retained are missing
        for first in list(self._sizes):
            if not any(e.seg == first for e in self._idx) and first != max(self._sizes):
                self._delete(first)
        if self._sizes:
            self._active = max(self._sizes)

    # -- appending ---------------------------------------------------------------------------------
    def _fd(self, first: int) -> int:
        fd = self._fds.get(first)
        if fd is None:
            fd = self._fds[first] = os.open(self.path / f"{first:020d}.seg", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return fd

    def _place(self, seq: int, size: int) -> tuple[int, int]:
        """(segment, position) for record ``seq`` of ``size`` bytes; a new segment when this one is full."""
        act = self._active
        if act < 0 or (self._sizes[act] and self._sizes[act] + size > self.segment_bytes):
            act = self._active = seq
            self._sizes[act] = 0
            self._fd(act)
            _fsync_dir(self.path)
        pos = self._sizes[act]
        self._sizes[act] = pos + size
        return act, pos

    def _append(self, kind: int, flags: int, offset: int, length: int, payload: bytes | memoryview | None) -> int:
        with self._lock:
            seq = self.next_seq
            self.next_seq += 1
            t = time.time_ns()
            hdr = _header(kind, flags, seq, offset, length, t, payload if payload is not None else b"")
            size = HEADER_SIZE + (length if kind == WRITE else 0)
            seg, pos = self._place(seq, size)
            e = _Entry(seq, kind, flags, offset, length, t, seg, pos)
            if self._held is not None:
                self._held.append((e, hdr, payload))
                return seq
            bufs = [hdr] if payload is None else [hdr, payload]
            self._write(seg, pos, bufs)
            self._idx.append(e)
            self.bytes += size
            self.appended_bytes += size
            return seq

    def _write(self, seg: int, pos: int, bufs: list[bytes | memoryview]) -> None:
        fd = self._fd(seg)
        total = sum(len(b) for b in bufs)
        done = 0
        while done < total:
            n = os.pwritev(fd, bufs, pos + done)
            done += n
            if done < total:  # a short write: go on from where it stopped
                rest, skip = [], n
                for b in bufs:
                    if skip >= len(b):
                        skip -= len(b)
                        continue
                    rest.append(memoryview(b)[skip:])
                    skip = 0
                bufs = rest
        self._unsynced.add(seg)

    def append_write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> int:
        return self._append(WRITE, F_FUA if fua else 0, offset, len(data), data)

    def append_zero(self, offset: int, length: int, trim: bool = False) -> int:
        return self._append(ZERO, F_TRIM if trim else 0, offset, length, None)

    def append_checkpoint(self) -> int:
        return self._append(CHECKPOINT, 0, 0, 0, None)

    def hold(self) -> None:
        with self._lock:
            if self._held is None:
                self._held = []

    def push(self) -> None:
        """Write what was appended since ``hold`` (payload views must be valid until here)."""
        with self._lock:
            held, self._held = self._held, None
            if not held:
                return
            run: list[bytes | memoryview] = []
            start = (held[0][0].seg, held[0][0].pos)
            nxt = start[1]
            for e, hdr, payload in held:
                if e.seg != start[0] or e.pos != nxt or len(run) >= IOV_MAX - 2:
                    self._write(start[0], start[1], run)
                    run, start = [], (e.seg, e.pos)
                run.append(hdr)
                if payload is not None:
                    run.append(payload)
                nxt = e.pos + e.size
            if run:
                self._write(start[0], start[1], run)
            for e, _h, _p in held:
                self._idx.append(e)
                self.bytes += e.size
                self.appended_bytes += e.size

    def sync(self) -> None:
        """fdatasync every segment written since the last sync."""
        with self._lock:
            fds = [self._fds[s] for s in self._unsynced if s in self._fds]
            self._unsynced.clear()
        for fd in fds:
            try:
                os.fdatasync(fd)
            except OSError:
                with self._lock:
                    self._unsynced.update(s for s, f in self._fds.items() if f == fd)
                raise
        if fds:
            self.syncs += 1

    # -- reading -----------------------------------------------------------------------------------
    @property
    def first_seq(self) -> int:
        return self._idx[0].seq if self._idx else self.next_seq

    @property
    def count(self) -> int:
        return len(self._idx)

    def _at(self, seq: int) -> int:
        """Index position of ``seq`` (caller holds the lock)."""
        if not self._idx:
            return 0
        return seq - self._idx[0].seq

    def read(self, from_seq: int, max_bytes: int = 4 << 20) -> list[Record]:
        """Retained records from ``from_seq`` on, in order: at least one if any, about max_bytes."""
        with self._lock:
            if self._idx and from_seq < self._idx[0].seq:
                raise JournalGap(from_seq)
            i = max(0, self._at(from_seq))
            out: list[Record] = []
            total = 0
            idx = self._idx
            while i < len(idx) and (not out or total + idx[i].size <= max_bytes):
                e = idx[i]
                out.append(self._load(e))
                total += e.size
                i += 1
            return out

    def _load(self, e: _Entry) -> Record:
        data = None
        fd = self._fd(e.seg)
        if e.kind == WRITE:
            raw = os.pread(fd, HEADER_SIZE + e.length, e.pos)
            hdr, data = raw[:HEADER_SIZE], raw[HEADER_SIZE:]
        else:
            hdr = os.pread(fd, HEADER_SIZE, e.pos)
        if len(hdr) != HEADER_SIZE or _xxh(data or b"", _xxh(hdr[:-8])) != HEADER.unpack(hdr)[-1] or \
                (data is not None and len(data) != e.length):
            raise JournalCorrupt(f"journal record {e.seq} in {self.path / f'{e.seg:020d}.seg'} at {e.pos} is damaged")
        return Record(e.seq, e.kind, e.flags, e.offset, e.length, e.time_ns, data)

    def find(self, seq: int) -> Record | None:
        with self._lock:
            i = self._at(seq)
            if not self._idx or not 0 <= i < len(self._idx):
                return None
            return self._load(self._idx[i])

    def ranges(self, from_seq: int) -> list[tuple[int, int]]:
        with self._lock:
            return [(e.offset, e.length) for e in self._idx
                    if e.seq >= from_seq and e.kind != CHECKPOINT and e.length]

    def oldest_time_ns(self, from_seq: int) -> int | None:
        with self._lock:
            i = max(0, self._at(from_seq))
            return self._idx[i].time_ns if i < len(self._idx) else None

    # -- releasing ---------------------------------------------------------------------------------
    def release(self, upto_seq: int) -> None:
        """Records <= upto_seq are no longer needed; whole segments go."""
        with self._lock:
            idx = self._idx
            while idx and idx[0].seq <= upto_seq:
                self.bytes -= idx.popleft().size
            self._released = max(self._released, min(upto_seq, self.next_seq - 1))
            self._save_state()  # before deleting: a restart must not find a gap the state does not explain
            first_kept = idx[0].seg if idx else None
            for seg in sorted(self._sizes):
                if seg != self._active and (first_kept is None or seg < first_kept):
                    self._delete(seg)

    def reset(self) -> None:
        """Drop every record (the caller marked their ranges dirty first); next_seq stays."""
        with self._lock:
            self._idx.clear()
            self.bytes = 0
            self._released = self.next_seq - 1
            for seg in list(self._sizes):
                self._delete(seg)
            self._active = -1
            self._save_state(durable=True)

    def _delete(self, seg: int) -> None:
        fd = self._fds.pop(seg, None)
        if fd is not None:
            os.close(fd)
        self._sizes.pop(seg, None)
        self._unsynced.discard(seg)
        (self.path / f"{seg:020d}.seg").unlink(missing_ok=True)

    def _save_state(self, durable: bool = False) -> None:
        """next_seq and the release point. Losing a non-durable update is harmless: records are found
        again by the scan (released ones are sent again, next_seq comes from the files)."""
        tmp = self.path / f"state.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"next_seq": self.next_seq, "released": self._released}))
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, self.path / "state")
        if durable:
            _fsync_dir(self.path)

    def statistics(self) -> dict[str, int]:
        return {"segments": len(self._sizes), "bytes": self.bytes, "count": len(self._idx),
                "first_seq": self.first_seq, "next_seq": self.next_seq,
                "appended_bytes": self.appended_bytes, "syncs": self.syncs}

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
