"""The target's undo log: an async checkpoint is applied atomically, and DR readers see only
committed checkpoints (DESIGN.md, "The asynchronous mirror").

Between two checkpoints an async source sends a unit of frames (journal records, catch-up chunks).
Before a frame overwrites a 4 KiB block for the first time in the unit, the block's old content (or
"it was a hole") is appended to ``NAME.mirror-undo`` and made durable (one fdatasync per batch of
frames, before any of the batch reaches the replica). When the Checkpoint frame arrives the replica
is fdatasync'd, the checkpoint is recorded (``NAME.mirror-checkpoint``, atomically), and only then is
the undo log emptied, its header naming the new checkpoint as its base. So:

- a crash (either side) or a lost link mid-unit leaves an undo log whose base is the replica's last
  committed checkpoint: rolling it back (at the end of the session, or when the target starts, before
  it serves anything) puts the replica back to exactly that checkpoint;
- a crash between the checkpoint record and the emptying leaves an undo log whose base is older than
  the committed checkpoint: it is stale and discarded, never rolled back;
- a torn tail (a crash while appending) was never followed by a replica write: records are checked
  (xxh3) and the log is cut at the first bad one.

While a unit is being applied, the replica's read-only export reads through ``CommittedView``: blocks
the unit has touched come from the undo log, every other block from the replica, all under one lock
that the applier also takes before it lets the replica be written. A DR host therefore never sees a
torn checkpoint. The undo records are the history point-in-time recovery will keep (issue: recovery).

File format (little endian): header ``b"VDUNDO01" | base id u64 | base time_ns u64 | xxh3_64``, then
records ``magic u32 | kind u8 | pad 3 | offset u64 | length u64 | xxh3_64(head + payload)`` followed
by ``length`` payload bytes for DATA (none for HOLE). Offsets and lengths are whole blocks (the last
block of the replica may be short).
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import struct
import threading
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import xxhash

from blockdev.backend import EXTENT_HOLE, Layer

log = logging.getLogger("vdisk.target")

BLOCK = 4096
HEADER = struct.Struct("<8sQQ")
HEADER_MAGIC = b"VDUNDO01"
REC = struct.Struct("<IB3xQQ")
REC_MAGIC = 0x554E444F  # "ODNU"
DATA, HOLE = 0, 1
READ_CHUNK = 4 << 20  # old data read and appended per step (a large trim is saved in pieces)
IOV_BATCH = 512  # buffers per pwritev (the kernel refuses more than IOV_MAX, 1024 on Linux)
HOLE_POS = -1


class UndoImage(Protocol):
    """What the undo log needs of a replica (FileImage, SealedImage)."""

    def pread(self, buf: memoryview, offset: int) -> None: ...
    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> object: ...
    def write_zeroes(self, length: int, offset: int, fua: bool = False, may_trim: bool = True,
                     fast: bool = False) -> object: ...
    def extents(self, length: int, offset: int) -> list[tuple[int, int]]: ...
    def flush(self) -> object: ...


def _digest(*parts: bytes | memoryview) -> bytes:
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return h.digest()


def _header(base: tuple[int, int]) -> bytes:
    head = HEADER.pack(HEADER_MAGIC, base[0], base[1])
    return head + _digest(head)


def data_blocks(image: UndoImage, first: int, last: int, size: int) -> list[tuple[int, int, bool]]:
    """Blocks first..last (inclusive) as runs (first, last, has data): a block with any data byte is data."""
    start, end = first * BLOCK, min((last + 1) * BLOCK, size)
    flags = bytearray(last - first + 1)  # 1: data
    pos = start
    while pos < end:
        ext = image.extents(end - pos, pos)
        if not ext:
            flags[(pos // BLOCK) - first:] = b"\1" * (last - pos // BLOCK + 1)
            break
        for n, f in ext:
            if not f & EXTENT_HOLE and n:
                a, b = pos // BLOCK - first, (pos + n - 1) // BLOCK - first
                flags[a:b + 1] = b"\1" * (b - a + 1)
            pos += n
    runs: list[tuple[int, int, bool]] = []
    i = 0
    while i < len(flags):
        j = i
        while j + 1 < len(flags) and flags[j + 1] == flags[i]:
            j += 1
        runs.append((first + i, first + j, bool(flags[i])))
        i = j + 1
    return runs



CHUNK_SHIFT = 18  # coverage is kept per 2^18 blocks (1 GiB): 256 KiB of state per GiB touched
_MASK = (1 << CHUNK_SHIFT) - 1
_FREE, _HOLE, _DATA = 0, 1, 2  # a block's coverage state


class BlockIndex:
    """Which blocks the current unit has saved, and where: one byte of state per block in 1 GiB
    chunks allocated on first touch, and the saved runs in file order (holes with HOLE_POS). A
    dict per block cost ~100 bytes each: an initial sync of a 500 GB volume would have needed
    ~10 GiB of RAM. Lookups by block for DR reads use a sorted copy of the data runs, rebuilt
    after a save."""

    def __init__(self) -> None:
        self._cover: dict[int, bytearray] = {}
        self.first, self.last, self.pos = array("q"), array("q"), array("q")
        self._sorted: tuple[list[int], list[int], list[int]] | None = None
        self.blocks = 0

    def __bool__(self) -> bool:
        return self.blocks > 0

    def clear(self) -> None:
        self._cover.clear()
        self.first, self.last, self.pos = array("q"), array("q"), array("q")
        self._sorted = None
        self.blocks = 0

    def state(self, blk: int) -> int:
        c = self._cover.get(blk >> CHUNK_SHIFT)
        return c[blk & _MASK] if c is not None else _FREE

    def add(self, first: int, last: int, pos: int) -> None:
        """Blocks first..last saved (uncovered before: callers pass what ``free_runs`` gave)."""
        self.first.append(first)
        self.last.append(last)
        self.pos.append(pos)
        st = _HOLE if pos == HOLE_POS else _DATA
        blk = first
        while blk <= last:
            c = self._cover.get(blk >> CHUNK_SHIFT)
            if c is None:
                c = self._cover[blk >> CHUNK_SHIFT] = bytearray(1 << CHUNK_SHIFT)
            a = blk & _MASK
            n = min(last - blk + 1, (1 << CHUNK_SHIFT) - a)
            c[a:a + n] = bytes([st]) * n
            blk += n
        self.blocks += last - first + 1
        self._sorted = None

    def free_runs(self, b0: int, b1: int) -> list[tuple[int, int]]:
        """Runs of blocks in b0..b1 not saved yet."""
        out: list[tuple[int, int]] = []
        blk = b0
        while blk <= b1:
            c = self._cover.get(blk >> CHUNK_SHIFT)
            a = blk & _MASK
            n = min(b1 - blk + 1, (1 << CHUNK_SHIFT) - a)
            if c is None:
                out.append((blk, blk + n - 1))
            else:
                i, end = a, a + n
                while i < end:
                    j = c.find(0, i, end)  # next free block
                    if j < 0:
                        break
                    k = j
                    while k < end and c[k] == _FREE:
                        k += 1
                    out.append((blk + j - a, blk + k - 1 - a))
                    i = k
            blk += n
        return out

    def touched(self, b0: int, b1: int) -> bool:
        blk = b0
        while blk <= b1:
            c = self._cover.get(blk >> CHUNK_SHIFT)
            a = blk & _MASK
            n = min(b1 - blk + 1, (1 << CHUNK_SHIFT) - a)
            if c is not None and c.count(0, a, a + n) != n:
                return True
            blk += n
        return False

    def where(self, blk: int) -> int | None:
        """None: not saved; HOLE_POS; or the file offset of the block's old bytes."""
        st = self.state(blk)
        if st == _FREE:
            return None
        if st == _HOLE:
            return HOLE_POS
        if self._sorted is None:
            order = sorted((f, l_, p) for f, l_, p in zip(self.first, self.last, self.pos) if p != HOLE_POS)
            self._sorted = ([o[0] for o in order], [o[1] for o in order], [o[2] for o in order])
        firsts, _lasts, poss = self._sorted
        k = bisect.bisect_right(firsts, blk) - 1
        return poss[k] + (blk - firsts[k]) * BLOCK

    def runs(self) -> list[tuple[int, int, int]]:
        return list(zip(self.first, self.last, self.pos))


