"""Online verify and delta repair: a Merkle tree of xxh3-128 block digests built on both sides.

Leaves are the digests of fixed blocks (the dirty-map region size, so a differing leaf is exactly one
region to resend, unless the volume is so large that leaves must grow: see ``leaf_for``); each parent
is the digest of up to FANOUT child digests. The source walks down from the root asking the target
only for the children of nodes that differ, so a clean volume costs one 16-byte digest on the wire
and k differing blocks cost O(k * FANOUT * depth) digests.

Bounded work (the target hashes on a peer's request): a tree has at most MAX_LEAVES leaves (16 MiB
of leaf digests, whatever the volume size), leaves are powers of two from MIN_LEAF to MAX_LEAF, and
a leaf larger than CHUNK is the digest of its CHUNK pieces' digests, so hashing never holds more than
one CHUNK of data. Holes are hashed without reading them (SEEK_DATA extents).
"""
from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
import xxhash

from blockdev.backend import EXTENT_HOLE, Backend

FANOUT = 64
DIGEST = 16
CHUNK = 8 << 20
QUERY_BATCH = 4096
MIN_LEAF = 4096
MAX_LEAF = 1 << 30
MAX_LEAVES = 1 << 20  # 64 KiB leaves up to 64 GiB volumes; 1 MiB leaves at 1 TiB; 1 GiB at 1 PiB
_h = xxhash.xxh3_128_digest


class Abandoned(Exception):
    """Hashing stopped because its ``stop`` event was set (the session that asked has ended)."""


def check_leaf(size: int, leaf: int) -> None:
    """ValueError unless ``leaf`` is a power of two in [MIN_LEAF, MAX_LEAF] giving <= MAX_LEAVES leaves."""
    if leaf < MIN_LEAF or leaf > MAX_LEAF or leaf & (leaf - 1):
        raise ValueError(f"bad verify leaf size {leaf}: a power of two from {MIN_LEAF} to {MAX_LEAF}")
    if (size + leaf - 1) // leaf > MAX_LEAVES:
        raise ValueError(f"verify leaf size {leaf} gives more than {MAX_LEAVES} leaves for {size} bytes")


def leaf_for(size: int, leaf: int) -> int:
    """The smallest leaf >= ``leaf`` (doubling) that keeps a volume of ``size`` within MAX_LEAVES."""
    while (size + leaf - 1) // leaf > MAX_LEAVES:
        leaf *= 2
    return leaf


def tree_height(size: int, leaf: int) -> int:
    """Index of the root level for a volume of ``size`` bytes."""
    n, top = (size + leaf - 1) // leaf, 0
    while n > 1:
        n = (n + FANOUT - 1) // FANOUT
        top += 1
    return top


