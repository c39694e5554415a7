"""The sync replicator against a real target over loopback TCP, in one trio process (no NBD)."""
from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import trio

from blockdev.backend import Completion, wait
from blockdev.errors import BlockError, to_errno
from blockdev.volume import VolumeStore
from mirror.dirty import ActivityLog, DirtyMap
from mirror.layer import MirrorLayer
from mirror.sync import Pairing, SyncConfig, SyncReplicator, VolumeIdentity
from mirror.target import TargetConfig, TargetServer
from mirror.verify import compare
from tests.mirror_procs import corrupt_silently

MiB = 1 << 20
SIZE = 16 * MiB


class Rig:
    """A source volume with a MirrorLayer and a target server, both in this trio run."""

    def __init__(self, tmp: Path, nursery: trio.Nursery, **cfg) -> None:
        self.tmp, self.nursery, self.cfg = tmp, nursery, cfg
        self.src = VolumeStore(tmp / "src")
        self.dst = VolumeStore(tmp / "dst")
        self.meta = self.src.create("vol", SIZE)
        self.image = self.src.open_image("vol")
        self.layer = MirrorLayer(self.image)
        self.port = 0
        self.target_scope: trio.CancelScope | None = None
        self.rep: SyncReplicator | None = None
        self.al_extent = 4 << 20

    async def start_target(self, psk: bytes | None = None) -> None:
        self.server = TargetServer(self.dst, TargetConfig(psk=psk, timeout=5))

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                self.target_scope = scope
                await self.server.serve("127.0.0.1", self.port, task_status=task_status)

        addr = await self.nursery.start(run)
        self.port = int(addr.rsplit(":", 1)[1])

    def stop_target(self) -> None:
        assert self.target_scope is not None
        self.target_scope.cancel()

    async def start_mirror(self, psk: bytes | None = None, **over) -> SyncReplicator:
        opts = {"timeout": 2, "keepalive": 0.2, "backoff_min": 0.05, "backoff_max": 0.2, **self.cfg, **over}
        cfg = SyncConfig("127.0.0.1", self.port, psk=psk, **opts)
        dirty = DirtyMap.load(SIZE, 64 << 10, self.tmp / "vol.dirty")
        al = ActivityLog(self.tmp / "vol.al", extent=self.al_extent, before_evict=dirty.save)
        ident = VolumeIdentity(self.meta.uuid, "vol", SIZE, 4096, 1)
        self.rep = rep = SyncReplicator(cfg, ident, self.image, dirty, al, Pairing())
        self.layer.attach(rep)
        self.mirror_scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with self.mirror_scope:
                await rep.run(task_status=task_status)

        await self.nursery.start(run)
        return rep

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await wait(self.layer.pwrite(data, offset, fua))

    def replica_bytes(self) -> bytes:
        return self.dst.image_path("vol").read_bytes()

    def source_bytes(self) -> bytes:
        return self.src.image_path("vol").read_bytes()


