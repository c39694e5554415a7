"""The async mirror's source buffer (mirror/journal.py): what is appended is read back exactly, seqs
are persistent, a crash mid-append is cut cleanly, damage is reported, group commit keeps seq order."""
from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.journal import (
    CHECKPOINT,
    FUA,
    HEADER_SIZE,
    TRIM,
    WRITE,
    ZERO,
    Journal,
    JournalCorrupt,
    JournalGap,
)

ROOT = Path(__file__).resolve().parent.parent
SEG = 8192

ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=5000)),
    st.tuples(st.just("z"), st.integers(0, 1 << 30), st.integers(1, 1 << 40)),
    st.tuples(st.just("c"), st.just(0), st.just(0)),
    st.tuples(st.just("r"), st.just(0), st.just(0)),  # release up to a random retained seq
    st.tuples(st.just("R"), st.just(0), st.just(0)),  # release everything
    st.tuples(st.just("h"), st.integers(1, 6), st.just(0)),  # a held batch of writes
    st.tuples(st.just("o"), st.just(0), st.just(0)),  # reopen
), max_size=50)


def _size(v: tuple) -> int:
    return HEADER_SIZE + (v[3] if v[0] == WRITE else 0)


def _check(j: Journal, model: dict[int, tuple]) -> None:
    got = j.read(j.first_seq, 1 << 40)
    assert [(r.seq, r.kind, r.flags, r.offset, r.length, None if r.data is None else bytes(r.data)) for r in got] == \
        [(k, *v) for k, v in sorted(model.items())]
    assert j.count == len(model) and j.bytes == sum(_size(v) for v in model.values())
    assert j.first_seq == (min(model) if model else j.next_seq)
    assert j.ranges(0) == [(v[2], v[3]) for _k, v in sorted(model.items()) if v[0] != CHECKPOINT]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops, st.randoms(use_true_random=False))
def test_reads_return_exactly_the_retained_records_across_reopens(tmp_path_factory, steps, rnd):
    path = tmp_path_factory.mktemp("j")
    j = Journal.open(path, segment_bytes=SEG)
    model: dict[int, tuple] = {}  # seq -> (kind, flags, offset, length, data)
    expect_next = 1
    for op, a, b in steps:
        if op == "w":
            assert j.append_write(a, b, fua=bool(a & 1)) == expect_next
            model[expect_next] = (WRITE, FUA if a & 1 else 0, a, len(b), b)
            expect_next += 1
        elif op == "z":
            assert j.append_zero(a, b, trim=bool(a & 1)) == expect_next
            model[expect_next] = (ZERO, TRIM if a & 1 else 0, a, b, None)
            expect_next += 1
        elif op == "c":
            assert j.append_checkpoint() == expect_next
            model[expect_next] = (CHECKPOINT, 0, 0, 0, None)
            expect_next += 1
        elif op == "h":
            j.hold()
            for i in range(a):
                data = memoryview(bytes([i]) * (100 + 37 * i))
                assert j.append_write(i << 12, data) == expect_next
                model[expect_next] = (WRITE, 0, i << 12, len(data), bytes(data))
                expect_next += 1
            j.push()
        elif op in "rR" and model:
            upto = rnd.choice(sorted(model)) if op == "r" else expect_next - 1
            j.release(upto)
            model = {k: v for k, v in model.items() if k > upto}
        elif op == "o":
            if rnd.random() < 0.5:
                j.sync()
            j.close()
            j = Journal.open(path, segment_bytes=SEG)
            assert j.recovery["damaged"] is False and j.recovery["torn_bytes"] == 0
            assert j.recovery["records"] == len(model)
        assert j.next_seq == expect_next
    _check(j, model)
    j.close()
    j = Journal.open(path, segment_bytes=SEG)
    _check(j, model)
    assert j.next_seq == expect_next
    assert j.append_checkpoint() == expect_next
    j.close()


