"""Copy-on-write: writes go to a scratch overlay file, reads of blocks never written pass through.

The backend below is only read (a recovery view of a replica, say): a test failover can write, fsck
and mount a disk without changing the replica under it. The overlay is scratch: it lives as long as
the layer (the file is unlinked at once) and is never made durable.
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from ..backend import Backend, Layer, WriteResult

BLOCK = 4096


class CowLayer(Layer):
    """Writable over a read-only ``inner``: a block's first write copies it (whole) into the overlay."""

    intercepts_writes = True

    def __init__(self, inner: Backend, scratch_dir: Path) -> None:
        super().__init__(inner)
        self._size = inner.size()
        fd, path = tempfile.mkstemp(prefix=".vdisk-cow-", dir=scratch_dir)
        os.unlink(path)  # scratch: gone with the process, whatever ends it
        self.fd = fd
        os.ftruncate(fd, self._size)
        self.written = bytearray((self._size + BLOCK - 1) // BLOCK)  # 1: the overlay holds the block
        self.lock = threading.Lock()
        self.overlay_bytes = 0

    def can_write(self) -> bool:
        return True

    def can_trim(self) -> bool:
        return True

    def can_zero(self) -> bool:
        return True

    def can_fast_zero(self) -> bool:
        return False

    def can_flush(self) -> bool:
        return True

    def can_fua(self) -> bool:
        return True

    def can_extents(self) -> bool:
        return False

    def allocated(self) -> int | None:
        return None

    def pread(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf)
        pos = offset
        w = self.written
        while pos < end:
            blk = pos // BLOCK
            mine = w[blk]
            stop = min(end, (blk + 1) * BLOCK)
            while stop < end and w[stop // BLOCK] == mine:
                stop = min(end, stop + BLOCK)
            view = buf[pos - offset:stop - offset]
            if mine:
                got = os.preadv(self.fd, [view], pos)
                if got < len(view):
                    view[got:] = bytes(len(view) - got)
            else:
                self.inner.pread(view, pos)
            pos = stop

    def extents(self, length: int, offset: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    def _own(self, offset: int, length: int) -> None:
        """Copy the partial edge blocks of a range into the overlay before it is written."""
        for blk in {offset // BLOCK, (offset + length - 1) // BLOCK}:
            if self.written[blk]:
                continue
            start = blk * BLOCK
            n = min(BLOCK, self._size - start)
            if offset <= start and start + n <= offset + length:
                continue  # wholly overwritten: nothing to copy
            old = bytearray(n)
            self.inner.pread(memoryview(old), start)
            os.pwrite(self.fd, old, start)
            self.written[blk] = 1
            self.overlay_bytes += n

    def _mark(self, offset: int, length: int) -> None:
        a, b = offset // BLOCK, (offset + length - 1) // BLOCK
        self.overlay_bytes += BLOCK * self.written[a:b + 1].count(0)
        self.written[a:b + 1] = b"\1" * (b - a + 1)

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> WriteResult:
        if not len(data):
            return None
        with self.lock:
            self._own(offset, len(data))
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
            self._mark(offset, len(data))
        return None

    def write_zeroes(self, length: int, offset: int, fua: bool = False, may_trim: bool = True,
                     fast: bool = False) -> WriteResult:
        if length <= 0:
            return None
        with self.lock:
            self._own(offset, length)
            step = 1 << 20
            for pos in range(offset, offset + length, step):
                n = min(step, offset + length - pos)
                os.pwrite(self.fd, bytes(n), pos)
            self._mark(offset, length)
        return None

    def trim(self, length: int, offset: int, fua: bool = False) -> WriteResult:
        return self.write_zeroes(length, offset, fua)

    def flush(self) -> WriteResult:
        return None  # scratch: nothing is promised to survive the process

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