async def until(pred, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


@pytest.fixture
async def rig(tmp_path, nursery):
    r = Rig(tmp_path, nursery)
    yield r
    nursery.cancel_scope.cancel()


async def test_every_acknowledged_write_is_already_on_the_replica(rig):
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    rng = random.Random(1)
    fd = os.open(rig.dst.image_path("vol"), os.O_RDONLY)
    try:
        for i in range(200):
            off = rng.randrange(0, SIZE // 4096) * 4096
            data = rng.randbytes(4096 * rng.randint(1, 4))
            await rig.write(off, data, fua=(i % 7 == 0))
            assert os.pread(fd, len(data), off) == data  # acked => applied by the target
    finally:
        os.close(fd)
    assert rig.source_bytes() == rig.replica_bytes()


async def test_pipelined_writes_from_many_tasks_end_byte_exact(rig):
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")

    async def writer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(100):
            await rig.write(rng.randrange(0, SIZE // 4096) * 4096, rng.randbytes(4096))

    async with trio.open_nursery() as n:
        for s in range(32):
            n.start_soon(writer, s)
    await wait(rig.layer.flush())
    assert rep.statistics().in_flight == 0
    assert rig.source_bytes() == rig.replica_bytes()


async def test_initial_sync_copies_only_allocated_data_and_keeps_concurrent_writes(rig):
    rng = random.Random(2)
    for i in range(0, SIZE, 2 * MiB):  # 8 allocated MiB, half the volume never touched
        rig.image.pwrite(rng.randbytes(MiB), i)
    rig.image.pwrite(bytes(256 << 10), 3 * MiB)  # allocated but zero: a zero frame, no bytes
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "syncing")
    for _ in range(300):  # writes racing the copy (every one lands on the replica in the end)
        await rig.write(rng.randrange(0, SIZE // 4096) * 4096, rng.randbytes(4096))
    await until(lambda: rep.state == "in_sync")
    assert rep.statistics().initial_sync["done"] and rep.pairing.initial_sync_done
    assert rep.resync_bytes_sent <= 8 * MiB
    assert rig.source_bytes() == rig.replica_bytes()


async def test_target_loss_degrades_then_resyncs_only_what_changed(rig):
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    rng = random.Random(3)
    for _ in range(50):
        await rig.write(rng.randrange(0, SIZE // 4096) * 4096, rng.randbytes(4096))
    rig.stop_target()
    await until(lambda: rep.state == "degraded")
    before, regions_before = rep.resync_bytes_sent, rep.resync_regions_sent
    changed = set()
    for _ in range(20):  # acknowledged locally while the replica is away
        off = rng.randrange(0, SIZE // 4096) * 4096
        await rig.write(off, rng.randbytes(4096))
        changed.add(off // (64 << 10))
    assert rep.statistics().dirty_bytes == len(changed) * (64 << 10)
    await rig.start_target()
    await until(lambda: rep.state == "in_sync")
    # Only the changed regions are resent, and of those only their allocated data (holes go as zero frames).
    assert rep.resync_regions_sent - regions_before == len(changed)
    assert 20 * 4096 <= rep.resync_bytes_sent - before <= len(changed) * (64 << 10)
    assert rig.source_bytes() == rig.replica_bytes()


async def _held_write(rig, block_timeout: float) -> tuple[SyncReplicator, Completion]:
    """A block-mode mirror whose target went away, and a host write waiting for the link."""
    await rig.start_target()
    rep = await rig.start_mirror(on_link_loss="block", block_timeout=block_timeout)
    await until(lambda: rep.state == "in_sync")
    rig.stop_target()
    await until(lambda: rep.state == "degraded")
    res = rig.layer.pwrite(b"x" * 4096, 0)
    await until(lambda: rep.statistics().blocked == 1)  # held: waiting for the link
    assert res is not None and not res.done
    return rep, res


async def test_block_policy_holds_writes_then_fails_them_with_eio(rig):
    rep, res = await _held_write(rig, 0.5)
    with pytest.raises(BlockError, match="replica unreachable"):
        await wait(res)
    res2 = rig.layer.pwrite(b"y" * 4096, 4096)
    await rig.start_target()
    await wait(res2)  # released once the replica is back in sync
    assert rep.state == "in_sync"
    assert rig.replica_bytes()[:8192] == b"x" * 4096 + b"y" * 4096


async def test_block_policy_fails_held_writes_with_eio_when_the_mirror_stops(rig):
    rep, res = await _held_write(rig, 30)
    rig.mirror_scope.cancel()
    rig.layer.attach(None)
    rep.close()  # what `vdisk mirror --stop` and the daemon's shutdown do
    with pytest.raises(BlockError, match="mirror stopped") as e:
        await wait(res)
    assert to_errno(e.value) == errno.EIO  # the host must not be told the write is mirrored
    assert rep.dirty.count  # and the region is remembered for the next resync


async def test_wrong_key_is_refused_with_a_clear_error(rig):
    await rig.start_target(psk=b"right key")
    rep = await rig.start_mirror(psk=b"wrong key")
    await until(lambda: rep.last_error is not None)
    assert "wrong pre-shared key" in rep.last_error
    assert rep.state == "disconnected"
    assert not rig.dst.exists("vol")  # nothing created for an unauthenticated source


async def test_verify_finds_planted_differences_and_repair_sends_only_those(rig):
    rng = random.Random(4)
    for i in range(0, SIZE, MiB):
        rig.image.pwrite(rng.randbytes(512 << 10), i)
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    clean = await compare(rig.image, SIZE, 64 << 10, rep.query_hashes)
    assert clean.ranges == [] and clean.digests_exchanged == 1
    corrupt_silently(rig.dst.image_path("vol"), [(off, b"\xff") for off in (0, 5 * MiB + 7, 15 * MiB + 100)])
    report = await compare(rig.image, SIZE, 64 << 10, rep.query_hashes)
    assert report.ranges == [(0, 64 << 10), (5 * MiB, 64 << 10), (15 * MiB, 64 << 10)]
    before = rep.resync_bytes_sent
    for b in report.differing_blocks:
        rep.dirty.mark_region(b)
    rep.request_resync()
    await until(lambda: rep.state == "in_sync" and rep.dirty.count == 0 and rep.statistics().in_flight == 0)
    assert rep.resync_bytes_sent - before == 3 * (64 << 10)
    assert rig.source_bytes() == rig.replica_bytes()


async def test_initial_sync_resumes_from_the_files_a_crash_leaves(rig, tmp_path):
    import shutil

    rng = random.Random(6)
    rig.image.pwrite(rng.randbytes(SIZE), 0)
    await rig.start_target()
    rig.al_extent = 256 << 10
    rep = await rig.start_mirror(resync_window=256 << 10, resync_chunk=256 << 10)
    await until(lambda: rep.statistics().initial_sync["copied_bytes"] > SIZE // 2)
    rep.al.clear()  # what the periodic save does during a sync (map saved, idle extents dropped)
    # A crash: the files as they are on disk at this instant, nothing flushed or cleared.
    shutil.copy(tmp_path / "vol.dirty", tmp_path / "crash.dirty")
    shutil.copy(tmp_path / "vol.al", tmp_path / "crash.al")
    pairing = Pairing(rep.pairing.replica_id, False, rep.pairing.sync_total)
    rig.layer.attach(None)
    rig.mirror_scope.cancel()
    dirty = DirtyMap.load(SIZE, 64 << 10, tmp_path / "crash.dirty")
    al = ActivityLog(tmp_path / "crash.al", extent=256 << 10, before_evict=dirty.save)
    for e in al.recover():  # what `vdisk serve` does at start (vdisk/mirroring.py)
        dirty.mark(*al.byte_range(e))
    remaining = dirty.dirty_bytes
    assert 0 < remaining < SIZE * 3 // 4  # resumable: what was copied and acknowledged is not resent
    await until(lambda: not rig.server.active)  # the old link is gone
    cfg = SyncConfig("127.0.0.1", rig.port, timeout=2, keepalive=0.2, backoff_min=0.05, backoff_max=0.2)
    again = SyncReplicator(cfg, VolumeIdentity(rig.meta.uuid, "vol", SIZE, 4096, 1), rig.image, dirty, al, pairing)
    await rig.nursery.start(again.run)
    await until(lambda: again.state == "in_sync")
    assert again.resync_bytes_sent == remaining
    assert again.pairing.initial_sync_done
    assert rig.source_bytes() == rig.replica_bytes()


async def test_big_writes_do_not_wait_for_a_keepalive_to_be_sent(rig):
    await rig.start_target()
    rep = await rig.start_mirror(keepalive=30)  # a stuck outbox would only move with the next ping
    await until(lambda: rep.state == "in_sync")
    for size in (1 << 20, 4 << 20, 8 << 20):
        data = random.Random(size).randbytes(size)
        with trio.fail_after(2):
            await rig.write(0, data)
        assert rig.replica_bytes()[:size] == data


async def test_an_existing_replica_we_did_not_fill_is_compared_not_copied(rig, tmp_path):
    rng = random.Random(8)
    rig.image.pwrite(rng.randbytes(SIZE), 0)
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    rig.layer.attach(None)
    rig.mirror_scope.cancel()
    await until(lambda: not rig.server.active)
    # Unmirrored changes (as after `mirror --stop`, or a replica restored from a backup):
    rig.image.pwrite(b"\x01" * 4096, 3 << 20)
    rig.image.trim(1 << 20, 8 << 20)  # a hole on the source where the replica has data
    (tmp_path / "vol.dirty").unlink()
    fresh = await rig.start_mirror()  # no pairing: does not know this replica
    await until(lambda: fresh.state == "in_sync" and fresh.statistics().in_flight == 0)
    assert rig.source_bytes() == rig.replica_bytes()
    assert fresh.resync_regions_sent == 1 + 16  # the changed block and the trimmed MiB, not 16 MiB
    assert fresh.resync_bytes_sent == 64 << 10  # the trimmed MiB went as a zero frame
    assert fresh.pairing.replica_id is not None and fresh.pairing.initial_sync_done


async def test_fua_and_flush_are_durable_on_the_replica_before_the_host_ack(rig, monkeypatch):
    from blockdev.image.file import FileImage

    synced: list[str] = []
    real_flush = FileImage.flush

    def flush(self):  # record fdatasyncs of the replica image (the target applies inline)
        synced.append(self.path)
        return real_flush(self)

    monkeypatch.setattr(FileImage, "flush", flush)
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    replica = str(rig.dst.image_path("vol"))
    synced.clear()
    await rig.write(0, b"a" * 4096)
    assert replica not in synced  # a plain write is acked once applied, without an fdatasync
    await rig.write(4096, b"b" * 4096, fua=True)
    assert synced.count(replica) == 1
    await wait(rig.layer.flush())
    assert synced.count(replica) == 2


async def test_a_write_to_a_cold_extent_waits_for_the_activity_log_without_blocking_the_caller(rig, tmp_path):
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    gate_open = __import__("threading").Event()
    real_commit = rep.al._commit

    def slow_commit(all_idle):  # an fdatasync that takes a while (a busy disk)
        gate_open.wait(5)
        real_commit(all_idle)

    rep.al._commit = slow_commit
    res = rig.layer.pwrite(b"c" * 4096, 12 << 20)  # a cold extent: returns at once, not yet issued
    assert res is not None and not res.done
    assert rig.source_bytes()[12 << 20:(12 << 20) + 4096] == bytes(4096)  # nothing written before the log
    gate_open.set()
    await wait(res)
    assert rig.replica_bytes()[12 << 20:(12 << 20) + 4096] == b"c" * 4096
    assert (12 << 20) // rep.al.extent in ActivityLog(tmp_path / "vol.al").recover()


async def test_overlapping_writes_that_land_out_of_order_are_resent(rig):
    # Write A is issued first (its frame goes first) but lands locally last, as two worker threads can
    # make happen; write B overlaps it. The replica applies A then B, the volume ends with A: the
    # mirror must see the overlap and resend the range, or the replica silently differs.
    import threading

    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    gate = threading.Event()
    real_pwrite = rig.image.pwrite

    def slow_pwrite(data, offset, fua=False):
        if bytes(data[:1]) == b"A":
            gate.wait(10)
        return real_pwrite(data, offset, fua)

    rig.image.pwrite = slow_pwrite
    results = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _run_and_keep(results, lambda: rig.layer.pwrite(b"A" * 65536, 0)))
        await until(lambda: rep._local)  # A's frame is queued, its local write is landing
        await rig.write(0, b"B" * 65536)  # B overlaps A and lands first
        gate.set()
    await wait(results[0])
    assert rig.source_bytes()[:65536] == b"A" * 65536
    assert rep.statistics().conflicts == 1  # B was marked dirty as it overlapped A: the wait covers its resend
    await until(lambda: rep.dirty.count == 0 and rep.statistics().in_flight == 0 and rep.state == "in_sync")
    assert rig.source_bytes() == rig.replica_bytes()
    assert rep.statistics().conflicts == 1


async def _run_and_keep(results: list, fn) -> None:
    results.append(await trio.to_thread.run_sync(fn))


async def test_a_resync_chunk_of_several_frames_ends_its_activity_log_admission_once(rig):
    # One chunk (four regions in one 4 MiB extent) goes as three frames: data, zeroes, data. It was
    # admitted once; if each frame's ack ended it, the count of a host write in flight in the same
    # extent would be taken too, and the extent could leave the log while that write is in flight.
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    region = 64 << 10
    rig.image.pwrite(b"a" * region, 0)  # behind the mirror's back: the resync below must send them
    rig.image.pwrite(b"b" * region, 3 * region)
    await wait(rep.al.admit(2 * MiB, 4096))  # a host write in flight in extent 0
    assert rep.al.in_flight(0) == 1
    for r in range(4):
        rep.dirty.mark_region(r)  # a dirty mark wakes the resync by itself
    await until(lambda: rep.statistics().state == "in_sync" and rep.statistics().in_flight == 0)
    assert rep.resync_regions_sent == 4
    assert rep.al.in_flight(0) == 1  # the chunk's ticket ended once; the host write's is still there
    rep.al.end(2 * MiB, 4096)
    assert rep.al.in_flight(0) == 0
    assert rig.source_bytes() == rig.replica_bytes()


async def test_a_local_write_failing_after_its_frame_left_is_resent_from_the_volume(tmp_path, nursery):
    # ENOSPC on the source after the frame went: the replica holds what the volume refused. The
    # range is marked, the mark wakes the resync, and in_sync is reported only once both agree again.
    from blockdev.layers.faults import Fault, FaultLayer

    rig = Rig(tmp_path, nursery)
    faults = FaultLayer(rig.image)
    rig.layer = MirrorLayer(faults)
    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    faults.arm(Fault("pwrite", errno.ENOSPC, offset=MiB, length=4096, count=1))
    with pytest.raises(BlockError) as e:
        await rig.write(MiB, b"z" * 4096)
    assert to_errno(e.value) == errno.ENOSPC
    st = rep.statistics()
    assert not (st.state == "in_sync" and (st.dirty_bytes or st.in_flight))
    await until(lambda: rep.statistics().state == "in_sync" and rep.statistics().in_flight == 0)
    assert rep.statistics().dirty_bytes == 0
    assert rig.replica_bytes()[MiB:MiB + 4096] == bytes(4096)  # the refused write is gone from the replica too
    assert rig.source_bytes() == rig.replica_bytes()
    nursery.cancel_scope.cancel()


async def test_a_fast_zero_racing_an_overlapping_write_leaves_both_sides_equal(rig):
    # A fast zero's local half runs before its frame is queued (a refusal must reach the host first).
    # Z zeroes locally, then (here: held) queues its frame; meanwhile W overwrites the range, its frame
    # first and its local write after Z's. Replica: W then Z = zeroes; volume: W. The zero's range is
    # registered as landing before it is issued, so W is seen as a conflict and the range resent.
    import threading

    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    await rig.write(0, b"o" * 65536)
    zeroed, gate = threading.Event(), threading.Event()
    real_zero = rig.image.write_zeroes

    def zero_then_stall(length, offset, fua=False, may_trim=True, fast=False):
        res = real_zero(length, offset, fua, may_trim)
        zeroed.set()
        gate.wait(10)  # the frame is queued only after this returns
        return res

    rig.image.write_zeroes = zero_then_stall
    results: list = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _run_and_keep(results, lambda: rig.layer.write_zeroes(65536, 0, fast=True)))
        await until(zeroed.is_set)
        await rig.write(0, b"W" * 65536)  # frame before Z's, local write after Z's
        gate.set()
    await wait(results[0])
    assert rig.source_bytes()[:65536] == b"W" * 65536
    await until(lambda: rep.statistics().state == "in_sync" and rep.statistics().in_flight == 0)
    assert rep.statistics().conflicts == 1
    assert rig.source_bytes() == rig.replica_bytes()


async def _local_half_gated(rig, marker: bytes, error: OSError | None = None):
    """An in-sync mirror whose local pwrites of data starting with ``marker`` wait for the returned
    gate (then fail with ``error``, if given): the replica acknowledges them while they still land."""
    import threading

    await rig.start_target()
    rep = await rig.start_mirror()
    await until(lambda: rep.state == "in_sync")
    await rig.write(0, b"o" * 4096)  # extent 0 hot and logged
    gate = threading.Event()
    real_pwrite = rig.image.pwrite

    def gated_pwrite(data, offset, fua=False):
        if bytes(data[:1]) == marker:
            gate.wait(10)
            if error is not None:
                raise error
        return real_pwrite(data, offset, fua)

    rig.image.pwrite = gated_pwrite
    return rep, gate


async def test_an_extent_stays_in_the_activity_log_until_both_halves_of_a_write_are_done(rig):
    # The replica acknowledges a write whose local half is still landing (a slow worker thread):
    # its extent must stay logged until the local write is done, or a crash in between would leave
    # the replica ahead of the volume with nothing recording it.
    rep, gate = await _local_half_gated(rig, b"L")
    results: list = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _run_and_keep(results, lambda: rig.layer.pwrite(b"L" * 4096, 4096)))
        await until(lambda: rep._local and rep.statistics().in_flight == 0)  # acked, still landing
        assert rep.al.in_flight(0) == 1
        gate.set()
    await wait(results[0])
    assert rep.al.in_flight(0) == 0
    assert rig.source_bytes() == rig.replica_bytes()


async def test_a_write_acked_then_failing_locally_is_marked_before_its_ticket_ends(rig):
    # The replica has the write (acked) while its local half is still landing, then the local half
    # fails (ENOSPC). Its ticket ends when it lands; its range must be dirty by then, or the extent
    # could leave the activity log (map saved, idle) before the mark and a crash would record the
    # difference nowhere.
    rep, gate = await _local_half_gated(rig, b"F", OSError(errno.ENOSPC, "No space left on device"))
    seen: list[bool] = []
    real_end_many = rep.al.end_many

    def end_many(ranges):
        if (65536, 4096) in list(ranges):
            seen.append(rep.dirty.test(1))  # region 1 holds the failing write
        real_end_many(ranges)

    rep.al.end_many = end_many
    results: list = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: _run_and_keep(results, lambda: rig.layer.pwrite(b"F" * 4096, 65536)))
        await until(lambda: rep._local and rep.statistics().in_flight == 0)  # acked, still landing
        gate.set()
    with pytest.raises(OSError) as e:
        await wait(results[0])
    assert e.value.errno == errno.ENOSPC
    assert seen == [True]
    await until(lambda: rep.statistics().state == "in_sync" and rep.statistics().in_flight == 0)
    assert rep.al.in_flight(0) == 0
    assert rig.source_bytes() == rig.replica_bytes()
