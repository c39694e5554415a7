"""What may differ between a volume and its replica, persisted so that no crash forces a full resync.

``DirtyMap``: one bit per region (64 KiB by default); set for writes the replica has not got (link
down, initial sync, verify found a difference), cleared as resync sends them. Saved atomically.

``ActivityLog`` (after DRBD's): the set of "hot" extents (4 MiB) that may have writes in flight. An
extent is made durable in the log *before* a write to it is issued (``admit``; the front end's
thread never waits for that fdatasync, the write is issued when it is done), and leaves the log only when no
write to it is in flight and the dirty map is saved. After a crash, dirty = saved map | logged extents:
everything that may differ, and usually a tiny fraction of the volume.
"""
from __future__ import annotations

import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import xxhash

from blockdev.backend import Completion
from blockdev.volume import write_atomic

_NONZERO = re.compile(rb"[^\x00]")
_MAP_HEAD = struct.Struct(">8sQQ")  # magic, volume size, region size
_MAP_MAGIC = b"VDDIRTY1"
_AL_HEAD = struct.Struct(">8sQQI")  # magic, sequence, extent size, count
_AL_MAGIC = b"VDALOG01"


class DirtyMap:
    """A bitmap of regions that may differ. Thread-safe."""

    def __init__(self, size: int, region: int = 64 << 10, path: Path | None = None) -> None:
        self.size, self.region, self.path = size, region, path
        self.regions = (size + region - 1) // region
        self._bits = bytearray((self.regions + 7) // 8)
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._count = 0
        self._unsaved = False

    # -- bits -----------------------------------------------------------------------------------
    def span(self, offset: int, length: int) -> range:
        """The regions covering a byte range."""
        return range(offset // self.region, min((offset + max(length, 1) - 1) // self.region + 1, self.regions))

    def mark(self, offset: int, length: int) -> None:
        with self._lock:
            for r in self.span(offset, length):
                self._set_locked(r)

    def mark_region(self, r: int) -> None:
        with self._lock:
            self._set_locked(r)

    def _set_locked(self, r: int) -> None:
        byte, bit = r >> 3, 1 << (r & 7)
        if not self._bits[byte] & bit:
            self._bits[byte] |= bit
            self._count += 1
            self._unsaved = True

    def clear_region(self, r: int) -> None:
        with self._lock:
            byte, bit = r >> 3, 1 << (r & 7)
            if self._bits[byte] & bit:
                self._bits[byte] &= ~bit
                self._count -= 1
                self._unsaved = True

    def test(self, r: int) -> bool:
        return bool(self._bits[r >> 3] & (1 << (r & 7)))

    def next_set(self, start: int = 0) -> int | None:
        """The first dirty region >= start, or None."""
        if start >= self.regions:
            return None
        byte = start >> 3
        if self._bits[byte] >> (start & 7):
            for r in range(start, min((byte + 1) * 8, self.regions)):
                if self.test(r):
                    return r
        m = _NONZERO.search(self._bits, byte + 1)
        if m is None:
            return None
        b = m.start()
        for r in range(b * 8, min(b * 8 + 8, self.regions)):
            if self.test(r):
                return r
        return None

    def __iter__(self) -> Iterator[int]:
        r = self.next_set(0)
        while r is not None:
            yield r
            r = self.next_set(r + 1)

    @property
    def count(self) -> int:
        return self._count

    @property
    def dirty_bytes(self) -> int:
        if not self._count:
            return 0
        last = self.regions - 1
        # The last region may be short.
        return self._count * self.region - (self.region * self.regions - self.size if self.test(last) else 0)

    def region_range(self, r: int) -> tuple[int, int]:
        off = r * self.region
        return off, min(self.region, self.size - off)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, force: bool = False) -> None:
        """Write the map atomically if it changed since the last save."""
        if self.path is None or not (self._unsaved or force):
            return
        # One save at a time (threads: flush, eviction, periodic): an older snapshot must never
        # land after a newer one, and the temp file is shared.
        with self._save_lock:
            with self._lock:
                data = _MAP_HEAD.pack(_MAP_MAGIC, self.size, self.region) + bytes(self._bits)
                self._unsaved = False
            write_atomic(self.path, data + xxhash.xxh3_64_digest(data))

    @classmethod
    def load(cls, size: int, region: int, path: Path) -> DirtyMap:
        """The saved map, or an empty one if none exists; a corrupt or mismatched file marks everything."""
        m = cls(size, region, path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return m
        body, check = raw[:-8], raw[-8:]
        ok = len(raw) == _MAP_HEAD.size + len(m._bits) + 8 and xxhash.xxh3_64_digest(body) == check
        if ok and _MAP_HEAD.unpack_from(body) == (_MAP_MAGIC, size, region):
            m._bits[:] = body[_MAP_HEAD.size:]
            m._count = sum(b.bit_count() for b in m._bits)
        else:
            m.mark(0, size)  # unknown state: assume everything differs rather than trust it
        return m

    def snapshot_bits(self) -> bytes:
        with self._lock:
            return bytes(self._bits)


class ActivityLog:
    """Hot extents, written to disk before a write to a new extent is issued. Thread-safe.

    Two fixed slots written alternately (each with a sequence number and checksum), so a torn write
    leaves the previous slot valid.
    """

    def __init__(self, path: Path, extent: int = 4 << 20, capacity: int = 1024,
                 before_evict: Callable[[], None] = lambda: None) -> None:
        self.path, self.extent, self.capacity = path, extent, capacity
        self._before_evict = before_evict
        self._hot: OrderedDict[int, int] = OrderedDict()  # extent -> writes in flight
        self._gen: dict[int, int] = {}  # extent -> writes begun (tells a re-used extent from an idle one)
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._unlogged: set[int] = set()  # hot extents not yet in a durable log write
        self._waiters: list[tuple[Completion, int, int]] = []
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._seq = 0
        self._slot_size = _AL_HEAD.size + 8 * capacity * 4 + 8  # room for in-flight extents beyond capacity
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < 2 * self._slot_size:
            # Allocated once: a later update then overwrites blocks in place, and its fdatasync need
            # not commit the filesystem journal (which would also flush the volume's dirty data).
            os.pwrite(self._fd, bytes(2 * self._slot_size - os.fstat(self._fd).st_size), os.fstat(self._fd).st_size)
            os.fsync(self._fd)
        self.writes = 0  # log updates (each one fdatasync): statistics

    def recover(self) -> list[int]:
        """Extents logged by the previous run (possibly with writes in flight when it died)."""
        best: tuple[int, list[int]] | None = None
        for slot in (0, 1):
            raw = os.pread(self._fd, self._slot_size, slot * self._slot_size)
            if len(raw) < _AL_HEAD.size + 8:
                continue
            magic, seq, extent, count = _AL_HEAD.unpack_from(raw)
            end = _AL_HEAD.size + 8 * count
            if magic != _AL_MAGIC or extent != self.extent or end + 8 > len(raw):
                continue
            if xxhash.xxh3_64_digest(raw[:end]) != raw[end:end + 8]:
                continue
            if best is None or seq > best[0]:
                best = (seq, list(struct.unpack_from(f">{count}Q", raw, _AL_HEAD.size)))
        if best is None:
            return []
        self._seq = best[0]
        return best[1]

    def byte_range(self, e: int) -> tuple[int, int]:
        return e * self.extent, self.extent

    def admit(self, offset: int, length: int) -> Completion | None:
        """Count a write in flight in its extents. None if they are already durably logged (the
        common case, no I/O); else a Completion that finishes once they are (the log is written by
        its own thread, several admissions per fdatasync), and fails if the log cannot be written."""
        first, last = offset // self.extent, (offset + max(length, 1) - 1) // self.extent
        with self._lock:
            hot = self._hot
            if first == last:  # the common case: one extent, already busy and logged
                n = hot.get(first)
                if n and first not in self._unlogged:
                    # Already busy: it cannot be evicted now, so neither its LRU place nor its
                    # generation (which only tells an idle extent that was reused) needs updating.
                    hot[first] = n + 1
                    return None
                if n is not None and first not in self._unlogged:
                    hot[first] = 1
                    hot.move_to_end(first)
                    self._gen[first] += 1
                    return None
            wait = False
            for e in range(first, last + 1):
                n = hot.get(e)
                if n is None:
                    hot[e] = 1
                    self._gen[e] = 1
                    self._unlogged.add(e)
                else:
                    hot[e] = n + 1
                    hot.move_to_end(e)
                    self._gen[e] += 1
                wait = wait or e in self._unlogged
            if not wait:
                return None
            c = Completion()
            self._waiters.append((c, offset, length))
            if self._thread is None:
                self._thread = threading.Thread(target=self._log_writer, name="vdisk-activity-log", daemon=True)
                self._thread.start()
            self._wake.notify()
        return c

    def begin(self, offset: int, length: int) -> None:
        """``admit``, waiting for the log if needed (for callers that may block)."""
        c = self.admit(offset, length)
        if c is not None:
            done = threading.Event()
            c.add_done_callback(lambda _exc: done.set())
            done.wait()
            if c.exception is not None:
                raise c.exception

    def _log_writer(self) -> None:
        while True:
            with self._lock:
                while not self._waiters and not self._closing:
                    self._wake.wait()
                if self._closing and not self._waiters:
                    return
                waiters, self._waiters = self._waiters, []
                logged = set(self._unlogged)
            try:
                self._commit(all_idle=False)  # its snapshot holds every extent admitted so far
            except OSError as e:
                for c, offset, length in waiters:
                    self.end(offset, length)
                    c.finish(e)
                continue
            with self._lock:
                self._unlogged -= logged
            for c, _offset, _length in waiters:
                c.finish()

    def end(self, offset: int, length: int) -> None:
        """The write is on the replica, or recorded in the dirty map: no longer in flight."""
        self.end_many(((offset, length),))

    def end_many(self, ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> None:
        """``end`` for every (offset, length), under one lock (an ack covers a whole batch)."""
        ext, hot = self.extent, self._hot
        with self._lock:
            for offset, length in ranges:
                for e in range(offset // ext, (offset + max(length, 1) - 1) // ext + 1):
                    n = hot.get(e)
                    if n:
                        hot[e] = n - 1

    def clear(self) -> None:
        """Forget idle extents (the dirty map is saved first)."""
        self._commit(all_idle=True)

    @property
    def hot(self) -> int:
        return len(self._hot)

    def _commit(self, all_idle: bool) -> None:
        """Write the hot set durably, dropping idle extents (all, or the oldest beyond capacity).

        The I/O happens outside ``_lock``, so ``end`` (called on the trio thread for every ack) never
        waits for an fdatasync; ``_io`` keeps log writes in sequence order. An extent is dropped only
        if no write began in it since it was seen idle before the dirty map was saved: every write
        that ended before that save has its dirty bits in it.
        """
        with self._io:
            if self._fd < 0:  # closed: the mirror was stopped
                return
            with self._lock:
                idle = [(e, self._gen[e]) for e, n in self._hot.items() if n == 0]
                if not all_idle:
                    idle = idle[: max(0, len(self._hot) - self.capacity)]
            if idle:
                self._before_evict()  # the dirty map must hold their bits before they leave the log
            with self._lock:
                for e, gen in idle:
                    if self._hot.get(e) == 0 and self._gen[e] == gen:
                        del self._hot[e]
                        del self._gen[e]
                extents = list(self._hot)[: self.capacity * 4]
                self._seq += 1
                seq = self._seq
            body = _AL_HEAD.pack(_AL_MAGIC, seq, self.extent, len(extents)) + struct.pack(f">{len(extents)}Q", *extents)
            os.pwrite(self._fd, body + xxhash.xxh3_64_digest(body), (seq % 2) * self._slot_size)
            os.fdatasync(self._fd)
            self.writes += 1

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify()
        with self._io:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
