"""What a resync reads from the volume: pure helpers over an image and a dirty map (no locks, no
trio), used by the sync replicator and, later, by the async one's catch-up."""
from __future__ import annotations

from blockdev.backend import EXTENT_HOLE, Backend

from .dirty import DirtyMap

_ZEROS = bytes(1 << 20)


def mark_allocated(image: Backend, size: int, dirty: DirtyMap) -> None:
    """Mark every allocated region (a brand-new sparse replica needs only those; holes are zero on both)."""
    pos = 0
    while pos < size:
        runs = image.extents(size - pos, pos)
        if not runs:
            break
        for length, flags in runs:
            if not flags & EXTENT_HOLE:
                dirty.mark(pos, length)
            pos += length


def chunk(dirty: DirtyMap, first: int, chunk_bytes: int, size: int) -> tuple[int, int, int, int]:
    """Contiguous dirty regions from ``first``, up to one chunk: (first, last, offset, length)."""
    last = first
    limit = first + max(1, chunk_bytes // dirty.region)
    while last + 1 < min(limit, dirty.regions) and dirty.test(last + 1):
        last += 1
    offset = first * dirty.region
    return first, last, offset, min((last + 1) * dirty.region, size) - offset


def read_frames(image: Backend, offset: int, length: int) -> list[tuple[int, int, memoryview | None]]:
    """(offset, length, data or None for zeroes) covering a range, merged. Zero runs go as zero
    frames (a few bytes on the wire): even a brand-new replica may hold data there by now."""
    out: list[tuple[int, int, memoryview | None]] = []
    pos, end = offset, offset + length
    while pos < end:
        runs = image.extents(end - pos, pos) or [(end - pos, 0)]
        for n, flags in runs:
            n = min(n, end - pos)
            if flags & EXTENT_HOLE:
                data: memoryview | None = None
            else:
                buf = memoryview(bytearray(n))
                image.pread(buf, pos)
                data = None if buf == memoryview(_ZEROS)[:n] else buf
            if out and (out[-1][2] is None) == (data is None) and out[-1][0] + out[-1][1] == pos:
                o, m, prev = out[-1]
                out[-1] = (o, m + n, None if data is None else memoryview(bytes(prev) + bytes(data)))
            else:
                out.append((pos, n, data))
            pos += n
    return out
