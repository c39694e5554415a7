"""mirror/history.py: kept units give byte-exact views of past checkpoints, in another process's
view of a target that keeps applying, with retention that respects readers' pins."""
from __future__ import annotations

import json
import os
import random
import time

from blockdev.image.file import FileImage
from mirror.history import History, HistoryView, Pin
from mirror.undo import BLOCK, UndoLog

SIZE = 256 * BLOCK + 512  # a short last block too
NAME = "r"


class FakeTarget:
    """What TargetServer does to a replica, without the wire: save, write, record, commit."""

    def __init__(self, tmp, keep=True) -> None:
        self.tmp = tmp
        path = tmp / f"{NAME}.img"
        with open(path, "wb") as f:
            f.truncate(SIZE)
        self.img = FileImage(path)
        self.undo = UndoLog(tmp / f"{NAME}.mirror-undo", SIZE)
        if keep:
            self.undo.archive = History(tmp, NAME).archive
        self.undo.begin((0, 0))
        self.cp = 0

    def content(self) -> bytes:
        buf = bytearray(SIZE)
        self.img.pread(memoryview(buf), 0)
        return bytes(buf)

    def apply(self, ops) -> None:
        self.undo.save(self.img, self.undo.uncovered([(o, len(d)) for o, d in ops]))
        for o, d in ops:
            if d.count(0) == len(d):
                self.img.write_zeroes(len(d), o, may_trim=True)
            else:
                self.img.pwrite(d, o)

    def commit(self, t_ns: int | None = None, archive: bool = True) -> tuple[int, int]:
        self.img.flush()
        self.cp += 1
        cp = (self.cp, t_ns if t_ns is not None else time.time_ns())
        (self.tmp / f"{NAME}.mirror-checkpoint").write_text(json.dumps({"id": cp[0], "time_ns": cp[1]}))
        if archive:
            self.undo.commit(cp)
        return cp

    def close(self) -> None:
        self.undo.close()
        self.img.close()