def test_sequence_numbers_survive_releasing_everything_and_reset(tmp_path):
    j = Journal.open(tmp_path / "j", segment_bytes=4096)
    for _ in range(20):
        j.append_write(0, b"x" * 1000)
    cp = j.append_checkpoint()
    j.release(cp)
    assert j.count == 0 and j.bytes == 0 and j.first_seq == j.next_seq == cp + 1
    j.close()
    j = Journal.open(tmp_path / "j", segment_bytes=4096)
    assert j.next_seq == cp + 1 and j.first_seq == cp + 1 and j.read(cp + 1) == []
    assert j.append_write(4096, b"y") == cp + 1
    assert j.ranges(0) == [(4096, 1)]
    j.reset()
    assert j.count == 0 and j.bytes == 0 and j.ranges(0) == [] and j.next_seq == cp + 2
    assert not list((tmp_path / "j").glob("*.seg"))
    j.close()
    j = Journal.open(tmp_path / "j", segment_bytes=4096)
    assert j.next_seq == cp + 2 and j.count == 0 and not j.recovery["damaged"]
    assert j.append_checkpoint() == cp + 2
    j.close()


def test_released_records_are_not_resurrected_by_a_restart(tmp_path):
    j = Journal.open(tmp_path / "j")
    for i in range(10):
        j.append_write(i, b"z" * 10)
    j.release(6)
    j.close()  # no sync: the state slot is in the page cache, which a process restart keeps
    j = Journal.open(tmp_path / "j")
    assert [r.seq for r in j.read(0 + 7)] == [7, 8, 9, 10] and j.first_seq == 7
    with pytest.raises(JournalGap):
        j.read(6)
    j.close()


def test_release_deletes_whole_segments_but_keeps_the_newest(tmp_path):
    d = tmp_path / "j"
    j = Journal.open(d, segment_bytes=4096)
    for i in range(12):
        j.append_write(i * 4096, bytes([i]) * 2000)  # one record a segment (2048 bytes each, two fit)
    names = sorted(p.name for p in d.glob("*.seg"))
    assert len(names) == 6 and j.statistics()["segments"] == 6
    j.release(5)
    assert sorted(p.name for p in d.glob("*.seg")) == names[2:]  # seqs 5, 6 share a segment with 6
    j.release(12)
    assert sorted(p.name for p in d.glob("*.seg")) == names[-1:] and j.count == 0
    j.append_write(0, b"a" * 3000)  # does not fit: a new segment, the released one goes
    assert sorted(p.name for p in d.glob("*.seg")) == [f"{13:020d}.seg"]
    j.close()


def test_a_record_larger_than_a_segment_goes_alone(tmp_path):
    j = Journal.open(tmp_path / "j", segment_bytes=4096)
    j.append_write(0, b"s")
    j.append_write(0, b"L" * 10000)
    j.append_write(0, b"t")
    assert j.statistics()["segments"] == 3
    assert [r.length for r in j.read(1, 0)] == [1]  # at least one record, even with no budget
    assert [r.length for r in j.read(2, 100)] == [10000]  # at least one, even if bigger than the budget
    assert [r.length for r in j.read(1, 1 << 20)] == [1, 10000, 1]
    j.close()


def test_read_is_bounded_by_max_bytes(tmp_path):
    j = Journal.open(tmp_path / "j", segment_bytes=1 << 20)
    for i in range(100):
        j.append_write(i, b"q" * 952)  # 1000 bytes a record
    assert len(j.read(1, 10_000)) == 10 and len(j.read(1, 10_999)) == 10 and len(j.read(95, 1 << 20)) == 6
    assert j.read(101) == []
    j.close()


def test_find_and_oldest_time(tmp_path):
    j = Journal.open(tmp_path / "j")
    before = time.time_ns()
    j.append_write(0, b"a")
    cp = j.append_checkpoint()
    j.append_zero(4096, 8192, trim=True)
    rec = j.find(cp)
    assert rec is not None and rec.kind == CHECKPOINT and rec.seq == cp and rec.data is None
    assert j.find(99) is None and j.find(0) is None
    t1 = j.oldest_time_ns(1)
    assert t1 is not None and before <= t1 <= j.oldest_time_ns(3) <= time.time_ns()
    assert j.oldest_time_ns(4) is None
    j.release(1)
    assert j.find(1) is None and j.oldest_time_ns(0) == j.find(2).time_ns
    assert j.ranges(0) == [(4096, 8192)] and j.ranges(4) == []
    j.close()


