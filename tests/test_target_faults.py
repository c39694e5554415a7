"""Hostile and broken peers: garbage frames, silence, bad requests. Nothing corrupts a replica."""
from __future__ import annotations

import os
import random

import pytest
import trio

from blockdev.backend import wait
from blockdev.volume import VolumeStore
from mirror.dirty import ActivityLog, DirtyMap
from mirror.sync import Pairing, SyncConfig, SyncReplicator, VolumeIdentity
from mirror.target import TargetConfig, TargetServer
from mirror.wire import Connection, Role, codec
from mirror.wire.events import PROTOCOL_VERSION, Hello

SIZE = 4 << 20


async def start_target(nursery, tmp, psk=None, timeout=5.0):
    server = TargetServer(VolumeStore(tmp / "dst"), TargetConfig(psk=psk, timeout=timeout))
    addr = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, int(addr.rsplit(":", 1)[1])


async def raw_handshake(port: int, size: int = SIZE) -> trio.SocketStream:
    """A hand-driven source: authenticated and welcomed, ready for data frames."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = Connection(Role.SOURCE)
    conn.start(Hello(PROTOCOL_VERSION, "9f1d6d7e-1111-4c4c-8888-000000000001", "vol", size, 4096, 1, b""))
    await stream.send_all(conn.data_to_send())
    while True:
        conn.receive_data(await stream.receive_some(65536))
        evs = conn.next_events()
        await stream.send_all(conn.data_to_send())
        if evs:
            return stream


async def read_error(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return data
            data += chunk


async def test_garbage_after_the_handshake_is_refused_and_the_replica_untouched(tmp_path, nursery):
    server, port = await start_target(nursery, tmp_path)
    stream = await raw_handshake(port)
    good = b"".join(bytes(x) for x in codec.encode_write(1, 0, b"A" * 4096))
    bad = bytearray(b"".join(bytes(x) for x in codec.encode_write(2, 4096, b"B" * 4096)))
    bad[100] ^= 1  # one flipped payload bit
    await stream.send_all(good + bytes(bad))
    reply = await read_error(stream)
    assert b"checksum mismatch" in reply  # the source is told why
    img = (tmp_path / "dst" / "vol.img").read_bytes()
    assert img[:4096] == b"A" * 4096 and img[4096:8192] == bytes(4096)  # the bad frame was not applied
    assert not server.active


async def test_random_garbage_never_kills_the_target(tmp_path, nursery):
    _, port = await start_target(nursery, tmp_path)
    rng = random.Random(9)
    for _ in range(20):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await s.send_all(rng.randbytes(rng.randint(1, 5000)))
        except trio.BrokenResourceError:
            pass
        await read_error(s)
        await s.aclose()
    stream = await raw_handshake(port)  # still serving real sources
    await stream.send_all(codec.encode_flush(1))
    with trio.fail_after(5):
        data = await stream.receive_some(65536)
    assert codec.HEADER.unpack_from(data)[1] == codec.T_ACK


async def test_write_beyond_the_replica_end_is_refused(tmp_path, nursery):
    _, port = await start_target(nursery, tmp_path)
    stream = await raw_handshake(port)
    await stream.send_all(b"".join(bytes(x) for x in codec.encode_write(1, SIZE - 512, b"x" * 4096)))
    assert b"beyond the replica" in await read_error(stream)
    assert os.path.getsize(tmp_path / "dst" / "vol.img") == SIZE


async def test_size_mismatch_is_refused_with_a_clear_error(tmp_path, nursery):
    _, port = await start_target(nursery, tmp_path)
    (await raw_handshake(port)).socket.close()
    await trio.sleep(0.1)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = Connection(Role.SOURCE)
    conn.start(Hello(PROTOCOL_VERSION, "9f1d6d7e-1111-4c4c-8888-000000000001", "vol", 2 * SIZE, 4096, 1, b""))
    await stream.send_all(conn.data_to_send())
    conn.receive_data(await stream.receive_some(65536))
    conn.next_events()
    await stream.send_all(conn.data_to_send())
    assert b"size mismatch" in await read_error(stream)


def replicator(tmp, port, **over) -> SyncReplicator:
    store = VolumeStore(tmp / "src")
    meta = store.create("vol", SIZE)
    image = store.open_image("vol")
    dirty = DirtyMap(SIZE, 64 << 10, tmp / "d")
    cfg = SyncConfig("127.0.0.1", port, timeout=0.5, keepalive=0.1, backoff_min=0.05, backoff_max=0.1, **over)
    return SyncReplicator(cfg, VolumeIdentity(meta.uuid, "vol", SIZE, 4096, 1), image, dirty,
                          ActivityLog(tmp / "al"), Pairing())


async def fake_target(nursery, behaviour) -> int:
    lst = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = lst.socket.getsockname()[1]

    async def serve():
        async with lst:
            while True:
                s = await lst.accept()
                nursery.start_soon(behaviour, s)

    nursery.start_soon(serve)
    return port


@pytest.mark.parametrize("kind", ["garbage", "silent"])
async def test_source_reports_a_broken_or_silent_target_and_stays_degraded(tmp_path, nursery, kind):
    async def garbage(s):
        await s.receive_some(65536)
        await s.send_all(os.urandom(300))

    async def silent(s):
        await trio.sleep_forever()

    port = await fake_target(nursery, garbage if kind == "garbage" else silent)
    rep = replicator(tmp_path, port)
    await nursery.start(rep.run)
    with trio.fail_after(5):
        while rep.last_error is None:
            await trio.sleep(0.02)
    want = "bad frame" if kind == "garbage" else "did not complete the handshake"
    assert want in rep.last_error and rep.state == "disconnected"
    await wait(rep.admit(0, 512))  # the seam admits every write first (mirror/layer.py)
    assert rep.on_write(0, b"x" * 512, False) is None  # degrade: the host write goes on locally
    assert rep.dirty.count == 1


async def test_a_target_that_stops_acking_is_declared_silent_and_the_write_degrades(tmp_path, nursery):
    from mirror.wire.events import Welcome

    async def handshake_then_hang(s):
        conn = Connection(Role.TARGET)
        while True:
            conn.receive_data(await s.receive_some(65536))
            evs = conn.next_events()
            await s.send_all(conn.data_to_send())
            if evs:
                break
        conn.accept(Welcome("rid", "vol", True, 1))
        await s.send_all(conn.data_to_send())
        await trio.sleep_forever()  # alive, reading nothing, acking nothing

    port = await fake_target(nursery, handshake_then_hang)
    rep = replicator(tmp_path, port)
    await nursery.start(rep.run)
    with trio.fail_after(5):
        while rep.state != "in_sync":
            await trio.sleep(0.02)
    await wait(rep.admit(8192, 4096))  # the seam admits every write first (mirror/layer.py)
    c = rep.on_write(8192, b"y" * 4096, False)
    assert c is not None and not c.done
    with trio.fail_after(5):
        while not c.done:
            await trio.sleep(0.02)
    assert c.exception is None  # degrade: completed locally once the link was declared dead
    assert "went silent" in rep.last_error and rep.state == "degraded"
    assert list(rep.dirty) == [0]  # and its region is marked for resync


async def test_a_reconnecting_source_takes_over_from_its_stale_link(tmp_path, nursery):
    server, port = await start_target(nursery, tmp_path, timeout=30)
    stale = await raw_handshake(port)  # e.g. a link cut by a partition: still open on the target
    assert list(server.active) == ["vol"]
    fresh = await raw_handshake(port)  # the same source, authenticated again: accepted at once
    await fresh.send_all(codec.encode_flush(1))
    with trio.fail_after(5):
        data = await fresh.receive_some(65536)
    assert codec.HEADER.unpack_from(data)[1] == codec.T_ACK
    assert await read_error(stale) == b""  # the stale link was closed by the target
