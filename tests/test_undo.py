"""mirror/undo.py: an async unit is applied atomically at the target, and DR readers see only
committed checkpoints."""
from __future__ import annotations

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from blockdev.image.file import FileImage
from mirror.undo import BLOCK, CommittedView, UndoLog

SIZE = 64 * BLOCK + 512  # a short last block too


def make(tmp, name="r"):
    path = tmp / f"{name}.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return FileImage(path), UndoLog(tmp / f"{name}.mirror-undo", SIZE)


def content(img) -> bytes:
    buf = bytearray(SIZE)
    img.pread(memoryview(buf), 0)
    return bytes(buf)


def apply(img, undo, ops):
    """What the target does per batch: save the old content, then write."""
    undo.save(img, undo.uncovered([(o, n) for _k, o, n, _d in ops]))
    for kind, o, n, d in ops:
        if kind == "w":
            img.pwrite(d, o)
        else:
            img.write_zeroes(n, o, may_trim=True)


ops_strategy = st.lists(
    st.tuples(st.sampled_from(["w", "z"]), st.integers(0, SIZE // 512 - 1), st.integers(1, 40), st.integers(1, 255)),
    min_size=1, max_size=12)


def realize(raw):
    out = []
    for kind, sector, count, byte in raw:
        o = sector * 512
        n = min(count * 512, SIZE - o)
        out.append((kind, o, n, bytes([byte]) * n))
    return out


@settings(max_examples=60, deadline=None)
@given(base=ops_strategy, unit=st.lists(ops_strategy, min_size=1, max_size=3), crash=st.booleans())
def test_rollback_restores_the_base_checkpoint_exactly(tmp_path_factory, base, unit, crash):
    tmp = tmp_path_factory.mktemp("u")
    img, undo = make(tmp)
    for kind, o, n, d in realize(base):
        (img.pwrite(d, o) if kind == "w" else img.write_zeroes(n, o))
    before = content(img)
    undo.begin((3, 33))
    view = CommittedView(img, undo)
    for batch in unit:
        apply(img, undo, realize(batch))
        buf = bytearray(SIZE)
        view.pread(memoryview(buf), 0)
        assert bytes(buf) == before  # a DR reader sees the committed checkpoint, never the unit
    if crash:  # the target dies: a new process finds the log and rolls back
        undo.close()
        img.close()
        img, undo = make_again(tmp)
        assert undo.recover(img, (3, 33)) >= 0
    else:
        undo.rollback(img)
    assert content(img) == before
    img.close()
    undo.close()


def make_again(tmp):
    return FileImage(tmp / "r.img"), UndoLog(tmp / "r.mirror-undo", SIZE)


def test_a_committed_unit_is_never_rolled_back(tmp_path):
    img, undo = make(tmp_path)
    undo.begin((1, 10))
    apply(img, undo, [("w", 0, BLOCK, b"a" * BLOCK)])
    undo.commit((2, 20))
    after = content(img)
    apply(img, undo, [("w", BLOCK, BLOCK, b"b" * BLOCK)])
    undo.close()
    # Checkpoint 3's record was written, the target died before it emptied the log: stale, dropped.
    assert UndoLog(tmp_path / "r.mirror-undo", SIZE).recover(img, (3, 30)) == 0
    assert content(img)[BLOCK:2 * BLOCK] == b"b" * BLOCK
    # Base 2 is the committed checkpoint: rolled back to it.
    img2, undo2 = make_again(tmp_path)
    undo2.begin((2, 20))
    apply(img2, undo2, [("w", 0, BLOCK, b"c" * BLOCK)])
    undo2.close()
    assert UndoLog(tmp_path / "r.mirror-undo", SIZE).recover(img2, (2, 20)) == BLOCK
    assert content(img2)[:BLOCK] == after[:BLOCK]


def test_a_torn_tail_is_cut_and_what_precedes_it_rolled_back(tmp_path):
    img, undo = make(tmp_path)
    img.pwrite(b"o" * (8 * BLOCK), 0)
    before = content(img)
    undo.begin((5, 50))
    apply(img, undo, [("w", 0, BLOCK, b"x" * BLOCK)])
    undo.save(img, undo.uncovered([(4 * BLOCK, BLOCK)]))  # its replica write never happened
    undo.close()
    path = tmp_path / "r.mirror-undo"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)  # the second record's payload cut by the crash
    assert UndoLog(path, SIZE).recover(img, (5, 50)) == BLOCK
    assert content(img) == before


def test_holes_come_back_as_holes(tmp_path):
    img, undo = make(tmp_path)
    undo.begin((1, 10))
    apply(img, undo, [("w", 8 * BLOCK, 16 * BLOCK, b"d" * 16 * BLOCK)])
    assert undo.saved_bytes == 0  # a fresh replica: nothing but "was a hole"
    undo.rollback(img)
    assert content(img) == bytes(SIZE)
    assert os.stat(tmp_path / "r.img").st_blocks == 0


def test_view_extents_never_call_a_unit_block_a_hole(tmp_path):
    img, undo = make(tmp_path)
    img.pwrite(b"k" * BLOCK, 0)
    undo.begin((1, 10))
    view = CommittedView(img, undo)
    apply(img, undo, [("z", 0, BLOCK, b"")])
    assert all(flags == 0 for _n, flags in view.extents(BLOCK, 0))
    buf = bytearray(BLOCK)
    view.pread(memoryview(buf), 0)
    assert bytes(buf) == b"k" * BLOCK


def test_large_random_unit_reads_and_rolls_back(tmp_path):
    rng = random.Random(5)
    img, undo = make(tmp_path)
    for b in range(0, 64, 3):
        img.pwrite(rng.randbytes(BLOCK), b * BLOCK)
    before = content(img)
    undo.begin((7, 70))
    view = CommittedView(img, undo)
    for _ in range(20):
        ops = []
        for _ in range(rng.randint(1, 6)):
            o = rng.randrange(0, SIZE // 512) * 512
            n = min(rng.randint(1, 24) * 512, SIZE - o)
            ops.append(("w", o, n, rng.randbytes(n)) if rng.random() < 0.8 else ("z", o, n, b""))
        apply(img, undo, ops)
        off = rng.randrange(0, SIZE // 512) * 512
        n = min(rng.randint(1, 40) * 512, SIZE - off)
        buf = bytearray(n)
        view.pread(memoryview(buf), off)
        assert bytes(buf) == before[off:off + n]
    undo.rollback(img)
    assert content(img) == before


def test_a_read_only_serve_of_a_replica_whose_target_died_mid_unit_reads_the_checkpoint(tmp_path):
    # The target died mid-unit (its undo log pending, base = the committed checkpoint) and is not
    # running: `vdisk serve REPLICA --read-only` reads as of the checkpoint, not the torn image.
    import json
    import subprocess
    import sys

    import nbd

    from blockdev.volume import VolumeStore
    from mirror.undo import committed_view

    store = VolumeStore(tmp_path)
    store.create("rep", SIZE - 512, extra={"replica": {"source_uuid": "u", "source_name": "rep"}})
    size = SIZE - 512
    img = store.open_image("rep")
    img.pwrite(b"c" * (4 * BLOCK), 0)
    (tmp_path / "rep.mirror-checkpoint").write_text(json.dumps({"id": 9, "time_ns": 90}))
    undo = UndoLog(tmp_path / "rep.mirror-undo", size)
    undo.begin((9, 90))
    apply(img, undo, [("w", BLOCK, 2 * BLOCK, b"n" * (2 * BLOCK)), ("w", 40 * BLOCK, BLOCK, b"n" * BLOCK)])
    undo.close()  # killed: the log stays, the image holds half of the next checkpoint
    img.close()
    view = committed_view(tmp_path, "rep", store.open_image("rep"), size)
    buf = bytearray(size)
    view.pread(memoryview(buf), 0)
    assert bytes(buf[:4 * BLOCK]) == b"c" * (4 * BLOCK) and bytes(buf[40 * BLOCK:41 * BLOCK]) == bytes(BLOCK)
    view.close()
    sock = tmp_path / "r.sock"
    p = subprocess.Popen([sys.executable, "-m", "vdisk.cli", "--data-dir", str(tmp_path), "serve", "rep",
                          "--read-only", "--nbd", f"unix:{sock}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert b"serving" in p.stdout.readline()
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///rep?socket={sock}")
        got = h.pread(size, 0)
        h.shutdown()
        assert got[:4 * BLOCK] == b"c" * (4 * BLOCK) and got[40 * BLOCK:41 * BLOCK] == bytes(BLOCK)
    finally:
        p.terminate()
        p.wait(10)
    assert (tmp_path / "rep.mirror-undo").exists()  # still there for the target to roll back


def test_before_the_first_checkpoint_nothing_is_saved_then_units_are(tmp_path):
    # A new replica's initial sync (base checkpoint 0) has no consistent state to return to: no
    # undo space or index memory is spent on it; from the first commit on, units are atomic.
    img, undo = make(tmp_path)
    undo.begin((0, 0))
    apply(img, undo, [("w", 0, 32 * BLOCK, b"i" * 32 * BLOCK)])
    assert not undo.index and os.path.getsize(tmp_path / "r.mirror-undo") == 32
    undo.commit((4, 40))
    before = content(img)
    apply(img, undo, [("w", 8 * BLOCK, 4 * BLOCK, b"u" * 4 * BLOCK)])
    assert undo.index.blocks == 4
    undo.rollback(img)
    assert content(img) == before


def test_index_runs_across_chunks_and_overlapping_frames(tmp_path):
    from mirror.undo import CHUNK_SHIFT, BlockIndex

    ix = BlockIndex()
    edge = 1 << CHUNK_SHIFT
    ix.add(edge - 2, edge + 1, 4096)
    assert ix.free_runs(edge - 4, edge + 3) == [(edge - 4, edge - 3), (edge + 2, edge + 3)]
    assert ix.where(edge) == 4096 + 2 * BLOCK and ix.where(edge + 2) is None
    assert ix.touched(edge + 1, edge + 9) and not ix.touched(edge + 2, edge + 9)
    _img, undo = make(tmp_path)
    undo.begin((1, 1))
    assert undo.uncovered([(0, 3 * BLOCK), (BLOCK, 4 * BLOCK)]) == [(0, 4)]


def test_a_step_saving_thousands_of_separate_runs_is_written_in_iov_sized_pieces(tmp_path):
    """One applied batch may first-touch thousands of separate blocks (a Pack of scattered 4 KiB
    writes): more records than IOV_MAX in one pwritev was EINVAL, which ended the session as a
    target I/O error. Every other block of a 16 MiB replica: 2048 hole records, then 2048 data."""
    size = 4096 * BLOCK
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(size)
    img, undo = FileImage(path), UndoLog(tmp_path / "big.mirror-undo", size)
    undo.begin((1, 10))
    runs = [(b, b) for b in range(0, 4096, 2)]
    undo.save(img, runs)  # holes
    for b, _ in runs:
        img.pwrite(b"x" * BLOCK, b * BLOCK)
    undo.commit((2, 20))
    undo.save(img, runs)  # data: two buffers per record
    for b, _ in runs:
        img.pwrite(b"y" * BLOCK, b * BLOCK)
    assert undo.rollback(img) == len(runs) * BLOCK
    buf = bytearray(size)
    img.pread(memoryview(buf), 0)
    assert all(buf[b * BLOCK:(b + 1) * BLOCK] == (b"x" * BLOCK if b % 2 == 0 else bytes(BLOCK)) for b in range(4096))