def random_ops(rng: random.Random, n: int):
    ops = []
    for _ in range(n):
        o = rng.randrange(0, SIZE // 512) * 512
        ln = min(rng.randrange(1, 40) * 512, SIZE - o)
        d = bytes(ln) if rng.random() < 0.15 else bytes([rng.randrange(1, 256)]) * ln
        ops.append((o, d))
    return ops


def view_bytes(tmp, at: int) -> bytes:
    v = HistoryView(FileImage(tmp / f"{NAME}.img", readonly=True), tmp, NAME, SIZE, at)
    try:
        buf = bytearray(SIZE)
        v.pread(memoryview(buf), 0)
        return bytes(buf)
    finally:
        v.close()


def test_every_kept_checkpoint_reads_back_byte_exact(tmp_path):
    rng = random.Random(7)
    t = FakeTarget(tmp_path)
    t.apply(random_ops(rng, 20))  # initial sync: before the first checkpoint nothing is saved
    states = {}
    cp = t.commit()
    states[cp[0]] = t.content()
    for _ in range(8):
        for _ in range(rng.randrange(1, 4)):
            t.apply(random_ops(rng, rng.randrange(1, 10)))
        cp = t.commit()
        states[cp[0]] = t.content()
    t.apply(random_ops(rng, 10))  # a unit in progress: never visible
    cps = History(tmp_path, NAME).checkpoints()
    assert [c.id for c in cps] == sorted(states)
    for j, want in states.items():
        assert view_bytes(tmp_path, j) == want, j
    t.close()


def test_a_view_stays_exact_while_the_target_keeps_applying_and_committing(tmp_path):
    rng = random.Random(3)
    t = FakeTarget(tmp_path)
    t.apply(random_ops(rng, 10))
    t.commit()
    t.apply(random_ops(rng, 10))
    cp = t.commit()
    want = t.content()
    v = HistoryView(FileImage(tmp_path / f"{NAME}.img", readonly=True), tmp_path, NAME, SIZE, cp[0])
    try:
        for step in range(12):  # units applied, committed (rotations) and in progress under the view
            t.apply(random_ops(rng, 8))
            if step % 3 == 2:
                t.commit()
            for _ in range(5):
                o = rng.randrange(0, SIZE // 512) * 512
                n = min(rng.randrange(1, 64) * 512, SIZE - o)
                buf = bytearray(n)
                v.pread(memoryview(buf), o)
                assert bytes(buf) == want[o:o + n], (step, o, n)
    finally:
        v.close()
    t.close()


def test_a_crash_between_the_checkpoint_record_and_the_archive_keeps_the_unit(tmp_path):
    rng = random.Random(5)
    t = FakeTarget(tmp_path)
    t.apply(random_ops(rng, 5))
    t.commit()
    t.apply(random_ops(rng, 5))
    first = t.commit()
    want = t.content()
    t.apply(random_ops(rng, 5))
    second = t.commit(archive=False)  # recorded, then killed before the log was archived
    t.close()
    undo = UndoLog(tmp_path / f"{NAME}.mirror-undo", SIZE)  # the target restarts
    undo.archive = History(tmp_path, NAME).archive
    img = FileImage(tmp_path / f"{NAME}.img")
    assert undo.recover(img, second) == 0
    undo.close()
    img.close()
    assert [c.id for c in History(tmp_path, NAME).checkpoints()][-2:] == [first[0], second[0]]
    assert view_bytes(tmp_path, first[0]) == want


def test_retention_trims_the_oldest_but_never_a_pinned_checkpoint(tmp_path):
    rng = random.Random(9)
    t = FakeTarget(tmp_path)
    t.apply(random_ops(rng, 5))
    now = time.time_ns()
    for k in range(6):
        t.commit(now - (10 - k) * 60 * 10**9)  # one checkpoint a minute, 10..5 minutes ago
        t.apply(random_ops(rng, 5))
    t.commit(now)
    h = History(tmp_path, NAME)
    ids = [c.id for c in h.checkpoints()]
    assert ids == list(range(1, 8))
    pin = Pin(h, 2)
    assert h.prune(7.5 * 60, None, now) == 1  # 3 minutes older than the window, but 2 is pinned
    assert next(c.id for c in h.checkpoints()) == 2
    pin.release()
    assert h.prune(7.5 * 60, None, now) == 2  # 2 and 3 (older than 7 minutes) go now
    assert next(c.id for c in h.checkpoints()) == 4
    total = sum(c.bytes for c in h.checkpoints())
    h.prune(None, total // 2, now)  # by size: the oldest go until it fits
    assert sum(u.bytes for u in h.units()) <= total // 2 + 64 * len(h.units())
    t.close()


def test_a_dead_readers_pin_is_removed(tmp_path):
    h = History(tmp_path, NAME)
    pid = os.fork()
    if pid == 0:  # a reader that dies holding its pin
        Pin(h, 1)
        os._exit(0)
    os.waitpid(pid, 0)
    assert len(list((h.dir / "pins").iterdir())) == 1
    assert h.pinned() is None
    assert not list((h.dir / "pins").iterdir())


def test_listing_an_hour_of_checkpoints_is_instant(tmp_path):
    t = FakeTarget(tmp_path)
    t.apply([(0, b"x" * BLOCK)])
    t.commit()
    for k in range(3600):  # one a second for an hour, a block each
        t.apply([((k % 200) * BLOCK, bytes([k % 250 + 1]) * BLOCK)])
        t.commit()
    start = time.monotonic()
    cps = History(tmp_path, NAME).checkpoints()
    took = time.monotonic() - start
    assert len(cps) == 3601 and took < 1.0, took
    v = HistoryView(FileImage(tmp_path / f"{NAME}.img", readonly=True), tmp_path, NAME, SIZE, cps[0].id)
    buf = bytearray(BLOCK)
    v.pread(memoryview(buf), 0)
    assert bytes(buf) == b"x" * BLOCK
    v.close()
    t.close()


def test_a_damaged_kept_unit_is_reported_not_read_past(tmp_path):
    import pytest

    from mirror.history import NotRecoverable

    rng = random.Random(11)
    t = FakeTarget(tmp_path)
    t.apply(random_ops(rng, 5))
    first = t.commit()
    t.apply([(0, b"n" * BLOCK * 4)])
    t.commit()
    unit = History(tmp_path, NAME).units()[0].path
    data = bytearray(unit.read_bytes())
    data[-5] ^= 0xFF  # bit rot in a kept unit's payload
    unit.write_bytes(bytes(data))
    with pytest.raises(NotRecoverable, match="damaged"):
        view_bytes(tmp_path, first[0])
    t.close()


def test_a_view_survives_the_unit_in_progress_being_rolled_back(tmp_path):
    rng = random.Random(13)
    t = FakeTarget(tmp_path)
    t.apply(random_ops(rng, 10))
    t.commit()
    t.apply(random_ops(rng, 10))
    cp = t.commit()
    want = t.content()
    v = HistoryView(FileImage(tmp_path / f"{NAME}.img", readonly=True), tmp_path, NAME, SIZE, cp[0])
    try:
        for _round in range(3):
            t.apply(random_ops(rng, 12))  # a unit the view follows...
            buf = bytearray(SIZE)
            v.pread(memoryview(buf), 0)
            assert bytes(buf) == want
            t.undo.rollback(t.img)  # ...then the link ends: rolled back, the log emptied in place
            t.apply(random_ops(rng, 30))  # and a new unit grows the log past where it was
            v.pread(memoryview(buf), 0)
            assert bytes(buf) == want
    finally:
        v.close()
    t.close()
