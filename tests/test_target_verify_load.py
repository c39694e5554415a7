"""`verify` of a multi-GiB volume holding data keeps the sync link in sync: the target hashes in a
worker thread while it goes on applying and acknowledging writes (the source's silence timeout is
1 s here, far below the time the replica's tree takes from a cold cache)."""
from __future__ import annotations

import os

import trio

from blockdev.backend import wait
from blockdev.volume import VolumeStore
from mirror.dirty import ActivityLog, DirtyMap
from mirror.layer import MirrorLayer
from mirror.sync import Pairing, SyncConfig, SyncReplicator, VolumeIdentity
from mirror.target import TargetConfig, TargetServer
from mirror.verify import compare

MiB = 1 << 20
SIZE = 4 << 30
REGION = 64 << 10


async def until(pred, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


async def test_verify_of_a_4_gib_volume_keeps_the_link_in_sync(tmp_path, nursery):
    src, dst = VolumeStore(tmp_path / "src"), VolumeStore(tmp_path / "dst")
    meta = src.create("vol", SIZE)
    image = src.open_image("vol")
    block = bytearray(os.urandom(MiB))
    for i in range(320):  # 320 MiB of data spread over the volume
        block[0] = i % 256
        image.pwrite(bytes(block), i * 12 * MiB)
    server = TargetServer(dst, TargetConfig(timeout=5))
    port = int((await nursery.start(server.serve, "127.0.0.1", 0)).rsplit(":", 1)[1])
    dirty = DirtyMap.load(SIZE, REGION, tmp_path / "vol.dirty")
    cfg = SyncConfig("127.0.0.1", port, timeout=1.0, keepalive=0.2, backoff_min=0.05, backoff_max=0.2)
    rep = SyncReplicator(cfg, VolumeIdentity(meta.uuid, "vol", SIZE, 4096, 1), image, dirty,
                         ActivityLog(tmp_path / "vol.al", before_evict=dirty.save), Pairing())
    layer = MirrorLayer(image)
    layer.attach(rep)
    await nursery.start(rep.run)
    await until(lambda: rep.state == "in_sync" and rep.dirty.count == 0, 60)  # the initial sync

    def evict() -> None:  # the replica's tree must come from the disk, not the page cache
        fd = os.open(dst.image_path("vol"), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    # On a worker thread: an fsync of 320 MiB on the event loop stalled both ends of the link past
    # the 1 s silence timeout (the test, not the target, went silent).
    await trio.to_thread.run_sync(evict)
    connects = rep.statistics().connects

    done = trio.Event()
    box = []

    async def run_verify():
        box.append(await compare(image, SIZE, REGION, rep.query_hashes))
        done.set()

    nursery.start_soon(run_verify)
    written: list[int] = []
    slowest = 0.0
    with trio.fail_after(30):
        while not done.is_set():
            off = (len(written) * 7919 % 4096) * MiB + 4096
            t0 = trio.current_time()
            # Acknowledged by the replica (a sync mirror), issued on a worker thread as the NBD server
            # does: no FUA (an fdatasync under other tests' writeback can take seconds on its own, and
            # the test is about the target acking while it hashes), and nothing blocking on the event
            # loop, which runs both ends of the link here.
            await wait(await trio.to_thread.run_sync(layer.pwrite, b"v" * 4096, off))
            slowest = max(slowest, trio.current_time() - t0)
            written.append(off)
            assert rep.state == "in_sync", f"the link left in_sync during verify: {rep.last_error}"
            await trio.sleep(0.01)
    assert rep.statistics().connects == connects  # never reconnected
    assert slowest < 0.9, f"a write waited {slowest:.2f}s for its ack during verify"
    # Writes that raced the two trees may show up as differing; nothing else may.
    touched = {off // REGION for off in written}
    assert set(box[0].differing_blocks) <= touched
