"""Hand-driven replication peers over real TCP sockets, for the tests of a running target."""
from __future__ import annotations

import json
import os

import trio

from mirror.wire import Connection, Role, codec
from mirror.wire.events import PROTOCOL_VERSION, Bye, Hello

SIZE = 4 << 20
UUID = "9f1d6d7e-1111-4c4c-8888-000000000001"
OTHER = "9f1d6d7e-2222-4c4c-8888-000000000002"


class RawSource:
    """A hand-driven source over a real TCP socket."""

    def __init__(self, stream: trio.SocketStream, conn: Connection) -> None:
        self.stream, self.conn, self.seq = stream, conn, 0
        self.reader = codec.FrameReader(1 << 20)

    @classmethod
    async def connect(cls, port: int, uuid: str = UUID, size: int = SIZE, name: str = "vol") -> RawSource:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = Connection(Role.SOURCE)
        conn.start(Hello(PROTOCOL_VERSION, uuid, name, size, 4096, 1, b""))
        await stream.send_all(conn.data_to_send())
        with trio.fail_after(5):
            while True:
                data = await stream.receive_some(65536)
                assert data, "the target closed the link during the handshake"
                conn.receive_data(data)
                evs = conn.next_events()
                await stream.send_all(conn.data_to_send())
                if evs:
                    return cls(stream, conn)

    async def send(self, *frames: bytes) -> None:
        await self.stream.send_all(b"".join(frames))

    def write(self, offset: int, data: bytes, fua: bool = False) -> bytes:
        self.seq += 1
        return b"".join(bytes(x) for x in codec.encode_write(self.seq, offset, data, fua))

    def flush(self) -> bytes:
        self.seq += 1
        return codec.encode_flush(self.seq)

    async def events(self, timeout: float = 5.0) -> list:
        with trio.fail_after(timeout):
            while True:
                evs = self.reader.frames()
                if evs:
                    return evs
                data = await self.stream.receive_some(1 << 20)
                assert data, "the target closed the link"
                self.reader.feed(data)

    async def until_ack(self, seq: int, timeout: float = 5.0) -> list:
        seen: list = []
        with trio.fail_after(timeout):
            while True:
                evs = await self.events(timeout)
                seen += evs
                if any(type(e) is codec.Ack and e.seq >= seq for e in evs):
                    return seen

    async def close(self) -> None:
        await self.stream.send_all(codec.encode(Bye()))
        await self.stream.aclose()


async def legit_source_mirrors(port: int, replicas, offset: int = 8192) -> None:
    """A legitimate source connects, writes, flushes and is acknowledged; the replica has the data."""
    src = await RawSource.connect(port)
    payload = os.urandom(4096)
    await src.send(src.write(offset, payload), src.flush())
    await src.until_ack(src.seq)
    fd = os.open(replicas / "vol.img", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, offset) == payload
    finally:
        os.close(fd)
    await src.close()


async def drained(stream: trio.SocketStream) -> bytes:
    """Everything the target sends until it hangs up (a reset counts as a hang-up)."""
    data = b""
    with trio.fail_after(5):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


def json_frame(ftype: int, payload: bytes) -> bytes:
    return codec._frame(ftype, payload) + payload


def hello_json(**over) -> bytes:
    d = {"version": PROTOCOL_VERSION, "volume_uuid": OTHER, "name": "x", "size": SIZE, "block_size": 4096,
         "generation": 1, "nonce": "ab" * 32, "mode": "sync", "caps": []}
    d.update(over)
    return json_frame(codec.T_HELLO, json.dumps(d).encode())


def hashq(req: int, leaf: int, level: int, indices) -> bytes:
    payload = json.dumps({"req": req, "leaf_size": leaf, "level": level, "indices": indices}).encode()
    return json_frame(codec.T_HASHQ, payload)
