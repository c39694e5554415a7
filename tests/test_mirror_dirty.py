"""Dirty map and activity log: what survives a crash, and what a torn or corrupt file turns into."""
from __future__ import annotations

import os

from mirror.dirty import ActivityLog, DirtyMap

MiB = 1 << 20


def test_dirty_map_round_trips_and_counts_the_short_last_region(tmp_path):
    m = DirtyMap(10 * MiB + 4096, 64 << 10, tmp_path / "d")
    m.mark(0, 1)
    m.mark(5 * MiB - 1, 2)  # straddles two regions
    m.mark(10 * MiB, 4096)  # the last, short region
    assert list(m) == [0, 79, 80, 160]
    assert m.dirty_bytes == 3 * (64 << 10) + 4096
    m.save()
    back = DirtyMap.load(10 * MiB + 4096, 64 << 10, tmp_path / "d")
    assert list(back) == [0, 79, 80, 160] and back.count == 4
    back.clear_region(79)
    assert back.next_set(1) == 80 and back.next_set(161) is None


def test_a_corrupt_or_foreign_dirty_map_marks_everything(tmp_path):
    m = DirtyMap(4 * MiB, 64 << 10, tmp_path / "d")
    m.mark(0, 1)
    m.save()
    raw = bytearray((tmp_path / "d").read_bytes())
    slot = len(raw) // 2
    raw[slot + 30] ^= 1  # the only slot written so far (sequence 1)
    (tmp_path / "d").write_bytes(bytes(raw))
    assert DirtyMap.load(4 * MiB, 64 << 10, tmp_path / "d").count == 64
    m.save(force=True)
    assert DirtyMap.load(8 * MiB, 64 << 10, tmp_path / "d").count == 128  # another size: not trusted


def test_a_torn_dirty_map_save_falls_back_to_the_other_slot(tmp_path):
    m = DirtyMap(4 * MiB, 64 << 10, tmp_path / "d")
    m.mark(0, 1)
    m.save()                 # slot 1: {0}
    m.mark(MiB, 1)
    m.save()                 # slot 0: {0, 16}
    assert list(DirtyMap.load(4 * MiB, 64 << 10, tmp_path / "d")) == [0, 16]
    fd = os.open(tmp_path / "d", os.O_RDWR)
    os.pwrite(fd, b"\xff" * 16, 40)  # tear slot 0
    os.close(fd)
    assert list(DirtyMap.load(4 * MiB, 64 << 10, tmp_path / "d")) == [0]


def test_dirty_map_reads_the_single_copy_format_of_earlier_versions(tmp_path):
    import struct

    import xxhash

    bits = bytearray(8)
    bits[0] = 0b101
    body = struct.pack(">8sQQ", b"VDDIRTY1", 4 * MiB, 64 << 10) + bytes(bits)
    (tmp_path / "d").write_bytes(body + xxhash.xxh3_64_digest(body))
    m = DirtyMap.load(4 * MiB, 64 << 10, tmp_path / "d")
    assert list(m) == [0, 2]
    m.mark(MiB, 1)
    assert m.save()  # rewritten in the two-slot format
    assert list(DirtyMap.load(4 * MiB, 64 << 10, tmp_path / "d")) == [0, 2, 16]


def test_a_failed_dirty_map_save_keeps_the_bits_unsaved_and_names_the_file(tmp_path, monkeypatch):
    import errno

    m = DirtyMap(4 * MiB, 64 << 10, tmp_path / "d")
    m.mark(0, 1)
    assert m.save()
    m.mark(MiB, 1)
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    assert not m.save()
    assert m.save_error is not None and str(tmp_path / "d") in m.save_error and "No space" in m.save_error
    monkeypatch.setattr(os, "pwrite", real)
    assert m.save()  # not forced: the failed save left the map marked as unsaved
    assert m.save_error is None
    assert list(DirtyMap.load(4 * MiB, 64 << 10, tmp_path / "d")) == [0, 16]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp file, ever


def test_dirty_marks_call_the_hook_only_for_new_bits(tmp_path):
    m = DirtyMap(4 * MiB, 64 << 10)
    calls = []
    m.on_mark = lambda: calls.append(1)
    m.mark(0, 1)
    m.mark(100, 1)  # same region: nothing new
    m.mark_region(0)
    m.mark_region(5)
    assert len(calls) == 2


def test_activity_log_imbalance_raises_instead_of_flooring(tmp_path):
    import pytest

    from mirror.dirty import ActivityLogImbalance

    al = ActivityLog(tmp_path / "al", extent=MiB, capacity=8)
    al.begin(0, 4096)
    al.begin(4096, 4096)
    al.end_many([(0, 4096), (4096, 4096)])
    assert al.in_flight(0) == 0
    with pytest.raises(ActivityLogImbalance):
        al.end(0, 4096)


