"""MirrorManager (vdisk/mirroring.py) in one trio process: a volume with a mirror configured never
has a write go unrecorded — not while its replicator is being replaced, not while none can run."""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from blockdev.backend import wait
from blockdev.volume import VolumeStore
from mirror.base import Marking
from mirror.layer import MirrorLayer
from mirror.sync import SyncReplicator
from mirror.target import TargetConfig, TargetServer
from vdisk.mirroring import MirrorManager

MiB = 1 << 20
SIZE = 16 * MiB


async def until(pred, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


class Served:
    """A volume as the daemon serves it (the parts MirrorManager uses), and a target."""

    def __init__(self, tmp: Path) -> None:
        self.store = VolumeStore(tmp / "src")
        self.dst = VolumeStore(tmp / "dst")
        meta = self.store.create("vol", SIZE)
        self.image = self.store.open_image("vol")
        self.layer = MirrorLayer(self.image)
        self.vol = SimpleNamespace(name="vol", meta=meta, image=self.image, mirror=self.layer)
        self.volumes = {"vol": self.vol}
        self.control = SimpleNamespace(register=lambda *_: None)

    async def start(self, nursery: trio.Nursery, section: dict) -> MirrorManager:
        server = TargetServer(self.dst, TargetConfig(timeout=5))
        addr = await nursery.start(server.serve, "127.0.0.1", 0)
        self.section = {"to": addr.removeprefix("tcp:"), "mode": "sync", "timeout": 2, **section}
        self.store.update("vol", mirror=self.section)
        mgr = MirrorManager(self)  # type: ignore[arg-type]
        await nursery.start(mgr.run)
        return mgr

    def differs(self) -> bool:
        return self.store.image_path("vol").read_bytes() != self.dst.image_path("vol").read_bytes()


def rep_of(mgr: MirrorManager) -> SyncReplicator:
    rep = mgr.mirrors["vol"].rep
    assert rep is not None
    return rep


async def test_a_reconfigured_mirror_hands_over_with_no_gap(tmp_path, nursery):
    # Write A's local half lands only after the hand-over (a slow worker thread): the old replicator
    # marks it when it lands, so the new one's resync resends it even if it had read the range before.
    s = Served(tmp_path)
    mgr = await s.start(nursery, {})
    old = rep_of(mgr)
    await until(lambda: old.statistics().state == "in_sync")
    for off in (0, 8 * MiB):  # hot in the activity log (a cold extent's write is issued by the log's thread)
        await wait(s.layer.pwrite(b"o" * 4096, off))
    gate = threading.Event()
    real = s.image.pwrite

    def slow(data, offset, fua=False):
        if bytes(data[:1]) == b"A":
            gate.wait(10)
        return real(data, offset, fua)

    s.image.pwrite = slow
    results: list = []

    async def write_a() -> None:
        results.append(await trio.to_thread.run_sync(lambda: s.layer.pwrite(b"A" * 65536, 0)))

    async with trio.open_nursery() as n:
        n.start_soon(write_a)
        await until(lambda: bool(old._local))
        new = await mgr.start(s.vol, {**s.section, "on_link_loss": "block"})  # same --to: pairing kept
        assert s.layer.replicator is new and new is not old
        new.dirty.mark(0, 65536)  # as if A's frame had still been unacknowledged at the hand-over
        await wait(s.layer.pwrite(b"B" * 4096, 8 * MiB))  # the new one has it
        # Its resync sends region 0 while A, an op of the old replicator, is still landing: the
        # volume's old bytes. A marks the range again when it lands.
        await until(lambda: new.resync_regions_sent >= 1 and not new.dirty.test(0))
        gate.set()
    await wait(results[0])
    await until(lambda: new.statistics().state == "in_sync" and new.statistics().in_flight == 0)
    assert not s.differs()
    assert new.al.in_flight(0) == 0 and new.al.in_flight(8 * MiB) == 0  # every ticket ended once
    nursery.cancel_scope.cancel()


async def test_writes_are_marked_while_a_configured_mirror_cannot_run(tmp_path, nursery):
    s = Served(tmp_path)
    mgr = await s.start(nursery, {"psk_file": str(tmp_path / "missing-key")})  # cannot start: no key
    assert type(s.layer.replicator) is Marking and mgr.mirrors["vol"].rep is None
    await wait(s.layer.pwrite(b"x" * 4096, 3 * MiB))
    dirty = mgr.mirrors["vol"].state.dirty
    assert list(dirty) == [3 * MiB // (64 << 10)]
    assert mgr.status("vol")["state"] == "stopped" and mgr.status("vol")["dirty_bytes"] == 64 << 10
    rep = await mgr.start(s.vol, {k: v for k, v in s.section.items() if k != "psk_file"})  # fixed
    await until(lambda: rep.statistics().state == "in_sync")
    assert not s.differs()
    nursery.cancel_scope.cancel()



async def test_with_block_policy_a_write_is_refused_while_the_mirror_cannot_run(tmp_path, nursery):
    from blockdev.errors import BlockError

    s = Served(tmp_path)
    mgr = await s.start(nursery, {"psk_file": str(tmp_path / "missing-key"), "on_link_loss": "block"})
    with pytest.raises(BlockError, match="not running"):
        await wait(s.layer.pwrite(b"x" * 4096, 3 * MiB))  # never acknowledged unmirrored
    assert list(mgr.mirrors["vol"].state.dirty) == [3 * MiB // (64 << 10)]  # and still recorded
    nursery.cancel_scope.cancel()


async def test_a_write_begun_before_a_block_mirror_is_configured_is_not_failed(tmp_path, nursery, monkeypatch):
    # `vdisk mirror NAME --on-link-loss block` on a served, unmirrored volume under load: writes that
    # began on the seam's Marking (attached first) and wait for the new activity log finish after the
    # replicator is attached. They are marked and resent; they must not fail with "the mirror is not
    # running" (that EIO is for a block configuration with no replicator at all).
    from mirror.dirty import ActivityLog

    s = Served(tmp_path)
    server = TargetServer(s.dst, TargetConfig(timeout=5))
    addr = await nursery.start(server.serve, "127.0.0.1", 0)
    mgr = MirrorManager(s)  # type: ignore[arg-type]
    await nursery.start(mgr.run)  # nothing configured yet
    stall, gate = threading.Event(), threading.Event()
    real_commit = ActivityLog._commit

    def commit(self, all_idle):
        if stall.is_set() and not all_idle:
            gate.wait(10)
        return real_commit(self, all_idle)

    monkeypatch.setattr(ActivityLog, "_commit", commit)
    mgr._open(s.vol)  # what start() does first: Marking attached
    assert type(s.layer.replicator) is Marking
    stall.set()
    section = {"to": addr.removeprefix("tcp:"), "mode": "sync", "timeout": 2, "on_link_loss": "block"}
    s.store.update("vol", mirror=section)
    result = s.layer.pwrite(b"x" * 4096, 3 * MiB)  # cold extent: waits for the log (stalled)
    assert result is not None and not result.done
    rep = await mgr.start(s.vol, section)
    assert s.layer.replicator is rep
    gate.set()
    await wait(result)  # raised BlockError("the mirror is not running ...") before the fix
    await until(lambda: rep.statistics().state == "in_sync" and rep.statistics().in_flight == 0)
    assert not s.differs()
    nursery.cancel_scope.cancel()


async def test_switching_async_to_sync_while_the_shipper_reads_the_journal(tmp_path, nursery, monkeypatch):
    # The async shipper reads the journal on a worker thread; a switch to sync cancels it and drops
    # the journal. The read finishing against a closed journal ended the whole daemon (JournalClosed
    # escaped the replicator's task, next to its Cancelled); now the journal is dropped only once the
    # old run task has returned, and a replicator's error never leaves its own task.
    from mirror.asyncrep import AsyncReplicator
    from mirror.journal import Journal

    s = Served(tmp_path)
    mgr = await s.start(nursery, {"mode": "async", "checkpoint_interval": 0.2})
    rep = mgr.mirrors["vol"].rep
    assert isinstance(rep, AsyncReplicator)
    await until(lambda: rep.statistics()["state"] == "in_sync")
    entered, gate = threading.Event(), threading.Event()
    real_read = Journal.read

    def read(self, *a, **kw):
        entered.set()
        gate.wait(10)
        return real_read(self, *a, **kw)

    monkeypatch.setattr(Journal, "read", read)
    await wait(s.layer.pwrite(b"j" * 65536, 0))
    await trio.to_thread.run_sync(entered.wait, 10)
    async with trio.open_nursery() as n:
        async def switch() -> None:
            await mgr.start(s.vol, {**s.section, "mode": "sync"})

        n.start_soon(switch)
        await trio.sleep(0.2)
        gate.set()  # the read completes after the switch began
    new = rep_of(mgr)
    assert not isinstance(new, AsyncReplicator)
    await until(lambda: new.statistics().state == "in_sync" and new.statistics().in_flight == 0)
    assert not s.differs()
    nursery.cancel_scope.cancel()


async def test_ship_at_accumulates_then_ships_up_to_the_instant(tmp_path, nursery, monkeypatch):
    # --ship-at: nothing leaves before the instant; at it a checkpoint is cut and the journal shipped
    # and committed up to it; writes after it wait for the next instant. The wall clock is faked.
    import datetime as real_dt

    from mirror import asyncrep
    from mirror.asyncrep import AsyncReplicator

    tz = real_dt.UTC
    clock = [real_dt.datetime(2026, 12, 7, 1, 59, 0, tzinfo=tz)]

    class FakeDatetime(real_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return clock[0]

    monkeypatch.setattr(asyncrep.dt, "datetime", FakeDatetime)
    s = Served(tmp_path)
    mgr = await s.start(nursery, {"mode": "async", "ship_at": "02:00", "checkpoint_interval": 0.2})
    rep = mgr.mirrors["vol"].rep
    assert isinstance(rep, AsyncReplicator)
    await until(lambda: rep.statistics()["state"] != "disconnected")
    await wait(s.layer.pwrite(b"1" * 65536, 0))
    await wait(s.layer.flush())
    await trio.sleep(1.0)
    assert rep.statistics()["state"] == "scheduled" and rep.statistics()["journal_bytes"] > 0
    assert s.dst.image_path("vol").read_bytes()[:65536] != b"1" * 65536  # not shipped yet
    clock[0] = real_dt.datetime(2026, 12, 7, 2, 0, 1, tzinfo=tz)  # the instant has passed
    rep._poke()
    await until(lambda: rep.statistics()["journal_bytes"] == 0 and rep.committed[0] > 0)
    assert s.dst.image_path("vol").read_bytes()[:65536] == b"1" * 65536
    # After it: accumulate again until the next instant (tomorrow 02:00).
    await wait(s.layer.pwrite(b"2" * 65536, 65536))
    await trio.sleep(1.0)
    assert rep.statistics()["state"] == "scheduled" and rep.statistics()["journal_bytes"] > 0
    assert s.dst.image_path("vol").read_bytes()[65536:131072] != b"2" * 65536
    assert rep.statistics()["connects"] == 1  # an idle link kept alive (2 s timeout here)
    nursery.cancel_scope.cancel()


async def test_a_running_verify_reports_its_progress_in_status(tmp_path, nursery):
    # `vdisk verify` draws its bar from the volume's status while the verify runs: phase and bytes
    # hashed of the volume; the key is gone once it is done.
    s = Served(tmp_path)
    mgr = await s.start(nursery, {})
    rep = rep_of(mgr)
    await until(lambda: rep.statistics().state == "in_sync")
    await wait(s.layer.pwrite(b"v" * 65536, 4 * MiB))
    gate, real = threading.Event(), s.image.extents
    seen: list[int] = []

    def extents(length, offset):
        seen.append(offset)
        if offset >= 8 * MiB:
            gate.wait(10)  # halfway through the volume
        return real(length, offset)

    s.image.extents = extents
    result: list = []

    async def run() -> None:
        result.append(await mgr._cmd_verify({"name": "vol"}))

    async with trio.open_nursery() as n:
        n.start_soon(run)
        await until(lambda: (mgr.status("vol") or {}).get("verify", {}).get("done_bytes", 0) >= 8 * MiB)
        v = mgr.status("vol")["verify"]
        assert v["phase"] == "hashing" and v["total_bytes"] == SIZE and v["done_bytes"] < SIZE
        gate.set()
    assert result[0]["verify"]["differing_bytes"] == 0
    assert "verify" not in mgr.status("vol")
    nursery.cancel_scope.cancel()
