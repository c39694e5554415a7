"""The async source buffer: round trips, persistence of sequence numbers, torn tails, damage."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.journal import CHECKPOINT, WRITE, ZERO, Journal

ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=3000)),
    st.tuples(st.just("z"), st.integers(0, 1 << 20), st.integers(1, 1 << 16)),
    st.tuples(st.just("c"), st.just(0), st.just(0)),
    st.tuples(st.just("r"), st.just(0), st.just(0)),  # release up to a random retained seq
    st.tuples(st.just("o"), st.just(0), st.just(0)),  # reopen
), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops, st.randoms())
def test_reads_return_exactly_the_retained_records_across_reopens(tmp_path_factory, steps, rnd):
    path = tmp_path_factory.mktemp("j")
    j = Journal.open(path, segment_bytes=8192)
    model: dict[int, tuple] = {}
    last_seq = 0
    for op, a, b in steps:
        if op == "w":
            seq = j.append_write(a, b)
            model[seq] = (WRITE, a, len(b), b)
        elif op == "z":
            seq = j.append_zero(a, b, trim=True)
            model[seq] = (ZERO, a, b, None)
        elif op == "c":
            seq = j.append_checkpoint()
            model[seq] = (CHECKPOINT, 0, 0, None)
        elif op == "r" and model:
            upto = rnd.choice(sorted(model))
            j.release(upto)
            model = {k: v for k, v in model.items() if k > upto}
            continue
        elif op == "o":
            j.sync()
            j.close()
            j = Journal.open(path, segment_bytes=8192)
            assert not j.recovery["damaged"] and not j.recovery["torn_bytes"]
            continue
        else:
            continue
        assert seq == last_seq + 1 or last_seq == 0
        last_seq = seq
    got = j.read(j.first_seq, 1 << 30) if j.count else []
    assert [(r.seq, r.kind, r.offset, r.length, r.data) for r in got] == \
        [(k, v[0], v[1], v[2], v[3]) for k, v in sorted(model.items())]
    assert j.next_seq == last_seq + 1 or last_seq == 0
    assert j.ranges(0) == [(v[1], v[2]) for _k, v in sorted(model.items()) if v[0] != CHECKPOINT]
    j.close()


def test_sequence_numbers_survive_releasing_everything_and_reset(tmp_path):
    j = Journal.open(tmp_path / "j")
    for _ in range(5):
        j.append_write(0, b"x" * 100)
    cp = j.append_checkpoint()
    j.release(cp)
    assert j.count == 0 and j.bytes == 0
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.next_seq == cp + 1 and j.first_seq == cp + 1
    j.append_write(4096, b"y")
    j.reset()
    j.close()
    j = Journal.open(tmp_path / "j")
    assert j.next_seq == cp + 2 and j.count == 0


def test_a_torn_tail_is_cut_at_every_byte_and_appends_continue(tmp_path):
    base = tmp_path / "base"
    j = Journal.open(base)
    j.append_write(0, b"a" * 1000)
    j.append_zero(8192, 4096)
    j.append_write(4096, b"b" * 1000)
    j.sync()
    j.close()
    seg = next(base.glob("*.seg"))
    full = seg.read_bytes()
    last_start = len(full) - (48 + 1000)
    for cut in range(last_start, len(full), 97):
        d = tmp_path / f"c{cut}"
        d.mkdir()
        (d / seg.name).write_bytes(full[:cut])
        j = Journal.open(d)
        assert j.count == 2 and j.recovery["torn_bytes"] == cut - last_start and not j.recovery["damaged"]
        assert j.append_write(0, b"c") == 3
        j.close()
        j = Journal.open(d)
        assert [r.seq for r in j.read(1)] == [1, 2, 3]
        j.close()


def test_a_flipped_bit_in_an_earlier_segment_is_damage(tmp_path):
    j = Journal.open(tmp_path / "j", segment_bytes=4096)
    for i in range(10):
        j.append_write(i * 4096, bytes([i]) * 2000)
    j.close()
    segs = sorted((tmp_path / "j").glob("*.seg"))
    assert len(segs) > 3
    raw = bytearray(segs[1].read_bytes())
    raw[100] ^= 1
    segs[1].write_bytes(bytes(raw))
    j = Journal.open(tmp_path / "j", segment_bytes=4096)
    assert j.recovery["damaged"] and j.count == 2  # only the first segment (two records) is trusted


def test_hold_and_push_write_one_batch_in_order(tmp_path):
    j = Journal.open(tmp_path / "j")
    j.hold()
    data = [memoryview(bytes([i]) * 4096) for i in range(40)]
    for i, d in enumerate(data):
        j.append_write(i * 4096, d)
    assert j.count == 0  # not readable before push
    j.push()
    assert [r.data for r in j.read(1, 1 << 30)] == [bytes(d) for d in data]


CHILD = r"""
import sys
from pathlib import Path
from mirror.journal import Journal
j = Journal.open(Path(sys.argv[1]), segment_bytes=1 << 16)
i = j.next_seq
while True:
    assert j.append_write(i * 512 % (1 << 20), i.to_bytes(8, "big") * 64) == i
    i += 1
"""


@pytest.mark.parametrize("round_", range(4))
def test_kill9_mid_append_leaves_a_valid_prefix(tmp_path, round_):
    path = tmp_path / "j"
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parent.parent)}
    for _ in range(2):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=env)
        time.sleep(random.uniform(0.3, 0.8))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        j = Journal.open(path, segment_bytes=1 << 16)
        assert not j.recovery["damaged"]
        recs = j.read(j.first_seq, 1 << 40)
        assert recs and [r.seq for r in recs] == list(range(1, len(recs) + 1))
        assert all(r.data == r.seq.to_bytes(8, "big") * 64 for r in recs)
        j.close()