def test_a_corrupted_record_is_refused_on_read(tmp_path):
    d = tmp_path / "j"
    j = Journal.open(d)
    j.append_write(0, b"a" * 100)
    j.append_write(0, b"b" * 100)
    seg = next(d.glob("*.seg"))
    with open(seg, "r+b") as f:
        f.seek(HEADER_SIZE + 100 + HEADER_SIZE + 50)
        f.write(b"X")
    with pytest.raises(JournalCorrupt, match=r"\.seg at offset 148 \(seq 2\)"):
        j.read(1)
    assert j.read(1, 0)[0].data == b"a" * 100
    j.close()


def _three_records(base: Path) -> tuple[Path, bytes, int]:
    j = Journal.open(base)
    j.append_write(0, b"a" * 100)
    j.append_zero(8192, 4096)
    j.append_write(4096, b"b" * 150)
    j.close()
    seg = next(base.glob("*.seg"))
    full = seg.read_bytes()
    return seg, full, len(full) - (HEADER_SIZE + 150)


def test_a_torn_tail_is_cut_at_every_byte_and_appends_continue(tmp_path):
    seg, full, last = _three_records(tmp_path / "base")
    for cut in range(last, len(full)):
        d = tmp_path / f"c{cut}"
        d.mkdir()
        (d / seg.name).write_bytes(full[:cut])
        j = Journal.open(d)
        assert j.count == 2 and j.recovery["torn_bytes"] == cut - last and not j.recovery["damaged"]
        assert (d / seg.name).stat().st_size == last
        assert j.append_write(0, b"c") == 3
        j.close()
        j = Journal.open(d)
        assert [r.seq for r in j.read(1)] == [1, 2, 3] and j.recovery["torn_bytes"] == 0
        j.close()


def test_a_flipped_bit_in_the_last_record_is_cut(tmp_path):
    seg, full, last = _three_records(tmp_path / "base")
    for i in [*range(last, last + HEADER_SIZE), last + HEADER_SIZE, len(full) - 1]:
        for bit in (0, 7):
            d = tmp_path / f"f{i}.{bit}"
            d.mkdir()
            raw = bytearray(full)
            raw[i] ^= 1 << bit
            (d / seg.name).write_bytes(bytes(raw))
            j = Journal.open(d)
            assert j.count == 2 and j.recovery["torn_bytes"] == len(full) - last, (i, bit)
            assert not j.recovery["damaged"] and j.append_checkpoint() == 3
            j.close()


def test_a_flipped_bit_before_the_last_record_of_the_last_segment_is_damage(tmp_path):
    seg, full, _last = _three_records(tmp_path / "base")
    raw = bytearray(full)
    raw[HEADER_SIZE + 10] ^= 4  # the first record's payload: valid records follow it
    (seg.parent / seg.name).write_bytes(bytes(raw))
    j = Journal.open(seg.parent)
    assert j.recovery["damaged"] and j.count == 0 and j.next_seq == 1
    j.close()


def test_a_flipped_bit_in_an_earlier_segment_is_damage(tmp_path):
    d = tmp_path / "j"
    j = Journal.open(d, segment_bytes=4096)
    for i in range(10):
        j.append_write(i * 4096, bytes([i]) * 2000)  # two records a segment
    j.close()
    segs = sorted(d.glob("*.seg"))
    assert len(segs) == 5
    raw = bytearray(segs[1].read_bytes())
    raw[HEADER_SIZE + 2000 + 100] ^= 1  # the second record of the second segment (seq 4)
    segs[1].write_bytes(bytes(raw))
    j = Journal.open(d, segment_bytes=4096)
    assert j.recovery["damaged"] and j.count == 3 and j.next_seq == 4
    assert [r.seq for r in j.read(1)] == [1, 2, 3]
    assert sorted(d.glob("*.seg")) == segs[:2]  # the later segments were dropped
    assert j.append_write(0, b"new") == 4
    j.close()
    j = Journal.open(d, segment_bytes=4096)
    assert not j.recovery["damaged"] and [r.seq for r in j.read(1)] == [1, 2, 3, 4]
    j.close()


