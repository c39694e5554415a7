"""blockdev/tls.py's TlsChannel in one process: a socketpair, writes of every size, reads into
buffers of every size; what arrives is what was sent, and an altered record is an error."""
from __future__ import annotations

import random
import socket
import ssl

import pytest
import trio

from blockdev.tls import TlsChannel, TlsError, client_context, server_context, start_tls
from mirror import keys as K


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    d = tmp_path_factory.mktemp("site")
    K.generate(d)
    kd = K.key_dir(d)
    return server_context(str(kd / K.CERT_FILE), str(kd / K.KEY_FILE)), client_context()


async def _pair(contexts) -> tuple[TlsChannel, TlsChannel, socket.socket, socket.socket]:  # type: ignore[no-untyped-def]
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    out: dict[str, TlsChannel] = {}

    async def side(name: str, sock: socket.socket, ctx: ssl.SSLContext, server: bool) -> None:
        out[name] = await start_tls(sock, ctx, server, 5.0)

    async with trio.open_nursery() as n:
        n.start_soon(side, "c", a, contexts[1], False)
        n.start_soon(side, "s", b, contexts[0], True)
    return out["c"], out["s"], a, b


async def _send(ch: TlsChannel, parts: list[bytes]) -> None:
    bufs: list[bytes | memoryview] = list(parts)
    while bufs:
        try:
            n = ch.sendmsg(bufs)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(ch)
            continue
        while n:
            if n >= len(bufs[0]):
                n -= len(bufs.pop(0))
            else:
                bufs[0], n = memoryview(bufs[0])[n:], 0
    while not ch.flush():
        await trio.lowlevel.wait_writable(ch)


async def _receive(ch: TlsChannel, total: int, rng: random.Random) -> bytes:
    got = bytearray()
    while len(got) < total:
        buf = memoryview(bytearray(rng.choice([1, 7, 4096, 16384, 100_000, 1 << 20])))
        try:
            n = ch.recv_into(buf)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(ch)
            continue
        assert n > 0
        got += buf[:n]
    return bytes(got)


@pytest.mark.parametrize("seed", range(4))
async def test_every_byte_arrives_in_order_whatever_the_write_and_read_sizes(contexts, seed):
    rng = random.Random(seed)
    c, s, a, b = await _pair(contexts)
    try:
        parts = [rng.randbytes(rng.choice([0, 1, 32, 4096, 70_000, 300_000, 1 << 20])) for _ in range(40)]
        data = b"".join(parts)
        result: list[bytes] = []

        async def reader() -> None:
            result.append(await _receive(s, len(data), rng))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await _send(c, [p for p in parts if p])
        assert result[0] == data
        await _send(s, [b"ack"])  # and back
        assert await _receive(c, 3, rng) == b"ack"
    finally:
        a.close()
        b.close()


async def test_an_altered_record_is_an_ssl_error_and_end_of_stream_is_zero(contexts):
    c, s, a, b = await _pair(contexts)
    try:
        c.obj.write(b"x" * 5000)
        record = bytearray(c._out.read())
        record[len(record) // 2] ^= 1
        a.send(record)
        await trio.lowlevel.wait_readable(b)
        with pytest.raises(ssl.SSLError):
            s.recv_into(memoryview(bytearray(65536)))
    finally:
        a.close()
    await trio.lowlevel.wait_readable(b)
    _, s2, a2, b2 = await _pair(contexts)
    a2.close()
    await trio.lowlevel.wait_readable(b2)
    assert s2.recv_into(memoryview(bytearray(100))) == 0
    b.close()
    b2.close()


async def test_a_peer_that_does_not_speak_tls_fails_the_handshake_with_its_bytes_kept(contexts):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.sendall(b"\x00\x00\x00\x10 not a TLS record at all")
    with pytest.raises(TlsError, match="TLS handshake failed") as info:
        await start_tls(a, contexts[1], False, 5.0)
    assert info.value.seen.startswith(b"\x00\x00\x00\x10")
    a.close()
    b.close()