def leaf_digests(image: Backend, size: int, leaf: int, stop: threading.Event | None = None,
                 progress: Callable[[int], object] | None = None) -> bytearray:
    """Digest of every block; holes are hashed without reading them. Raises Abandoned once ``stop``
    is set (checked every CHUNK), so a worker thread hashing for a closed session ends soon."""
    check_leaf(size, leaf)
    count = (size + leaf - 1) // leaf
    out = bytearray(count * DIGEST)
    chunk = min(CHUNK // leaf * leaf, CHUNK) or CHUNK  # whole leaves per chunk, or CHUNK pieces of a leaf
    buf = bytearray(chunk)
    view = memoryview(buf)
    zero_chunk = _h(bytes(chunk))
    zero_leaf = _h(bytes(leaf)) if leaf <= CHUNK else _h(zero_chunk * (leaf // CHUNK))
    pieces = bytearray()  # leaf > CHUNK: the digests of this leaf's pieces so far
    pos = 0
    while pos < size:
        if stop is not None and stop.is_set():
            raise Abandoned("verify abandoned")
        if progress is not None:
            progress(pos)  # bytes hashed so far (`vdisk verify`'s progress bar)
        if pos % leaf == 0:
            # Whole leaves of a hole in one step (one SEEK_DATA): hashing a sparse volume costs its
            # extents and leaves, not its size / CHUNK.
            runs = image.extents(size - pos, pos)
            holes = runs[0][0] // leaf if runs and runs[0][1] & EXTENT_HOLE else 0
            if holes > 1:
                i = pos // leaf * DIGEST
                out[i:i + holes * DIGEST] = zero_leaf * holes
                pos += holes * leaf
                continue
        n = min(chunk, size - pos)
        runs = image.extents(n, pos)
        hole = bool(runs) and runs[0][0] >= n and bool(runs[0][1] & EXTENT_HOLE)
        if leaf > CHUNK:
            pieces += zero_chunk if hole and n == chunk else _h(bytes(n)) if hole else _piece(image, view, n, pos)
            if (pos + n) % leaf == 0 or pos + n == size:
                i = pos // leaf * DIGEST
                out[i:i + DIGEST] = _h(pieces)
                pieces.clear()
        elif hole:
            full, tail = divmod(n, leaf)
            i = pos // leaf * DIGEST
            out[i:i + full * DIGEST] = zero_leaf * full
            if tail:
                out[i + full * DIGEST:i + (full + 1) * DIGEST] = _h(bytes(tail))
        else:
            _hash_chunk(image, view, out, runs, n, pos, leaf, zero_leaf)
        pos += n
    return out


def _hash_chunk(image: Backend, view: memoryview, out: bytearray, runs: list[tuple[int, int]], n: int,
                pos: int, leaf: int, zero_leaf: bytes) -> None:
    """Leaves of one chunk (leaf <= CHUNK): runs of hole leaves get the zero digest without a read,
    each run of leaves touching data is read with one pread. What ``runs`` do not cover is data."""
    count = (n + leaf - 1) // leaf
    data = bytearray(count)  # 1: the leaf must be read
    covered = 0
    for length, flags in runs:
        if not flags & EXTENT_HOLE and length:
            first, last = covered // leaf, (covered + length - 1) // leaf
            data[first:last + 1] = b"\1" * (last - first + 1)
        covered += length
    if covered < n:
        data[covered // leaf:] = b"\1" * (count - covered // leaf)
    base = pos // leaf * DIGEST
    j = 0
    while j < count:
        k = j
        while k < count and data[k] == data[j]:
            k += 1
        a, b = j * leaf, min(k * leaf, n)
        if data[j]:
            image.pread(view[a:b], pos + a)
            for off in range(a, b, leaf):
                i = base + off // leaf * DIGEST
                out[i:i + DIGEST] = _h(view[off:min(off + leaf, b)])
        else:
            full = (b - a) // leaf
            out[base + j * DIGEST:base + (j + full) * DIGEST] = zero_leaf * full
            if (b - a) % leaf:  # the volume's last, short leaf
                out[base + (j + full) * DIGEST:base + (j + full + 1) * DIGEST] = _h(bytes((b - a) % leaf))
        j = k


def _piece(image: Backend, view: memoryview, n: int, pos: int) -> bytes:
    image.pread(view[:n], pos)
    return _h(view[:n])


class MerkleTree:
    """levels[0] = leaf digests, levels[-1] = the root; each a bytes-like of 16-byte digests."""

    def __init__(self, leaves: bytes | bytearray) -> None:
        self.levels: list[bytes | bytearray] = [leaves]
        level = leaves
        while len(level) > DIGEST:
            step = FANOUT * DIGEST
            level = b"".join(_h(level[i:i + step]) for i in range(0, len(level), step))
            self.levels.append(level)

    @property
    def top(self) -> int:
        return len(self.levels) - 1

    def count(self, level: int) -> int:
        """Nodes at ``level`` (0 for a level the tree does not have)."""
        return len(self.levels[level]) // DIGEST if 0 <= level < len(self.levels) else 0

    def node(self, level: int, i: int) -> bytes:
        return bytes(self.levels[level][i * DIGEST:(i + 1) * DIGEST])

    def nodes(self, level: int, indices: list[int] | tuple[int, ...]) -> bytes:
        """The digests of ``indices`` at ``level``; ValueError for a level or index the tree lacks."""
        count = self.count(level)
        if any(not 0 <= i < count for i in indices):
            raise ValueError(f"verify query outside the tree (level {level} has {count} nodes)")
        lv = self.levels[level]
        return b"".join(lv[i * DIGEST:(i + 1) * DIGEST] for i in indices)

    def children(self, level: int, i: int) -> range:
        """Indices at ``level - 1`` under node ``i`` of ``level``."""
        count = len(self.levels[level - 1]) // DIGEST
        return range(i * FANOUT, min((i + 1) * FANOUT, count))


def build_tree(image: Backend, size: int, leaf: int, stop: threading.Event | None = None,
               progress: Callable[[int], object] | None = None) -> MerkleTree:
    tree = MerkleTree(leaf_digests(image, size, leaf, stop, progress))
    if progress is not None:
        progress(size)
    return tree


@dataclass(frozen=True)
class VerifyReport:
    """Differing byte ranges (merged), and how much verify put on the wire. ``differing_blocks`` are
    in units of ``leaf_size`` (the block size the caller asked for, e.g. a dirty-map region) even when
    the tree was built with larger leaves (``tree_leaf``, see ``leaf_for``)."""

    ranges: list[tuple[int, int]]
    differing_blocks: list[int]
    digests_exchanged: int
    leaf_size: int
    local_hash_seconds: float
    tree_leaf: int = 0

    @property
    def differing_bytes(self) -> int:
        return sum(n for _, n in self.ranges)


Query = Callable[[int, int, list[int]], Awaitable[bytes]]


async def compare(image: Backend, size: int, leaf: int, query: Query,
                  progress: Callable[[int], object] | None = None) -> VerifyReport:
    """Walk both trees from the root; ``query(leaf, level, indices)`` asks the target for digests.
    ``leaf`` is the finest block wanted; a volume over MAX_LEAVES of them is hashed in larger leaves."""
    block, leaf = leaf, leaf_for(size, leaf)
    t0 = trio.current_time()
    tree = await trio.to_thread.run_sync(build_tree, image, size, leaf, None, progress)
    hashed = trio.current_time() - t0
    top = tree.top
    exchanged = 1
    diff = [0] if await query(leaf, top, [0]) != tree.node(top, 0) else []
    for level in range(top - 1, -1, -1):
        kids = [c for i in diff for c in tree.children(level + 1, i)]
        if not kids:
            break
        remote = b"".join([await query(leaf, level, kids[j:j + QUERY_BATCH])
                           for j in range(0, len(kids), QUERY_BATCH)])
        exchanged += len(kids)
        local = tree.nodes(level, kids)
        diff = [k for n, k in enumerate(kids) if remote[n * DIGEST:(n + 1) * DIGEST] != local[n * DIGEST:(n + 1) * DIGEST]]
    if top == 0:
        diff = diff and [0]
    ranges: list[tuple[int, int]] = []
    for b in diff:
        off, n = b * leaf, min(leaf, size - b * leaf)
        if ranges and ranges[-1][0] + ranges[-1][1] == off:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + n)
        else:
            ranges.append((off, n))
    ratio, blocks = leaf // block, (size + block - 1) // block
    differing = [k for b in diff for k in range(b * ratio, min((b + 1) * ratio, blocks))]
    return VerifyReport(ranges, differing, exchanged, block, hashed, leaf)