def test_a_missing_segment_is_a_gap(tmp_path):
    d = tmp_path / "j"
    j = Journal.open(d, segment_bytes=4096)
    for i in range(8):
        j.append_write(i, b"m" * 2000)
    j.close()
    sorted(d.glob("*.seg"))[1].unlink()
    j = Journal.open(d, segment_bytes=4096)
    assert j.recovery["damaged"] and [r.seq for r in j.read(1)] == [1, 2] and j.next_seq == 3
    assert len(list(d.glob("*.seg"))) == 1
    j.close()


def test_hold_and_push_write_one_batch_in_order(tmp_path):
    j = Journal.open(tmp_path / "j")
    j.hold()
    bufs = [bytearray([i]) * 4096 for i in range(40)]
    for i, b in enumerate(bufs):
        j.append_write(i * 4096, memoryview(b))
    assert j.read(1) == [] and j.count == 40 and j.next_seq == 41  # appended, not yet written
    j.push()
    assert j.statistics()["appended_bytes_total"] == 40 * (HEADER_SIZE + 4096)
    got = [bytes(r.data) for r in j.read(1, 1 << 30)]
    assert got == [bytes(b) for b in bufs]
    j.close()


def test_concurrent_appends_during_a_hold_keep_seq_order_in_the_files(tmp_path):
    d = tmp_path / "j"
    j = Journal.open(d, segment_bytes=256 << 10)
    written: dict[int, bytes] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            for n in range(60):
                j.hold()
                for i in range(32):
                    data = struct.pack(">II", n, i) * 64
                    written[j.append_write(i, memoryview(data))] = data
                j.push()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        stop.set()

    def other(tag: int) -> None:
        try:
            k = 0
            while not stop.is_set():
                data = bytes([tag]) * (64 + k % 700)
                written[j.append_write(tag << 20, data)] = data
                if k % 50 == 0:
                    j.sync()
                k += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=holder)] + [threading.Thread(target=other, args=(t,)) for t in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    n = j.next_seq - 1
    assert sorted(written) == list(range(1, n + 1))
    assert {r.seq: bytes(r.data) for r in j.read(1, 1 << 40)} == written
    j.close()
    # The open scan requires seqs to follow each other in file order: any reordering is damage.
    j = Journal.open(d, segment_bytes=256 << 10)
    assert not j.recovery["damaged"] and not j.recovery["torn_bytes"] and j.recovery["records"] == n
    assert j.statistics()["segments"] > 1
    j.close()


def test_sync_covers_a_batch_held_by_another_thread(tmp_path):
    j = Journal.open(tmp_path / "j")
    j.hold()
    j.append_write(0, b"held")
    t = threading.Thread(target=j.sync)
    t.start()
    t.join()
    assert j.synced_seq == 2 and [r.data for r in j.read(1)] == [b"held"]
    j.push()
    j.close()


def test_reads_run_alongside_appends_and_releases(tmp_path):
    j = Journal.open(tmp_path / "j", segment_bytes=16 << 10)
    done = threading.Event()

    def writer() -> None:
        for i in range(3000):
            j.append_write(i, i.to_bytes(4, "big") * 100)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    pos = 1
    while not done.is_set() or pos < j.next_seq:
        for r in j.read(pos, 8 << 10):
            assert r.seq == pos and bytes(r.data) == (r.seq - 1).to_bytes(4, "big") * 100
            pos = r.seq + 1
        if pos > 1:
            j.release(pos - 1)
    t.join()
    assert pos == 3001 and j.count == 0 and j.statistics()["segments"] == 1
    j.close()


CHILD = r"""
import os, sys
from pathlib import Path
from mirror.journal import Journal
out = int(sys.argv[2])
j = Journal.open(Path(sys.argv[1]), segment_bytes=1 << 16)
rnd = __import__("random").Random(os.getpid())
while True:
    n = rnd.randint(1, 32)
    j.hold()
    for _ in range(n):
        s = j.next_seq
        assert j.append_write(s * 512 % (1 << 20), s.to_bytes(8, "big") * (1 + s % 300)) == s
    j.push()
    if rnd.random() < 0.1:
        j.sync()
    if rnd.random() < 0.05 and j.next_seq > 200:
        j.release(j.next_seq - 200)
    os.write(out, (j.next_seq - 1).to_bytes(8, "big"))  # every append up to here has returned
"""


def test_kill9_mid_append_leaves_a_valid_prefix(tmp_path):
    path = tmp_path / "j"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    last_next = 1
    for _ in range(5):
        r, w = os.pipe()
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(w)], env=env, pass_fds=(w,))
        os.close(w)
        time.sleep(random.uniform(0.4, 1.2))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        reported = b""
        while chunk := os.read(r, 1 << 20):
            reported += chunk
        os.close(r)
        acked = int.from_bytes(reported[-8:], "big") if len(reported) >= 8 else last_next - 1
        j = Journal.open(path, segment_bytes=1 << 16)
        assert not j.recovery["damaged"], j.recovery
        recs = j.read(j.first_seq, 1 << 40)
        seqs = [r.seq for r in recs]
        assert seqs == list(range(j.first_seq, j.next_seq))
        assert all(bytes(r.data) == r.seq.to_bytes(8, "big") * (1 + r.seq % 300) for r in recs)
        # Everything whose append returned survived the kill (page cache); at most one batch more.
        assert acked < j.next_seq <= acked + 33 and j.next_seq >= last_next
        last_next = j.next_seq
        j.close()