class UndoLog:
    """One replica's undo log (see the module doc). ``lock`` orders the committed view's reads
    against the index: a block enters the index (its old content durable) before the replica's
    block is written, and leaves it once the unit is committed or rolled back."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.lock = threading.Lock()
        self.index = BlockIndex()
        self.active = True  # False while the base is checkpoint 0 (see begin)
        self.base: tuple[int, int] = (0, 0)
        self._fd = -1
        self._tail = 0
        self.saved_bytes = 0  # old data bytes appended in this unit
        self.rolled_back = 0  # units rolled back (statistics)
        self.restored: list[tuple[int, int]] = []  # (offset, length) put back by the last rollback
        # Keeps a committed unit's log as history (history.py): called with (path, base, end)
        # before the log is replaced by a fresh one. None: the log is emptied in place.
        self.archive: Callable[[Path, tuple[int, int], tuple[int, int]], None] | None = None

    # -- a session -------------------------------------------------------------------------------
    def begin(self, base: tuple[int, int], force: bool = False) -> None:
        """Start an empty log whose records restore checkpoint ``base`` (the replica's committed one).
        With no committed checkpoint yet (a new replica's initial sync, the first unit after a sync
        session) there is no consistent state to go back to: nothing is saved until the first
        commit, so an initial sync of a large volume costs no undo space or index memory."""
        self._open()
        self._reset(base)
        # force: save from the first unit on (a demoted volume's failback: what it overwrites is
        # the discarded side's data, kept as checkpoint 0 of its history).
        self.active = base[0] > 0 or force

    def resume(self, committed: tuple[int, int]) -> None:
        """A sync session with history: go on with the log a previous sync session left open (its
        records still restore ``committed``; a sync session's acknowledged writes are never rolled
        back), or start one."""
        self._open()
        base, entries, cut = self._load()
        if base is not None and base[0] == committed[0] and committed[0] > 0:
            self._index(entries)
            self.base = base
            self._tail = os.fstat(self._fd).st_size - cut
            if cut:
                os.ftruncate(self._fd, self._tail)
            self.active = True
            return
        self._reset(committed)
        self.active = committed[0] > 0

    def _open(self) -> None:
        if self._fd < 0:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if created:
                dirfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dirfd)
                finally:
                    os.close(dirfd)

    def _reset(self, base: tuple[int, int]) -> None:
        head = _header(base)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, head, 0)
        os.fdatasync(self._fd)
        self._tail = len(head)
        self.base = base
        self.saved_bytes = 0

    def _replace(self, base: tuple[int, int]) -> None:
        """A fresh log in place of the current one (kept elsewhere by a hard link): written under a
        temporary name and renamed over, so a reader always finds a whole log at ``path``."""
        tmp = self.path.with_name(self.path.name + ".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            head = _header(base)
            os.pwrite(fd, head, 0)
            os.fdatasync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._tail = len(head)
        self.base = base
        self.saved_bytes = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        """No undo for this session (a sync one): the file goes."""
        with self.lock:
            self.index.clear()
        self.close()
        self.path.unlink(missing_ok=True)

    # -- saving (the applier's thread; one at a time per replica) -------------------------------
    def uncovered(self, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Runs of blocks (first, last) the ranges touch whose old content is not saved yet."""
        if not self.active:
            return []
        found: list[tuple[int, int]] = []
        for offset, length in ranges:
            if length > 0:
                found += self.index.free_runs(offset // BLOCK, (offset + length - 1) // BLOCK)
        if not found:
            return []
        found.sort()
        runs = [found[0]]
        for a, b in found[1:]:  # frames of one batch may overlap each other
            if a <= runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], max(runs[-1][1], b))
            else:
                runs.append((a, b))
        return runs

    def save(self, image: UndoImage, runs: list[tuple[int, int]]) -> None:
        """Append the old content of these block runs, fdatasync, then index them: from here the
        replica's blocks may be overwritten."""
        if self._fd < 0:
            raise OSError(f"undo log {self.path} is not open")
        entries: list[tuple[int, int, int]] = []  # (first, last, file pos or HOLE_POS)
        bufs: list[bytes | bytearray] = []
        pending = 0
        pos = self._tail
        for first, last in runs:
            for a, b, has_data in data_blocks(image, first, last, self.size):
                if not has_data:
                    head = REC.pack(REC_MAGIC, HOLE, a * BLOCK, min((b + 1) * BLOCK, self.size) - a * BLOCK)
                    rec = head + _digest(head)
                    bufs.append(rec)
                    pending += len(rec)
                    entries.append((a, b, HOLE_POS))
                    continue
                step = READ_CHUNK // BLOCK
                for c in range(a, b + 1, step):
                    d = min(b, c + step - 1)
                    off, n = c * BLOCK, min((d + 1) * BLOCK, self.size) - c * BLOCK
                    old = bytearray(n)
                    image.pread(memoryview(old), off)
                    head = REC.pack(REC_MAGIC, DATA, off, n)
                    bufs += [head + _digest(head, old), old]
                    entries.append((c, d, pos + pending + REC.size + 8))
                    pending += REC.size + 8 + n
                    self.saved_bytes += n
                    if pending >= READ_CHUNK:
                        pos = self._write(bufs, pos, pending)
                        bufs, pending = [], 0
        if bufs:
            pos = self._write(bufs, pos, pending)
        os.fdatasync(self._fd)
        self._tail = pos
        with self.lock:
            for first, last, where in entries:
                self.index.add(first, last, where)

    def _write(self, bufs: list[bytes | bytearray], pos: int, n: int) -> int:
        """Append ``bufs`` (``n`` bytes) at ``pos``, in pwritev calls of at most IOV_BATCH buffers
        (more is EINVAL: thousands of small hole records fit in one step)."""
        end = pos + n
        for i in range(0, len(bufs), IOV_BATCH):
            part = bufs[i:i + IOV_BATCH]
            want = sum(len(b) for b in part)
            done = os.pwritev(self._fd, part, pos)
            if done != want:  # short write (a full disk, say): write the rest plainly, or fail
                flat = b"".join(part)
                while done < want:
                    k = os.pwrite(self._fd, flat[done:], pos + done)
                    if k <= 0:
                        raise OSError(f"short write to undo log {self.path}")
                    done += k
            pos += want
        assert pos == end
        return end

    # -- ending a unit ---------------------------------------------------------------------------
    def commit(self, cp: tuple[int, int]) -> None:
        """The replica is fdatasync'd and ``cp`` is recorded: the unit is done, the log restarts."""
        with self.lock:
            self.index.clear()
        if self.archive is not None and self.active and self.base[0] < cp[0]:
            self.archive(self.path, self.base, cp)
            self._replace(cp)
        else:
            self._reset(cp)
        self.active = True

    def rollback(self, image: UndoImage) -> int:
        """Put every saved block back (the replica returns to the base checkpoint); bytes restored."""
        if not self.index:
            return 0
        restored = 0
        self.restored = []
        for first, last, where in self._runs():
            off, end = first * BLOCK, min((last + 1) * BLOCK, self.size)
            self.restored.append((off, end - off))
            if where == HOLE_POS:
                image.write_zeroes(end - off, off, may_trim=True)
            else:
                for c in range(off, end, READ_CHUNK):
                    n = min(READ_CHUNK, end - c)
                    image.pwrite(os.pread(self._fd, n, where + (c - off)), c)
            restored += end - off
        image.flush()
        with self.lock:
            self.index.clear()
        self._reset(self.base)
        self.rolled_back += 1
        return restored

    def _runs(self) -> list[tuple[int, int, int]]:
        return self.index.runs()

    # -- recovery --------------------------------------------------------------------------------
    def recover(self, image: UndoImage, committed: tuple[int, int]) -> int:
        """At a session's start or the target's: load the log left behind; roll it back if its base is
        the committed checkpoint (a unit that never committed), drop it if stale. Bytes restored."""
        if not self.path.exists():
            return 0
        self._open()
        base, entries, cut = self._load()
        restored = 0
        if base is not None and base[0] == committed[0] and entries:
            self._index(entries)
            self.base = base
            restored = self.rollback(image)
            log.warning("replica %s: rolled back %d bytes of a checkpoint that never committed (back to "
                        "checkpoint %d)", self.path.name.removesuffix(".mirror-undo"), restored, base[0])
        elif base is not None and self.archive is not None and base[0] < committed[0] and (base[0] > 0 or entries):
            # Committed, not yet kept (a crash between the checkpoint's record and the archive).
            self.archive(self.path, base, committed)
            with self.lock:
                self.index.clear()
            self._replace(committed)
            return 0
        elif base is not None and entries:
            log.info("undo log %s: stale (base checkpoint %d, committed %d): dropped", self.path, base[0], committed[0])
        if cut:
            log.warning("undo log %s: cut a torn tail of %d bytes", self.path, cut)
        with self.lock:
            self.index.clear()
        self._reset(committed)
        return restored

    def _load(self) -> tuple[tuple[int, int] | None, list[tuple[int, int, int]], int]:
        """(base, records as (first block, last block, data pos | HOLE_POS), torn bytes)."""
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, HEADER.size + 8, 0)
        if len(head) < HEADER.size + 8 or _digest(head[:HEADER.size]) != head[HEADER.size:]:
            return None, [], 0
        magic, base_id, base_ns = HEADER.unpack(head[:HEADER.size])
        if magic != HEADER_MAGIC:
            return None, [], 0
        entries, pos = scan_records(self._fd, self.size, len(head), size)
        return (base_id, base_ns), entries, size - pos

    def open_view(self, committed: tuple[int, int]) -> bool:
        """For a reader while no target applies (`vdisk serve --read-only` of a replica whose target
        died mid-unit): index the log without rolling it back, so reads go through ``read``. False
        (and nothing open) if there is no unit of the committed checkpoint to hide."""
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        base, entries, _cut = self._load()
        if base is None or base[0] != committed[0] or not entries:
            self.close()
            return False
        self._index(entries)
        self.base = base
        return True

    def _index(self, entries: list[tuple[int, int, int]]) -> None:
        with self.lock:
            self.index.clear()
            for first, last, where in entries:
                for a, b in self.index.free_runs(first, last):  # a damaged log may repeat a block
                    self.index.add(a, b, where if where == HOLE_POS else where + (a - first) * BLOCK)

    # -- the committed view (DR readers; any thread) ---------------------------------------------
    def read(self, inner: Any, buf: memoryview, offset: int) -> None:
        """Read as of the base checkpoint: touched blocks from the log, the rest from the replica."""
        with self.lock:
            index = self.index
            if not index:
                inner.pread(buf, offset)
                return
            end = offset + len(buf)
            pos = offset
            while pos < end:
                blk = pos // BLOCK
                stop = min(end, (blk + 1) * BLOCK)
                where = index.where(blk)
                # Extend over following blocks of the same kind (replica, hole, contiguous log bytes).
                while stop < end:
                    nxt = index.where(stop // BLOCK)
                    same = nxt == where if where is None or where == HOLE_POS else \
                        nxt == where + (stop // BLOCK - blk) * BLOCK
                    if not same:
                        break
                    stop = min(end, stop + BLOCK)
                view = buf[pos - offset:stop - offset]
                if where is None:
                    inner.pread(view, pos)
                elif where == HOLE_POS:
                    view[:] = bytes(len(view))
                else:
                    got = os.preadv(self._fd, [view], where + (pos - blk * BLOCK))
                    if got < len(view):
                        raise OSError(f"undo log {self.path} is shorter than its index")
                pos = stop

    def touched(self, offset: int, length: int) -> bool:
        """Whether any block of the range is in the current unit (no lock: a hint for extents)."""
        if not self.index or length <= 0:
            return False
        return self.index.touched(offset // BLOCK, (offset + length - 1) // BLOCK)


class CommittedView(Layer):
    """A replica's read-only export as of its last committed checkpoint (the module doc)."""

    def __init__(self, inner: Any, undo: UndoLog, owns_undo: bool = False) -> None:
        super().__init__(inner)
        self.undo, self.owns_undo = undo, owns_undo  # the target's export shares its session's log

    def pread(self, buf: memoryview, offset: int) -> None:
        self.undo.read(self.inner, buf, offset)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self.owns_undo:
                self.undo.close()

    def extents(self, length: int, offset: int) -> list[tuple[int, int]]:
        # Blocks of the current unit may be holes now and data at the checkpoint: say "data" there.
        if self.undo.touched(offset, length):
            return [(length, 0)]
        return self.inner.extents(length, offset)


def scan_records(fd: int, vol_size: int, pos: int, end: int) -> tuple[list[tuple[int, int, int]], int]:
    """The valid records of a log from ``pos`` to ``end`` as (first block, last block, data pos |
    HOLE_POS), and where they stop (at the first torn or damaged one)."""
    entries: list[tuple[int, int, int]] = []
    while pos < end:
        rh = os.pread(fd, REC.size + 8, pos)
        if len(rh) < REC.size + 8:
            break
        magic, kind, off, n = REC.unpack(rh[:REC.size])
        if magic != REC_MAGIC or kind not in (DATA, HOLE) or off % BLOCK or n <= 0 or off + n > vol_size:
            break
        plen = n if kind == DATA else 0
        payload = os.pread(fd, plen, pos + len(rh)) if plen else b""
        if len(payload) != plen or _digest(rh[:REC.size], payload) != rh[REC.size:]:
            break
        first, last = off // BLOCK, (off + n - 1) // BLOCK
        entries.append((first, last, HOLE_POS if kind == HOLE else pos + len(rh)))
        pos += len(rh) + plen
    return entries, pos


CHECKPOINT_SUFFIX = ".mirror-checkpoint"  # NAME + suffix: the last checkpoint an async source committed
UNDO_SUFFIX = ".mirror-undo"  # NAME + suffix: the undo log of the unit being applied


def read_checkpoint(root: Path, name: str) -> tuple[int, int]:
    """(id, time_ns) of the last checkpoint committed on replica ``name``; (0, 0) if none or unreadable."""
    try:
        d = json.loads((root / f"{name}{CHECKPOINT_SUFFIX}").read_text())
        cp, t = d["id"], d["time_ns"]
        if isinstance(cp, int) and isinstance(t, int) and cp >= 0 and t >= 0:
            return cp, t
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return 0, 0


def committed_view(root: Path, name: str, image: Any, size: int) -> Any:
    """``image`` as of the replica's last committed checkpoint when its target died mid-unit (a
    read-only reader while the target is down), else ``image`` itself."""
    undo = UndoLog(root / f"{name}{UNDO_SUFFIX}", size)
    return CommittedView(image, undo, owns_undo=True) if undo.open_view(read_checkpoint(root, name)) else image
