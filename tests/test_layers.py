"""The op table and its layers: every write-like op must be handled by every intercepting layer."""
from __future__ import annotations

import errno
import inspect

import pytest

import blockdev.layers
import mirror.layer
from blockdev.backend import BATCH_OPS, INFO_OPS, READ_OPS, WRITE_OPS, Backend, Completion, Layer, combine
from blockdev.errors import BlockError, ReadOnlyError, to_errno
from blockdev.image import MemoryImage
from blockdev.layers import FaultLayer, ReadOnlyLayer, StatsLayer
from blockdev.layers.faults import Fault
from mirror.layer import MirrorLayer


def _all_layer_classes() -> list[type[Layer]]:
    # Import every module that defines layers, then walk the subclass tree.
    assert blockdev.layers and mirror.layer
    out, todo = [], [Layer]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def test_every_op_of_the_table_is_classified() -> None:
    members = {n for n, _ in inspect.getmembers(Backend) if not n.startswith("_")}
    assert members == WRITE_OPS | READ_OPS | INFO_OPS | BATCH_OPS, (
        "an op was added to or removed from the Backend table: classify it in blockdev/backend.py"
    )
    assert not WRITE_OPS & READ_OPS and not WRITE_OPS & INFO_OPS and not WRITE_OPS & BATCH_OPS


def test_base_layer_passes_every_op_through() -> None:
    for op in WRITE_OPS | READ_OPS | INFO_OPS | BATCH_OPS:
        assert op in Layer.__dict__, f"Layer does not pass {op} through"


@pytest.mark.parametrize("cls", [c for c in _all_layer_classes() if c.intercepts_writes], ids=lambda c: c.__name__)
def test_intercepting_layers_handle_every_write_op(cls: type[Layer]) -> None:
    missing = [op for op in sorted(WRITE_OPS) if not any(op in k.__dict__ for k in cls.__mro__ if k is not Layer)]
    assert not missing, f"{cls.__name__} must implement {missing} itself"


def test_mirror_and_readonly_layers_are_intercepting() -> None:
    assert MirrorLayer.intercepts_writes and ReadOnlyLayer.intercepts_writes


def test_readonly_layer_refuses_every_write_with_eperm() -> None:
    img = MemoryImage(1 << 16)
    ro = ReadOnlyLayer(img)
    for call in (lambda: ro.pwrite(b"x", 0), lambda: ro.trim(512, 0), lambda: ro.write_zeroes(512, 0)):
        with pytest.raises(ReadOnlyError) as e:
            call()
        assert to_errno(e.value) == errno.EPERM
    assert not ro.can_write() and ro.flush() is None
    assert img.data == bytes(1 << 16)


def test_stats_layer_counts_ops_and_bytes() -> None:
    st = StatsLayer(MemoryImage(1 << 16))
    st.pwrite(b"a" * 100, 0)
    st.pread(memoryview(bytearray(10)), 0)
    st.write_zeroes(512, 512)
    st.trim(1024, 1024)
    st.flush()
    s = st.statistics()
    assert (s.writes, s.write_bytes, s.reads, s.read_bytes) == (1, 100, 1, 10)
    assert (s.zeroes, s.zero_bytes, s.trims, s.trim_bytes, s.flushes, s.errors) == (1, 512, 1, 1024, 1, 0)


def test_fault_layer_fails_only_the_armed_range_and_count() -> None:
    fl = FaultLayer(MemoryImage(1 << 16))
    fl.arm(Fault("pwrite", errno.ENOSPC, offset=4096, length=4096, count=1))
    fl.pwrite(b"x", 0)
    with pytest.raises(BlockError) as e:
        fl.pwrite(b"x", 5000)
    assert to_errno(e.value) == errno.ENOSPC
    fl.pwrite(b"x", 5000)  # count exhausted


class _RecordingReplicator:
    def __init__(self) -> None:
        self.ops: list[tuple] = []
        self.pending: list[Completion] = []
        self.local: list[tuple] = []

    def _pend(self) -> Completion:
        c = Completion()
        self.pending.append(c)
        return c

    def on_write(self, offset, data, fua, done=None):  # type: ignore[no-untyped-def]
        self.ops.append(("write", offset, bytes(data), fua))
        return self._pend()

    def hold(self):  # type: ignore[no-untyped-def]
        self.ops.append(("hold",))

    def push(self):  # type: ignore[no-untyped-def]
        self.ops.append(("push",))

    def landed(self, ranges):  # type: ignore[no-untyped-def]
        self.local += [(o, n, True) for o, n in ranges]

    def on_zero(self, offset, length, fua, trim):  # type: ignore[no-untyped-def]
        self.ops.append(("zero", offset, length, trim))
        return self._pend()

    def on_flush(self):  # type: ignore[no-untyped-def]
        self.ops.append(("flush",))
        return self._pend()

    def local_done(self, offset, length, ok):  # type: ignore[no-untyped-def]
        self.local.append((offset, length, ok))

    def admit(self, offset, length):  # type: ignore[no-untyped-def]
        return None  # the range is always admitted at once here

    def withdraw(self, offset, length):  # type: ignore[no-untyped-def]
        self.ops.append(("withdraw", offset, length))


def test_mirror_seam_sees_every_write_op_and_waits_for_the_replica() -> None:
    img = MemoryImage(1 << 16)
    layer = MirrorLayer(img)
    rep = _RecordingReplicator()
    layer.attach(rep)
    results = [layer.pwrite(b"abc", 10, True), layer.write_zeroes(512, 1024), layer.trim(512, 2048), layer.flush()]
    assert [o[0] for o in rep.ops] == ["write", "zero", "zero", "flush"]
    assert bytes(img.data[10:13]) == b"abc"  # local write done at once
    assert rep.local == [(10, 3, True), (1024, 512, True), (2048, 512, True)]  # and reported to the replicator
    assert all(r is not None and not r.done for r in results)  # host ack waits for the replica
    for c in rep.pending:
        c.finish()
    assert all(r is not None and r.done and r.exception is None for r in results)


def test_mirror_plug_sends_the_batch_before_the_local_writes() -> None:
    img = MemoryImage(1 << 16)
    layer = StatsLayer(MirrorLayer(img))
    rep = _RecordingReplicator()
    layer.inner.attach(rep)  # type: ignore[attr-defined]
    layer.plug()
    results = [layer.pwrite(b"a" * 4, 0), layer.pwrite(b"b" * 4, 2)]
    assert [o[0] for o in rep.ops] == ["hold", "write", "write"]
    assert bytes(img.data[:6]) == bytes(6) and rep.local == []  # local halves wait for unplug
    layer.unplug()
    assert [o[0] for o in rep.ops] == ["hold", "write", "write", "push"]  # frames leave before the local writes
    assert bytes(img.data[:6]) == b"aabbbb"  # applied in order
    assert rep.local == [(0, 4, True), (2, 4, True)]
    assert all(r is not None and not r.done for r in results)
    for c in rep.pending:
        c.finish()
    assert all(r is not None and r.done and r.exception is None for r in results)


def test_counted_completion_waits_for_every_part() -> None:
    c = Completion(2)
    c.finish(OSError(errno.EIO, "x"))
    assert not c.done
    c.finish()
    assert c.done and isinstance(c.exception, OSError)


def test_combine_reports_the_first_error() -> None:
    a, b = Completion(), Completion()
    c = combine([a, None, b])
    assert c is not None
    a.finish(OSError(errno.EIO, "x"))
    assert not c.done
    b.finish()
    assert c.done and isinstance(c.exception, OSError)
    assert combine([None, None]) is None
