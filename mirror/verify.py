"""Online verify and delta repair: a Merkle tree of xxh3-128 block digests built on both sides.

Leaves are the digests of fixed blocks (the dirty-map region size, so a differing leaf is exactly one
region to resend); each parent is the digest of up to FANOUT child digests. The source walks down
from the root asking the target only for the children of nodes that differ, so a clean volume costs
one 16-byte digest on the wire and k differing blocks cost O(k * FANOUT * depth) digests.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
import xxhash

from blockdev.backend import EXTENT_HOLE, Backend

FANOUT = 64
DIGEST = 16
CHUNK = 8 << 20
QUERY_BATCH = 4096
_h = xxhash.xxh3_128_digest


def tree_height(size: int, leaf: int) -> int:
    """Index of the root level for a volume of ``size`` bytes."""
    n, top = (size + leaf - 1) // leaf, 0
    while n > 1:
        n = (n + FANOUT - 1) // FANOUT
        top += 1
    return top


def leaf_digests(image: Backend, size: int, leaf: int) -> bytes:
    """Digest of every block; holes are hashed without reading them."""
    out = bytearray()
    zero_digest = _h(bytes(leaf))
    chunk = max(leaf, CHUNK // leaf * leaf)
    buf = bytearray(chunk)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        n = min(chunk, size - pos)
        runs = image.extents(n, pos)
        if runs and runs[0][0] >= n and runs[0][1] & EXTENT_HOLE:
            full, tail = divmod(n, leaf)
            out += zero_digest * full
            if tail:
                out += _h(bytes(tail))
        else:
            image.pread(view[:n], pos)
            for off in range(0, n, leaf):
                out += _h(view[off:min(off + leaf, n)])
        pos += n
    return bytes(out)


class MerkleTree:
    """levels[0] = leaf digests, levels[-1] = the root; each a bytes of 16-byte digests."""

    def __init__(self, leaves: bytes) -> None:
        self.levels = [leaves]
        level = leaves
        while len(level) > DIGEST:
            step = FANOUT * DIGEST
            level = b"".join(_h(level[i:i + step]) for i in range(0, len(level), step))
            self.levels.append(level)

    @property
    def top(self) -> int:
        return len(self.levels) - 1

    def node(self, level: int, i: int) -> bytes:
        return self.levels[level][i * DIGEST:(i + 1) * DIGEST]

    def nodes(self, level: int, indices: list[int] | tuple[int, ...]) -> bytes:
        lv = self.levels[level]
        count = len(lv) // DIGEST
        return b"".join(lv[i * DIGEST:(i + 1) * DIGEST] if i < count else bytes(DIGEST) for i in indices)

    def children(self, level: int, i: int) -> range:
        """Indices at ``level - 1`` under node ``i`` of ``level``."""
        count = len(self.levels[level - 1]) // DIGEST
        return range(i * FANOUT, min((i + 1) * FANOUT, count))


def build_tree(image: Backend, size: int, leaf: int) -> MerkleTree:
    return MerkleTree(leaf_digests(image, size, leaf))


@dataclass(frozen=True)
class VerifyReport:
    """Differing byte ranges (merged), and how much verify put on the wire."""

    ranges: list[tuple[int, int]]
    differing_blocks: list[int]
    digests_exchanged: int
    leaf_size: int
    local_hash_seconds: float

    @property
    def differing_bytes(self) -> int:
        return sum(n for _, n in self.ranges)


Query = Callable[[int, int, list[int]], Awaitable[bytes]]


async def compare(image: Backend, size: int, leaf: int, query: Query) -> VerifyReport:
    """Walk both trees from the root; ``query(leaf, level, indices)`` asks the target for digests."""
    t0 = trio.current_time()
    tree = await trio.to_thread.run_sync(build_tree, image, size, leaf)
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
    return VerifyReport(ranges, diff, exchanged, leaf, hashed)
