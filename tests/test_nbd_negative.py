"""Hostile and broken clients at the socket level: each gets an error or a closed connection, and the
server keeps serving everyone else (checked after every test by a healthy libnbd client).

One server per module (``shared_server``: volumes ``rw`` 64M and ``other`` 16M, plus a read-only
``ro`` on a second socket), so damage done by one test would show up in the next.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockdev.nbd import proto as P
from blockdev.nbd.session import BUF_SIZE
from tests.facilities import require_nbd

nbd = require_nbd()

MiB = 1 << 20
SIZE = 64 * MiB
EINVAL, EPERM, ENOSPC = P.EINVAL, P.EPERM, P.ENOSPC


@pytest.fixture
def srv(shared_server):
    yield shared_server
    check_healthy(shared_server)


def check_healthy(server) -> None:  # type: ignore[no-untyped-def]
    """A well-behaved client still gets correct service on another volume and the attacked one."""
    assert server.alive(), server.log()
    for name in ("other", "rw"):
        h = nbd.NBD()
        h.connect_uri(server.uri(name))
        data = name.encode() * 1000
        h.pwrite(data, 4096)
        assert h.pread(len(data), 4096) == data
        h.shutdown()


@pytest.fixture
def client(srv, raw_nbd):
    """A raw client in the transmission phase of ``rw`` with structured replies."""
    c = raw_nbd(srv.sock)
    size, _ = c.go("rw")
    assert size == SIZE
    return c


# -- handshake ----------------------------------------------------------------------------------------
def test_bad_client_flags_close_the_connection(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting(client_flags=0x80)
    assert c.closed_by_server()


def test_client_without_fixed_newstyle_is_refused(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting(client_flags=0)
    assert c.closed_by_server()


def test_bad_option_magic_closes_the_connection(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting()
    c.send(struct.pack(">QII", 0x1122334455667788, P.OPT_GO, 0))
    assert c.closed_by_server()


def test_unknown_option_is_refused_and_negotiation_continues(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting()
    c.option(0xDEAD, b"payload")
    assert c.opt_reply()[:2] == (0xDEAD, P.REP_ERR_UNSUP)
    c.option(P.OPT_STARTTLS)
    assert c.opt_reply()[1] == P.REP_ERR_POLICY
    c.option(P.OPT_GO, c.go_payload("rw"))
    assert c.opt_replies()[-1][1] == P.REP_ACK
    assert c.call(P.CMD_READ, 0, 512)[0] == 0


def test_oversized_option_is_skipped_with_too_big(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting()
    c.option(P.OPT_INFO, b"\0" * (P.MAX_OPTION + 1000))
    assert c.opt_reply()[1] == P.REP_ERR_TOO_BIG
    c.option(P.OPT_LIST)
    reps = c.opt_replies()
    names = sorted(d[4:].decode() for _, r, d in reps if r == P.REP_SERVER)
    assert names == ["other", "rw"] and reps[-1][1] == P.REP_ACK


def test_malformed_go_and_unknown_export_then_go_works(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting()
    c.option(P.OPT_GO, b"\0\0\0\x09rw")  # name length beyond the payload
    assert c.opt_reply()[1] == P.REP_ERR_INVALID
    c.option(P.OPT_GO, c.go_payload("no-such-volume"))
    assert c.opt_reply()[1] == P.REP_ERR_UNKNOWN
    c.option(P.OPT_GO, c.go_payload("../rw"))
    assert c.opt_reply()[1] == P.REP_ERR_UNKNOWN
    c.option(P.OPT_GO, c.go_payload("other"))
    assert c.opt_replies()[-1][1] == P.REP_ACK
    assert c.call(P.CMD_READ, 0, 4096)[0] == 0


def test_option_misuse_is_refused_and_negotiation_continues(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting()
    c.option(P.OPT_LIST, b"junk")
    assert c.opt_reply()[1] == P.REP_ERR_INVALID
    c.option(P.OPT_SET_META_CONTEXT, b"\0" * 12)  # before structured replies
    assert c.opt_reply()[1] == P.REP_ERR_INVALID
    c.option(P.OPT_STRUCTURED_REPLY)
    assert c.opt_reply()[1] == P.REP_ACK
    c.option(P.OPT_STRUCTURED_REPLY)
    assert c.opt_reply()[1] == P.REP_ERR_INVALID
    c.option(P.OPT_STRUCTURED_REPLY, b"x")
    assert c.opt_reply()[1] == P.REP_ERR_INVALID
    c.option(P.OPT_SET_META_CONTEXT, b"\0\0\0\x02rw\0\0\0\x05")  # query count beyond the payload
    assert c.opt_reply()[1] == P.REP_ERR_INVALID
    c.option(P.OPT_GO, c.go_payload("rw"))
    assert c.opt_replies()[-1][1] == P.REP_ACK
    assert c.call(P.CMD_READ, 0, 512)[0] == 0


def test_info_reports_block_size_and_name(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting()
    c.option(P.OPT_INFO, c.go_payload("other", (P.INFO_NAME, P.INFO_BLOCK_SIZE)))
    infos = {struct.unpack_from(">H", d)[0]: d[2:] for _, r, d in c.opt_replies() if r == P.REP_INFO}
    assert struct.unpack(">QH", infos[P.INFO_EXPORT])[0] == 16 * MiB
    assert infos[P.INFO_NAME] == b"other"
    assert struct.unpack(">III", infos[P.INFO_BLOCK_SIZE]) == (1, 4096, 32 * MiB)


def test_abort_is_acknowledged_then_closed(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting()
    c.option(P.OPT_ABORT)
    assert c.opt_reply()[1] == P.REP_ACK
    assert c.closed_by_server()


def test_export_name_option_enters_transmission(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting(client_flags=P.FLAG_FIXED_NEWSTYLE)  # without NO_ZEROES: 124 bytes of padding follow
    c.option(P.OPT_EXPORT_NAME, b"other")
    size, tflags = struct.unpack(">QH", c.recv_exact(10))
    assert size == 16 * MiB and tflags & P.TFLAG_HAS_FLAGS and not tflags & P.TFLAG_READ_ONLY
    assert c.recv_exact(124) == bytes(124)
    assert c.call(P.CMD_WRITE, 0, 3, payload=b"abc")[0] == 0
    assert c.call(P.CMD_READ, 0, 3) == (0, b"abc")


def test_requests_sent_with_the_go_option_in_one_packet(srv, raw_nbd):
    # The handshake's last recv may already hold transmission-phase bytes: they must not be lost.
    c = raw_nbd(srv.sock)
    c.greeting()
    reqs = (struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 8192, 5) + b"hello"
            + struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 8192, 5))
    c.send(struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, len(c.go_payload("rw"))) + c.go_payload("rw") + reqs)
    assert c.opt_replies()[-1][1] == P.REP_ACK
    assert c.reply() == (1, 0, b"")
    assert c.reply(5) == (2, 0, b"hello")


def test_client_sending_one_byte_at_a_time(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.recv_exact(18)
    go = c.go_payload("rw")
    stream = (struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
              + struct.pack(">QII", P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0)
              + struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, len(go)) + go
              + struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 12288, 6) + b"byte!!"
              + struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 12288, 6))
    for i in range(len(stream)):
        c.send(stream[i:i + 1])
    assert c.opt_reply()[1] == P.REP_ACK
    assert c.opt_replies()[-1][1] == P.REP_ACK
    assert [c.reply() for _ in range(2)] == [(1, 0, b""), (2, 0, b"byte!!")]


def test_export_name_of_unknown_volume_closes(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.greeting()
    c.option(P.OPT_EXPORT_NAME, b"nope")
    assert c.closed_by_server()


def test_client_vanishing_mid_handshake(srv, raw_nbd):
    for cut in (3, 10, 20):
        c = raw_nbd(srv.sock)
        c.greeting()
        c.send((struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, 100) + b"x" * 50)[:cut])
        c.close()


# -- transmission: errors that keep the connection --------------------------------------------------
@pytest.mark.parametrize("cmd", [P.CMD_READ, P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES, P.CMD_CACHE])
@pytest.mark.parametrize("offset,length", [(SIZE - 100, 4096), (SIZE, 1), (2**64 - 512, 1024)],
                         ids=["straddles-end", "at-end", "huge-offset"])
def test_out_of_bounds_is_einval_or_enospc_and_connection_survives(client, cmd, offset, length):
    payload = b"z" * length if cmd == P.CMD_WRITE else b""
    want = ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else EINVAL  # the spec's SHOULDs
    assert client.call(cmd, offset, length, payload=payload)[0] == want
    assert client.call(P.CMD_READ, 0, 512)[0] == 0


def test_oversize_write_is_refused_and_payload_skipped(client):
    big = P.MAX_PAYLOAD + 4096
    client.request(P.CMD_WRITE, 0, big, handle=11)
    # The server must read past the whole payload (it is not a request) and answer once.
    chunk = b"\x25\x60\x95\x13" * (MiB // 4)  # looks like request magic: must not be parsed
    sent = 0
    while sent < big:
        n = min(len(chunk), big - sent)
        client.send(chunk[:n])
        sent += n
    handle, err, _ = client.reply()
    assert (handle, err) == (11, EINVAL)
    assert client.call(P.CMD_WRITE, 4096, 4, payload=b"next")[0] == 0
    assert client.call(P.CMD_READ, 4096, 4) == (0, b"next")


@pytest.mark.parametrize("flags", [0, P.CMD_FLAG_DF])
def test_oversize_read_is_einval_and_connection_survives(client, flags):
    assert client.call(P.CMD_READ, 0, P.MAX_PAYLOAD + 1, flags=flags)[0] == EINVAL
    err, data = client.call(P.CMD_READ, 0, P.MAX_PAYLOAD)
    assert err == 0 and len(data) == P.MAX_PAYLOAD


def test_largest_requests_round_trip_after_a_small_one(client):
    # A payload bigger than the 16 MiB receive buffer, arriving behind a small request in the same send.
    blob = os.urandom(P.MAX_PAYLOAD)
    small = struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 3) + b"abc"
    client.send(small + struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_WRITE, 2, 4096, len(blob)) + blob)
    assert sorted(client.reply()[:2] for _ in range(2)) == [(1, 0), (2, 0)]
    assert client.call(P.CMD_READ, 4096, len(blob)) == (0, blob)
    assert client.call(P.CMD_READ, 0, 3) == (0, b"abc")


def test_oversize_read_without_structured_replies_is_einval(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.go("rw", structured=False)
    assert c.call(P.CMD_READ, 0, P.MAX_PAYLOAD + 1)[0] == EINVAL
    assert c.call(P.CMD_READ, 0, 8)[0] == 0


def test_unknown_command_and_flags_are_einval(client):
    assert client.call(42, 0, 512)[0] == EINVAL
    assert client.call(P.CMD_READ, 0, 512, flags=0x8000)[0] == EINVAL
    assert client.call(P.CMD_WRITE, 0, 4, flags=P.CMD_FLAG_NO_HOLE, payload=b"abcd")[0] == EINVAL
    assert client.call(P.CMD_READ, 0, 512)[0] == 0


def test_block_status_without_meta_context_is_einval(client):
    assert client.call(P.CMD_BLOCK_STATUS, 0, 4096)[0] == EINVAL


def test_block_status_reply_with_meta_context(srv, raw_nbd):
    c = raw_nbd(srv.sock)
    c.go("rw", base_allocation=True)
    err, body = c.call(P.CMD_BLOCK_STATUS, 0, SIZE)
    assert err == 0
    ctx, = struct.unpack_from(">I", body)
    extents = [struct.unpack_from(">II", body, 4 + 8 * i) for i in range((len(body) - 4) // 8)]
    assert ctx == P.META_CONTEXT_ID and sum(n for n, _ in extents) == SIZE
    assert c.call(P.CMD_BLOCK_STATUS, 0, 0)[0] == EINVAL


def test_structured_read_of_zero_length_and_error_chunk(client):
    assert client.call(P.CMD_READ, 0, 0) == (0, b"")
    client.request(P.CMD_READ, SIZE, 4096, handle=5)
    assert client.reply()[:2] == (5, EINVAL)


def test_pipelined_requests_are_all_answered_by_handle(client):
    n = 200
    for i in range(n):
        client.request(P.CMD_WRITE, i * 4096, 4096, handle=1000 + i, payload=bytes([i % 256]) * 4096)
    client.request(P.CMD_FLUSH, handle=5000)
    handles = {client.reply()[0] for _ in range(n + 1)}
    assert handles == set(range(1000, 1000 + n)) | {5000}
    for i in range(0, n, 37):
        assert client.call(P.CMD_READ, i * 4096, 4096) == (0, bytes([i % 256]) * 4096)


# -- read-only exports ------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES])
def test_write_like_commands_on_read_only_export_are_eperm(srv, raw_nbd, cmd):
    c = raw_nbd(srv.ro.sock)
    _, tflags = c.go("ro")
    assert tflags & P.TFLAG_READ_ONLY
    payload = b"w" * 4096 if cmd == P.CMD_WRITE else b""
    assert c.call(cmd, 0, 4096, payload=payload)[0] == EPERM
    assert c.call(cmd, 0, 4096, flags=P.CMD_FLAG_FUA, payload=payload)[0] == EPERM
    assert c.call(P.CMD_READ, 0, 4096) == (0, bytes(4096))
    assert c.call(P.CMD_FLUSH)[0] == 0


def test_libnbd_write_on_read_only_export_fails_eperm(srv):
    h = nbd.NBD()
    h.connect_uri(srv.ro.uri("ro"))
    assert h.is_read_only()
    h.set_strict_mode(0)  # let the request reach the server instead of failing in libnbd
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 512, 0)
    assert e.value.errno in ("EPERM", errno.EPERM)
    assert "command failed" in e.value.string  # the server's answer, not libnbd's own check
    h.shutdown()


# -- transmission: errors that end the connection, never the server ---------------------------------
def test_bad_request_magic_closes_only_that_connection(client, srv, raw_nbd):
    other = raw_nbd(srv.sock)
    other.go("other")
    client.send(struct.pack(">IHHQQI", 0xBADBAD00, 0, P.CMD_READ, 1, 0, 512))
    assert client.closed_by_server()
    assert other.call(P.CMD_READ, 0, 512)[0] == 0


def test_client_vanishing_mid_payload(srv, raw_nbd):
    other = raw_nbd(srv.sock)
    other.go("rw")
    for length, payload_sent in ((MiB, 0), (MiB, 1), (MiB, 100_000), (MiB, MiB - 1),
                                 (P.MAX_PAYLOAD, 20 * MiB)):
        c = raw_nbd(srv.sock)
        c.go("rw")
        c.request(P.CMD_WRITE, 0, length, payload=b"v" * payload_sent)
        c.close()
    c = raw_nbd(srv.sock)
    c.go("rw")
    c.send(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, 512)[:17])
    c.close()
    assert other.call(P.CMD_READ, 0, 512)[0] == 0


def test_client_vanishing_with_replies_unread(srv, raw_nbd):
    for _ in range(3):
        c = raw_nbd(srv.sock)
        c.go("rw")
        for i in range(64):
            c.request(P.CMD_READ, 0, MiB, handle=i)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        c.close()


def test_client_that_never_reads_replies_does_not_stall_others(srv, raw_nbd):
    hog = raw_nbd(srv.sock)
    hog.go("rw")
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stop = threading.Event()

    def flood() -> None:
        try:
            i = 0
            while not stop.is_set():
                hog.request(P.CMD_READ, 0, 8 * MiB, handle=i)
                i += 1
        except OSError:
            pass  # the server stopped reading from us (back-pressure): our send times out

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        h = nbd.NBD()
        h.connect_uri(srv.uri("other"))
        for i in range(50):
            h.pwrite(bytes([i]) * 65536, 0)
            assert h.pread(65536, 0) == bytes([i]) * 65536
        h.shutdown()
    finally:
        stop.set()
        hog.sock.shutdown(socket.SHUT_RDWR)  # wakes the flood thread's blocked send
        t.join(15)
        hog.close()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def test_burst_of_huge_reads_is_answered_within_bounded_memory(srv, raw_nbd):
    # 24 reads of 32 MiB in one 672-byte send: the server must not build 768 MiB of replies at once.
    before = rss(srv.proc.pid)
    c = raw_nbd(srv.sock)
    c.go("rw")
    n = 24
    c.send(b"".join(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, i, 0, P.MAX_PAYLOAD)
                    for i in range(n)))
    other = raw_nbd(srv.sock)
    other.go("other")
    assert other.call(P.CMD_READ, 0, 4096)[0] == 0  # served while the burst waits for its reader
    assert rss(srv.proc.pid) - before < 400 * MiB
    handles = set()
    for _ in range(n):
        h, err, data = c.reply()
        assert err == 0 and len(data) == P.MAX_PAYLOAD
        handles.add(h)
    assert handles == set(range(n))
    assert rss(srv.proc.pid) - before < 400 * MiB


def test_flood_of_one_byte_reads_never_read_keeps_the_server_small(srv, raw_nbd):
    # The case: 4.5M one-byte READs, replies never read, grew the server by 635 MiB. Now it stops
    # reading once its queued replies reach their bound (pieces, not only bytes), so our sends block.
    before = rss(srv.proc.pid)
    hog = raw_nbd(srv.sock)
    hog.go("rw", structured=False)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.sock.setblocking(False)
    chunk = b"".join(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, i, i, 1) for i in range(32768))
    total, sent = 4_000_000 * 28, 0  # unbounded, these were ~600 MiB of queued replies
    view = memoryview(chunk)
    while sent < total:
        try:
            n = hog.sock.send(view[sent % len(chunk):])
        except BlockingIOError:
            # No progress for 2 s: the server stopped reading us. (If it were merely slow, the bounds
            # below would still hold; only an unbounded server would finish taking all 112 MB.)
            if not select.select([], [hog.sock], [], 2.0)[1]:
                break
            continue
        sent += n
    # What it may take: one receive buffer of requests (one recv can fill it), its bounded replies and
    # the kernel's socket buffers on both ends (their autotuned sizes differ between machines).
    assert sent < BUF_SIZE + 16 * MiB, f"the server took {sent} bytes of requests whose replies nobody reads"
    assert rss(srv.proc.pid) - before < 100 * MiB
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST: drop it all


def test_disconnect_request_closes_cleanly(client):
    client.request(P.CMD_DISC, handle=3)
    assert client.closed_by_server()


def test_idle_handshake_does_not_block_others(srv, raw_nbd):
    idle = [raw_nbd(srv.sock) for _ in range(20)]  # connected, never say anything
    c = raw_nbd(srv.sock)
    c.go("other")
    assert c.call(P.CMD_READ, 0, 512)[0] == 0
    assert len(idle) == 20


# -- fuzz ---------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=600))
def test_garbage_after_go_never_hurts_the_server(shared_server, raw_nbd, garbage):
    c = raw_nbd(shared_server.sock)
    try:
        c.go("other")
        c.send(garbage)
        c.sock.shutdown(socket.SHUT_WR)
        try:
            while c.sock.recv(65536):
                pass
        except OSError:
            pass
    finally:
        c.close()
    assert shared_server.alive()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=300))
def test_garbage_in_handshake_never_hurts_the_server(shared_server, raw_nbd, garbage):
    c = raw_nbd(shared_server.sock)
    try:
        c.recv_exact(18)
        c.send(struct.pack(">I", 3) + garbage)
        c.sock.shutdown(socket.SHUT_WR)
        try:
            while c.sock.recv(65536):
                pass
        except OSError:
            pass
    finally:
        c.close()
    assert shared_server.alive()


def test_server_still_healthy_after_fuzzing(shared_server):
    check_healthy(shared_server)