def _power_loss(d: Path, keep: int) -> None:
    """Cut the only segment after ``keep`` records (of 100-byte writes): what a lost page cache leaves."""
    seg = next(d.glob("*.seg"))
    os.truncate(seg, keep * (HEADER_SIZE + 100))


def test_a_lost_unsynced_tail_is_not_damage_even_after_a_release(tmp_path):
    d = tmp_path / "j"
    j = Journal.open(d)
    for i in range(10):
        j.append_write(i, b"p" * 100)
    j.sync()
    for i in range(5):
        j.append_write(i, b"u" * 100)  # never synced
    j.release(3)  # the state names the synced end (11), not the appended one (16)
    j.close()
    _power_loss(d, 10)
    j = Journal.open(d)
    assert not j.recovery["damaged"] and j.first_seq == 4 and j.next_seq == 11
    assert [r.seq for r in j.read(4)] == list(range(4, 11))
    j.close()


def test_losing_records_the_state_says_were_synced_is_damage(tmp_path):
    d = tmp_path / "j"
    j = Journal.open(d)
    for i in range(10):
        j.append_write(i * 4096, b"p" * 100)
    j.sync()
    j.release(3)
    j.close()
    _power_loss(d, 8)  # seqs 9 and 10 were durable: the disk lost them
    j = Journal.open(d)
    assert j.recovery["damaged"] and j.count == 0 and j.next_seq == 11  # no seq is given out twice
    assert j.recovery["dropped_ranges"] == [(i * 4096, 100) for i in range(3, 8)]
    assert j.append_write(0, b"n") == 11
    j.close()
    j = Journal.open(d)
    assert not j.recovery["damaged"] and [r.seq for r in j.read(11)] == [11]
    j.close()


def test_a_failed_write_appends_nothing(tmp_path, monkeypatch):
    j = Journal.open(tmp_path / "j")
    j.append_write(0, b"ok")
    real = os.pwritev

    def full(fd: int, bufs: list, pos: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(OSError):
        j.append_write(0, b"lost")
    j.hold()
    j.append_write(0, b"held")
    with pytest.raises(OSError):
        j.push()
    assert j.next_seq == 2 and j.count == 1 and j.bytes == HEADER_SIZE + 2
    monkeypatch.setattr(os, "pwritev", real)
    assert j.append_write(0, b"again") == 2
    assert [bytes(r.data) for r in j.read(1)] == [b"ok", b"again"]
    j.close()
    j = Journal.open(tmp_path / "j")
    assert not j.recovery["damaged"] and j.recovery["records"] == 2
    j.close()