def test_activity_log_keeps_extents_whose_map_could_not_be_saved(tmp_path):
    al = ActivityLog(tmp_path / "al", extent=MiB, capacity=8, before_evict=lambda: False)
    al.begin(0, 1)
    al.end(0, 1)
    al.clear()  # the map save failed: the extent must stay the durable record
    assert ActivityLog.logged(tmp_path / "al", MiB) == [0]
    assert ActivityLog.logged(tmp_path / "missing", MiB) == []


def test_activity_log_recovers_the_extents_hot_at_a_crash(tmp_path):
    al = ActivityLog(tmp_path / "al", extent=4 * MiB, capacity=8)
    al.begin(0, 4096)
    al.begin(9 * MiB, 8 * MiB)  # extents 2, 3 and 4
    al.end(0, 4096)
    al.close()  # a crash: never cleared
    again = ActivityLog(tmp_path / "al", extent=4 * MiB, capacity=8)
    assert sorted(again.recover()) == [0, 2, 3, 4]
    again.clear()
    assert ActivityLog(tmp_path / "al", extent=4 * MiB, capacity=8).recover() == []


def test_a_torn_activity_log_write_falls_back_to_the_previous_slot(tmp_path):
    al = ActivityLog(tmp_path / "al", extent=4 * MiB, capacity=8)
    al.begin(0, 1)           # slot 1: [0]
    al.begin(4 * MiB, 1)     # slot 0: [0, 1]
    fd = os.open(tmp_path / "al", os.O_RDWR)
    os.pwrite(fd, b"\xff" * 16, 20)  # tear slot 0
    os.close(fd)
    assert ActivityLog(tmp_path / "al", extent=4 * MiB, capacity=8).recover() == [0]


def test_activity_log_evicts_only_idle_extents_after_saving_the_dirty_map(tmp_path):
    saved = []
    al = ActivityLog(tmp_path / "al", extent=MiB, capacity=2, before_evict=lambda: saved.append(1) or True)
    al.begin(0, 1)             # extent 0 stays in flight
    al.begin(MiB, 1)
    al.end(MiB, 1)
    al.begin(2 * MiB, 1)       # over capacity: extent 1 (idle) leaves, extent 0 (busy) stays
    assert saved == [1]
    assert sorted(ActivityLog(tmp_path / "al", extent=MiB, capacity=2).recover()) == [0, 2]
    assert al.writes == 3      # one fdatasync per newly hot extent, none for repeats
    al.begin(0, 1)
    assert al.writes == 3


def test_an_activity_log_too_full_to_list_its_extents_records_the_whole_volume(tmp_path):
    # Evictions keep failing (the map cannot be saved): more hot extents than a slot holds.
    al = ActivityLog(tmp_path / "al", extent=MiB, capacity=1, before_evict=lambda: False)
    for e in range(5):
        al.begin(e * MiB, 1)
        al.end(e * MiB, 1)
    assert ActivityLog.logged(tmp_path / "al", MiB, capacity=1) == [ActivityLog.ALL]



def test_an_activity_log_that_cannot_be_allocated_refuses_admissions_instead_of_losing_them(tmp_path, monkeypatch):
    import errno

    import pytest

    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    al = ActivityLog(tmp_path / "al", extent=MiB, capacity=8)  # a full disk: no exception here
    with pytest.raises(OSError):
        al.begin(0, 4096)  # the write is refused: it could not be recorded
    assert al.in_flight(0) == 0  # and nothing was admitted
    monkeypatch.setattr(os, "pwrite", real)
    al.begin(0, 4096)  # room again
    assert ActivityLog.logged(tmp_path / "al", MiB, capacity=8) == [0]


def test_pinned_regions_are_clear_in_memory_but_saved_dirty_until_unpinned(tmp_path):
    path = tmp_path / "map"
    m = DirtyMap(1 << 20, 64 << 10, path)
    m.mark(0, 256 << 10)  # regions 0..3
    m.pin(0, 1)
    assert m.count == 2 and m.pinned_count == 2 and m.next_set(0) == 2
    m.save()
    assert DirtyMap.load(1 << 20, 64 << 10, path).count == 4  # a crash sends the pinned ones again
    m.mark(0, 1)  # written again after it was read: dirty and still pinned
    m.unpin(0, 1)  # committed
    assert m.count == 3 and m.pinned_count == 0
    m.pin(2, 3)
    m.unpin(2, 3, remark=True)  # the replica lost them
    assert sorted(m) == [0, 2, 3]
    m.save()
    assert sorted(DirtyMap.load(1 << 20, 64 << 10, path)) == [0, 2, 3]
