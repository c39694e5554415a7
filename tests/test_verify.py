"""Merkle leaves: sparse-aware hashing equals hashing every byte, for any layout of data and holes."""
from __future__ import annotations

import os
import random

import pytest
import xxhash

from blockdev.volume import VolumeStore
from mirror import verify

_h = xxhash.xxh3_128_digest


def reference(raw: bytes, leaf: int) -> bytes:
    """Read everything: a leaf's digest, or (leaf > CHUNK) the digest of its CHUNK pieces' digests."""
    size, out = len(raw), []
    for o in range(0, size, leaf):
        if leaf <= verify.CHUNK:
            out.append(_h(raw[o:o + leaf]))
        else:
            end = min(o + leaf, size)
            out.append(_h(b"".join(_h(raw[p:min(p + verify.CHUNK, end)]) for p in range(o, end, verify.CHUNK))))
    return b"".join(out)


@pytest.mark.parametrize("seed", range(6))
def test_leaf_digests_of_a_sparse_image_equal_hashing_every_byte(tmp_path, seed):
    rng = random.Random(seed)
    store = VolumeStore(tmp_path)
    size = rng.choice([64 << 10, 5 << 20, 17 << 20]) + rng.choice([0, 512, 4096])
    store.create("v", size)
    img = store.open_image("v")
    try:
        for _ in range(rng.randint(0, 10)):
            off = rng.randrange(size - 1)
            n = min(rng.randint(1, 2 << 20), size - off)
            img.pwrite(rng.randbytes(n) if rng.random() < 0.8 else bytes(n), off)
        raw = os.pread(img._fd, size, 0)
        for leaf in (4096, 65536, 1 << 20, 16 << 20):
            assert bytes(verify.leaf_digests(img, size, leaf)) == reference(raw, leaf), leaf
    finally:
        img.close()


def test_leaf_bounds():
    assert verify.leaf_for(64 << 30, 65536) == 65536
    assert verify.leaf_for((64 << 30) + 1, 65536) == 128 << 10
    assert verify.leaf_for(1 << 50, 65536) == 1 << 30
    for bad in (2048, 65537, 2 << 30):
        with pytest.raises(ValueError):
            verify.check_leaf(1 << 20, bad)
    with pytest.raises(ValueError, match="more than"):
        verify.check_leaf(128 << 30, 4096)


def test_hashing_a_huge_sparse_volume_costs_its_extents_not_its_size(tmp_path):
    size = 8 << 40  # 2^20 leaves of 8 MiB; a per-chunk walk would make a million extent queries
    store = VolumeStore(tmp_path)
    store.create("v", size)
    img = store.open_image("v")
    calls = []

    class Counting:
        def extents(self, length, offset):
            calls.append(offset)
            return img.extents(length, offset)

        def pread(self, buf, offset):
            img.pread(buf, offset)

    try:
        img.pwrite(b"x" * 4096, 3 << 40)
        leaf = verify.leaf_for(size, 65536)
        digests = verify.leaf_digests(Counting(), size, leaf)
    finally:
        img.close()
    assert len(calls) < 20
    zero = _h(bytes(leaf))
    hot = (3 << 40) // leaf
    assert digests[hot * 16:(hot + 1) * 16] == _h(b"x" * 4096 + bytes(leaf - 4096))
    assert digests[:hot * 16] == zero * hot and digests[(hot + 1) * 16:] == zero * ((size // leaf) - hot - 1)
