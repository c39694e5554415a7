"""What may differ between a volume and its replica, persisted so that no crash forces a full resync.

``DirtyMap``: one bit per region (64 KiB by default); set for writes the replica has not got (link
down, initial sync, verify found a difference, a local write that failed after its frame left),
cleared as resync sends them. Saved in place into one of two preallocated, checksummed slots
(written alternately, like the log below), so a full filesystem cannot stop a save once the file
exists, and a failed save leaves no temp file behind: the map stays in memory and the next save
(retried with backoff by the daemon) writes it.

``ActivityLog`` (after DRBD's): the set of "hot" extents (4 MiB) that may have writes in flight. An
extent is made durable in the log *before* a write to it is issued (``admit``; the front end's
thread never waits for that fdatasync, the write is issued when it is done), and leaves the log only when no
write to it is in flight and the dirty map is saved. After a crash, dirty = saved map | logged extents:
everything that may differ, and usually a tiny fraction of the volume.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import xxhash

from blockdev.backend import Completion

log = logging.getLogger("vdisk.mirror")
_NONZERO = re.compile(rb"[^\x00]")
_MAP_HEAD = struct.Struct(">8sQQ")  # magic, volume size, region size (the old single-copy format)
_MAP_MAGIC = b"VDDIRTY1"
_SLOT_HEAD = struct.Struct(">8sQQQ")  # magic, sequence, volume size, region size
_SLOT_MAGIC = b"VDDIRTY2"


class ActivityLogImbalance(AssertionError):
    """An extent ended more writes than were admitted to it: a bookkeeping bug, never hidden."""
_AL_HEAD = struct.Struct(">8sQQI")  # magic, sequence, extent size, count
_AL_MAGIC = b"VDALOG01"


class DirtyMap:
    """A bitmap of regions that may differ. Thread-safe."""

    def __init__(self, size: int, region: int = 64 << 10, path: Path | None = None) -> None:
        self.size, self.region, self.path = size, region, path
        self.regions = (size + region - 1) // region
        self._bits = bytearray((self.regions + 7) // 8)
        # Regions read for a replica that has not committed them yet (async catch-up): clear in
        # memory (nothing left to read) but still saved as dirty, so a crash sends them again.
        self._pinned = bytearray(len(self._bits))
        self.pinned_count = 0
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._count = 0
        self._unsaved = False
        self._seq = 0  # of the last slot written (or read)
        self._slot = (_SLOT_HEAD.size + len(self._bits) + 8 + 4095) // 4096 * 4096
        self.save_error: str | None = None  # why the last save failed (None: the file holds the map)
        # Called (outside the lock, any thread) when a mark sets a bit that was clear: the resync
        # must hear of every new difference, whoever found it.
        self.on_mark: Callable[[], None] | None = None

    # -- bits -----------------------------------------------------------------------------------
    def span(self, offset: int, length: int) -> range:
        """The regions covering a byte range."""
        return range(offset // self.region, min((offset + max(length, 1) - 1) // self.region + 1, self.regions))

    def mark(self, offset: int, length: int) -> None:
        with self._lock:
            before = self._count
            for r in self.span(offset, length):
                self._set_locked(r)
            new = self._count != before
        if new and self.on_mark is not None:
            self.on_mark()

    def mark_region(self, r: int) -> None:
        with self._lock:
            new = self._set_locked(r)
        if new and self.on_mark is not None:
            self.on_mark()

    def _set_locked(self, r: int) -> bool:
        byte, bit = r >> 3, 1 << (r & 7)
        if self._bits[byte] & bit:
            return False
        self._bits[byte] |= bit
        self._count += 1
        self._unsaved = True
        return True

    def clear_region(self, r: int) -> None:
        with self._lock:
            byte, bit = r >> 3, 1 << (r & 7)
            if self._bits[byte] & bit:
                self._bits[byte] &= ~bit
                self._count -= 1
                self._unsaved = True

    def test(self, r: int) -> bool:
        return bool(self._bits[r >> 3] & (1 << (r & 7)))

    def pin(self, first: int, last: int) -> None:
        """Regions first..last were read for the replica, which has not committed them: clear
        them (nothing left to read) but keep them dirty on disk until ``unpin``."""
        with self._lock:
            for r in range(first, last + 1):
                byte, bit = r >> 3, 1 << (r & 7)
                if self._bits[byte] & bit:
                    self._bits[byte] &= ~bit
                    self._count -= 1
                if not self._pinned[byte] & bit:
                    self._pinned[byte] |= bit
                    self.pinned_count += 1
            self._unsaved = True

    def unpin(self, first: int, last: int, remark: bool = False) -> None:
        """The replica committed regions first..last (``remark=False``), or lost them (``remark``:
        they are dirty again)."""
        new = False
        with self._lock:
            for r in range(first, last + 1):
                byte, bit = r >> 3, 1 << (r & 7)
                if self._pinned[byte] & bit:
                    self._pinned[byte] &= ~bit
                    self.pinned_count -= 1
                    if remark:
                        new = self._set_locked(r) or new
            self._unsaved = True
        if new and self.on_mark is not None:
            self.on_mark()

    @property
    def pinned_bytes(self) -> int:
        return self.pinned_count * self.region

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
    def save(self, force: bool = False) -> bool:
        """Write the map if it changed since the last save; False if it could not be written (the
        reason is in ``save_error`` and logged once, naming the file; the bits stay unsaved)."""
        if self.path is None or not (self._unsaved or force):
            return True
        # One save at a time (threads: flush, eviction, periodic): an older snapshot must never
        # land after a newer one.
        with self._save_lock:
            with self._lock:
                bits = bytes(self._bits) if not self.pinned_count else \
                    (int.from_bytes(self._bits, "little") | int.from_bytes(self._pinned, "little")).to_bytes(len(self._bits), "little")
                self._unsaved = False
            seq = self._seq + 1
            body = _SLOT_HEAD.pack(_SLOT_MAGIC, seq, self.size, self.region) + bits
            try:
                self._write_slot(seq, body + xxhash.xxh3_64_digest(body))
            except OSError as e:
                with self._lock:
                    self._unsaved = True  # still to be written: a failed save must not be forgotten
                why = f"cannot save the dirty map {self.path}: {e.strerror or e}"
                if why != self.save_error:
                    log.error("%s (it is kept in memory; retrying)", why)
                self.save_error = why
                return False
            self._seq = seq
            if self.save_error is not None:
                log.info("dirty map %s saved again", self.path)
                self.save_error = None
            return True

    def _write_slot(self, seq: int, data: bytes) -> None:
        """Overwrite slot ``seq % 2`` in place. The file is sized for both slots once (the only step
        that needs free space); a torn write leaves the other slot valid."""
        assert self.path is not None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size != 2 * self._slot:
                if size > 2 * self._slot:
                    os.ftruncate(fd, 0)  # a foreign file; an old single-copy map is just outgrown
                os.posix_fallocate(fd, 0, 2 * self._slot)
                os.fsync(fd)
                dirfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dirfd)
                finally:
                    os.close(dirfd)
            os.pwrite(fd, data, (seq % 2) * self._slot)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, size: int, region: int, path: Path) -> DirtyMap:
        """The saved map, or an empty one if none exists; a corrupt or mismatched file marks everything."""
        m = cls(size, region, path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return m
        best: tuple[int, bytes] | None = None
        if len(raw) == 2 * m._slot:
            end = _SLOT_HEAD.size + len(m._bits)
            for base in (0, m._slot):
                body, check = raw[base:base + end], raw[base + end:base + end + 8]
                if xxhash.xxh3_64_digest(body) != check:
                    continue
                magic, seq, s_size, s_region = _SLOT_HEAD.unpack_from(body)
                if (magic, s_size, s_region) == (_SLOT_MAGIC, size, region) and (best is None or seq > best[0]):
                    best = (seq, body[_SLOT_HEAD.size:])
        elif len(raw) == _MAP_HEAD.size + len(m._bits) + 8:  # the single-copy format of earlier versions
            body, check = raw[:-8], raw[-8:]
            if xxhash.xxh3_64_digest(body) == check and _MAP_HEAD.unpack_from(body) == (_MAP_MAGIC, size, region):
                best = (0, body[_MAP_HEAD.size:])
        if best is None:
            m.mark(0, size)  # unknown state: assume everything differs rather than trust it
            return m
        m._seq = best[0]
        m._bits[:] = best[1]
        m._count = sum(b.bit_count() for b in m._bits)
        return m

    def snapshot_bits(self) -> bytes:
        with self._lock:
            return bytes(self._bits)


class ActivityLog:
    """Hot extents, written to disk before a write to a new extent is issued. Thread-safe.

    Two fixed slots written alternately (each with a sequence number and checksum), so a torn write
    leaves the previous slot valid.
    """

    EXTENT = 4 << 20
    ALL = (1 << 64) - 1  # logged instead of the extents when they do not fit: the whole volume

    def __init__(self, path: Path, extent: int = EXTENT, capacity: int = 1024,
                 before_evict: Callable[[], bool] = lambda: True) -> None:
        self.path, self.extent, self.capacity = path, extent, capacity
        self.before_evict = before_evict
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
            try:
                os.pwrite(self._fd, bytes(2 * self._slot_size - os.fstat(self._fd).st_size), os.fstat(self._fd).st_size)
                os.fsync(self._fd)
            except OSError as e:
                # A full disk: the log is written when first needed; until it can be, a write to a
                # new extent fails (its admission does) rather than go unrecorded.
                log.error("cannot allocate the activity log %s: %s", path, e.strerror or e)
        self.writes = 0  # log updates (each one fdatasync): statistics

    def recover(self) -> list[int]:
        """Extents logged by the previous run (possibly with writes in flight when it died)."""
        seq, extents = _read_log(os.pread(self._fd, 2 * self._slot_size, 0), self._slot_size, self.extent)
        self._seq = max(self._seq, seq)
        return extents

    @classmethod
    def logged(cls, path: Path, extent: int = 4 << 20, capacity: int = 1024) -> list[int]:
        """``recover`` without opening the log for writing (offline status): [] if there is none."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return []
        return _read_log(raw, _AL_HEAD.size + 8 * capacity * 4 + 8, extent)[1]

    def byte_range(self, e: int) -> tuple[int, int]:
        return e * self.extent, self.extent

    def admit(self, offset: int, length: int) -> Completion | None:
        """Count a write in flight in its extents. None if they are already durably logged (the
        common case, no I/O); else a Completion that finishes once they are (the log is written by
        its own thread, several admissions per fdatasync), and fails if the log cannot be written
        (then nothing was admitted: there is no ticket to end)."""
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
        """``end`` for every (offset, length), under one lock (an ack covers a whole batch). Each
        range must be one that was admitted (its ticket), ended exactly once: an extent that would go
        below zero raises ActivityLogImbalance instead of hiding the bug (an extent at zero may be
        dropped from the log while a write to it is still in flight)."""
        ext, hot = self.extent, self._hot
        with self._lock:
            for offset, length in ranges:
                for e in range(offset // ext, (offset + max(length, 1) - 1) // ext + 1):
                    n = hot.get(e)
                    if not n:
                        raise ActivityLogImbalance(f"activity log: extent {e} ended more often than admitted "
                                                   f"(range {offset}+{length})")
                    hot[e] = n - 1

    def in_flight(self, offset: int) -> int:
        """Writes admitted and not yet ended in the extent holding ``offset`` (statistics, tests)."""
        return self._hot.get(offset // self.extent, 0)

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
            if idle and not self.before_evict():
                # The dirty map could not be saved (a full disk, say): the extents stay in the log,
                # which is then the only durable record of what may differ.
                idle = []
            with self._lock:
                for e, gen in idle:
                    if self._hot.get(e) == 0 and self._gen[e] == gen:
                        del self._hot[e]
                        del self._gen[e]
                # More hot extents than a slot holds (evictions failing: the map cannot be saved):
                # record "everything may differ" rather than a truncated, silently partial list.
                extents = list(self._hot) if len(self._hot) <= self.capacity * 4 else [self.ALL]
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


def _read_log(raw: bytes, slot_size: int, extent: int) -> tuple[int, list[int]]:
    """(sequence, extents) of the newest valid slot of an activity log; (0, []) if none is."""
    best: tuple[int, list[int]] = (0, [])
    for base in (0, slot_size):
        part = raw[base:base + slot_size]
        if len(part) < _AL_HEAD.size + 8:
            continue
        magic, seq, ext, count = _AL_HEAD.unpack_from(part)
        end = _AL_HEAD.size + 8 * count
        if magic != _AL_MAGIC or ext != extent or end + 8 > len(part):
            continue
        if xxhash.xxh3_64_digest(part[:end]) != part[end:end + 8]:
            continue
        if seq > best[0]:
            best = (seq, list(struct.unpack_from(f">{count}Q", part, _AL_HEAD.size)))
    return best
