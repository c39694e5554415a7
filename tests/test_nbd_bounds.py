"""The NBD server's bounds, in-process (one trio run, a unix socket, raw clients): a client that floods
and never reads its replies, writes held by a stalled replica, and more connections than allowed.

Every wait is on a condition the server reports (``statistics()``), never on elapsed time.
"""
from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from blockdev.image import MemoryImage
from blockdev.layers import StallLayer
from blockdev.nbd import proto as P
from blockdev.nbd.limits import Backoff, Limits, RateLimited, raise_fd_limit
from blockdev.nbd.server import Export, NBDServer
from blockdev.nbd.session import BUF_SIZE

MiB = 1 << 20
REQ = struct.Struct(">IHHQQI")


@asynccontextmanager
async def running(backends: dict[str, object], limits: Limits) -> AsyncIterator[tuple[NBDServer, str]]:
    """An NBDServer on a fresh unix socket for the block; always stopped and its workers joined."""
    d = tempfile.mkdtemp(prefix="vdb-")
    path = os.path.join(d, "s.sock")
    exports = {n: Export(n, b) for n, b in backends.items()}  # type: ignore[arg-type]
    server = NBDServer(exports.get, lambda: sorted(exports), limits=limits)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, "unix", path)
            try:
                yield server, path
            finally:
                nursery.cancel_scope.cancel()
    finally:
        server.close()
        shutil.rmtree(d, ignore_errors=True)


class Client:
    """A raw NBD client on a trio socket: simple replies (no structured replies negotiated)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._buf = bytearray()

    @classmethod
    async def connect(cls, path: str, name: str = "vol") -> Client:
        c = await cls.open(path)
        await c.go(name)
        return c

    @classmethod
    async def open(cls, path: str) -> Client:
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        return cls(s)

    async def exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = await self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"closed with {len(self._buf)} of {n} bytes")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view):]

    async def greeting(self) -> None:
        assert struct.unpack(">QQH", await self.exactly(18))[:2] == (P.NBDMAGIC, P.IHAVEOPT)
        await self.send(struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))

    async def option(self, opt: int, data: bytes = b"") -> tuple[int, bytes]:
        """Send one option; returns its final reply (type, data)."""
        await self.send(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)
        while True:
            _magic, _opt, rep, length = struct.unpack(">QIII", await self.exactly(20))
            body = await self.exactly(length)
            if rep != P.REP_INFO:
                return rep, body

    async def go(self, name: str) -> None:
        await self.greeting()
        raw = name.encode()
        rep, body = await self.option(P.OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        assert rep == P.REP_ACK, (rep, body)

    async def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, err, handle = struct.unpack(">IIQ", await self.exactly(16))
        assert magic == P.SIMPLE_REPLY_MAGIC
        return handle, err, (await self.exactly(read_length) if read_length and not err else b"")

    async def call(self, cmd: int, offset: int = 0, length: int = 0, payload: bytes = b"", flags: int = 0) -> tuple[int, bytes]:
        await self.send(REQ.pack(P.REQUEST_MAGIC, flags, cmd, 99, offset, length) + payload)
        handle, err, data = await self.reply(length if cmd == P.CMD_READ else 0)
        assert handle == 99
        return err, data

    def close(self) -> None:
        self.sock.close()


async def until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll a condition the server reports (the deadline only turns a hang into a failure)."""
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out waiting for {what}")


def volume(size: int = 4 * MiB) -> MemoryImage:
    img = MemoryImage(size)
    img.data[:] = bytes(range(256)) * (size // 256)
    return img


# -- 5.1: a client that never reads its replies ------------------------------------------------------
FLOODS = {
    "one-byte-reads": (P.CMD_READ, 1),
    "zero-length-reads": (P.CMD_READ, 0),
    "unknown-commands": (42, 0),
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
async def test_a_client_that_never_reads_stops_being_read_and_later_gets_every_reply(kind: str) -> None:
    cmd, length = FLOODS[kind]
    n = 60_000  # 1.7 MB of requests; unbounded, that was 60,000 queued replies
    limits = Limits(reply_parts=1000, batch=100)
    img = volume()
    async with running({"vol": img, "other": volume()}, limits) as (server, path):
        hog = await Client.connect(path)
        hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sent = trio.Event()

        async def flood() -> None:
            await hog.send(b"".join(REQ.pack(P.REQUEST_MAGIC, 0, cmd, i, i % 4096, length) for i in range(n)))
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            conn = next(iter(server.connections))
            await until(lambda: conn.statistics().waiting or conn.requests == n, "the server to stop reading")
            st = conn.statistics()
            assert st.waiting and not sent.is_set(), st
            # Bounded: the outbox stops near reply_parts (one batch over at most), and reading stopped.
            assert st.queued_replies <= limits.reply_parts + 2 * limits.batch, st
            assert st.requests < n // 4, st
            # Others are served meanwhile, on another volume and on the same one.
            for name in ("other", "vol"):
                other = await Client.connect(path, name)
                assert await other.call(P.CMD_WRITE, 8192, 4, b"fine") == (0, b"")
                assert await other.call(P.CMD_READ, 8192, 4) == (0, b"fine")
                other.close()
            # Now the hog reads: every reply arrives, in order of its handles, with the right data.
            for i in range(n):
                handle, err, data = await hog.reply(length if cmd == P.CMD_READ else 0)
                assert handle == i
                if cmd == P.CMD_READ:
                    assert err == 0 and data == bytes(img.data[i % 4096:i % 4096 + length]), i
                else:
                    assert err == P.EINVAL
            await sent.wait()
        hog.close()


async def test_ops_in_flight_per_connection_are_bounded() -> None:
    # Flushes held by a stalled replica never finish: the connection may hold only `inflight` of them.
    limits = Limits(inflight=50, batch=10)
    stall = StallLayer(volume())
    async with running({"vol": stall}, limits) as (server, path):
        c = await Client.connect(path)
        n = 2000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.send, b"".join(REQ.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, i, 0, 0) for i in range(n)))
            conn = next(iter(server.connections))
            await until(lambda: conn.statistics().waiting, "the server to stop reading")
            assert conn.inflight <= limits.inflight + limits.batch and conn.requests < n
            stall.release()
            handles = {(await c.reply())[0] for _ in range(n)}
            assert handles == set(range(n))
        c.close()


# -- 5.2: write bytes in flight per volume --------------------------------------------------------------
async def test_writes_held_by_a_stalled_replica_stop_the_reading_within_the_volume_budget() -> None:
    cap = 4 * MiB
    limits = Limits(write_bytes=cap)
    image = MemoryImage(128 * MiB)
    stall = StallLayer(image)
    blob = os.urandom(MiB)
    n = 96  # 96 MiB of FUA writes; unbounded, every one was received and held (new receive buffers)
    async with running({"vol": stall}, limits) as (server, path):
        a = await Client.connect(path)
        b = await Client.connect(path)  # a second connection to the volume shares its budget
        budget = server.budget("vol")

        async def flood(c: Client, first: int) -> None:
            for i in range(first, n, 2):
                await c.send(REQ.pack(P.REQUEST_MAGIC, P.CMD_FLAG_FUA, P.CMD_WRITE, i, i * MiB, MiB) + blob)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, a, 0)
            nursery.start_soon(flood, b, 1)
            await until(lambda: len(server.connections) == 2 and all(c.waiting for c in server.connections),
                        "both connections to stop reading")
            st = budget.statistics()
            # One batch may overshoot: what one receive buffer held when the check last passed.
            assert cap <= st.used <= cap + 2 * BUF_SIZE and st.peak <= cap + 2 * BUF_SIZE, st
            assert server.statistics()["write_bytes_in_flight"] == st.used
            assert stall.held() < n
            stall.release()
            got: set[int] = set()
            for c in (a, b):
                for _ in range(n // 2):
                    handle, err, _ = await c.reply()
                    assert err == 0
                    got.add(handle)
            assert got == set(range(n))
        assert budget.statistics().used == 0
        assert bytes(image.data[:n * MiB]) == blob * n
        a.close()
        b.close()


async def test_a_flood_of_32_mib_fua_writes_to_a_stalled_replica_holds_at_most_the_budget() -> None:
    # The case (79 MiB -> 2 GiB in 4 s): every 32 MiB write got a fresh receive buffer, held.
    limits = Limits()  # the defaults: 64 MiB of writes in flight per volume
    image = MemoryImage(64 * MiB)
    stall = StallLayer(image)
    blob = os.urandom(P.MAX_PAYLOAD)
    n = 8  # 256 MiB
    async with running({"vol": stall}, limits) as (server, path):
        c = await Client.connect(path)

        async def flood() -> None:
            for i in range(n):
                await c.send(REQ.pack(P.REQUEST_MAGIC, P.CMD_FLAG_FUA, P.CMD_WRITE, i, (i % 2) * P.MAX_PAYLOAD,
                                      P.MAX_PAYLOAD) + blob)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await until(lambda: bool(server.connections) and next(iter(server.connections)).waiting,
                        "the connection to stop reading")
            budget = server.budget("vol").statistics()
            assert budget.peak <= limits.write_bytes + P.MAX_PAYLOAD and stall.held() <= 3, (budget, stall.held())
            stall.release()
            assert sorted([(await c.reply())[:2] for _ in range(n)]) == [(i, 0) for i in range(n)]
        assert bytes(image.data) == blob * 2
        c.close()


async def test_a_write_larger_than_the_budget_still_proceeds_alone() -> None:
    limits = Limits(write_bytes=MiB)
    image = MemoryImage(32 * MiB)
    stall = StallLayer(image)
    big, small = os.urandom(8 * MiB), os.urandom(4096)
    async with running({"vol": stall}, limits) as (server, path):
        c = await Client.connect(path)
        await c.send(REQ.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, len(big)) + big)
        await until(lambda: stall.held() == 1, "the big write to reach the volume")  # 8x the budget, alone
        conn = next(iter(server.connections))
        await until(lambda: conn.waiting, "the connection to wait for the budget")
        await c.send(REQ.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 2, 16 * MiB, len(small)) + small)
        await trio.testing.wait_all_tasks_blocked()
        assert server.budget("vol").used == len(big) and stall.held() == 1  # the small one waits its turn
        stall.release()
        assert sorted([(await c.reply())[:2] for _ in range(2)]) == [(1, 0), (2, 0)]
        assert bytes(image.data[:len(big)]) == big and bytes(image.data[16 * MiB:16 * MiB + 4096]) == small
        c.close()


# -- 5.3: connections per listener -----------------------------------------------------------------
async def test_connections_over_the_cap_are_refused_with_a_reason_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    limits = Limits(connections=3, refusing=2)
    async with running({"vol": volume()}, limits) as (server, path):
        idle = [await Client.connect(path) for _ in range(3)]
        refused = []
        for _ in range(limits.refusing):
            c = await Client.open(path)
            await c.greeting()
            rep, body = await c.option(P.OPT_GO, struct.pack(">I", 3) + b"vol" + struct.pack(">H", 0))
            assert rep == P.REP_ERR_POLICY and b"too many connections" in body
            refused.append(c)
        # While `refusing` refused clients are still being told, the next one is closed at once.
        hang_up = await Client.open(path)
        with pytest.raises(EOFError):
            await hang_up.exactly(1)
        assert server.statistics()["refused"] == 3
        assert caplog.text.count("refusing an NBD client") == 1  # rate-limited: once per LOG_EVERY
        for c in [*refused, hang_up]:
            c.close()
        idle.pop().close()
        await until(lambda: server.listeners[0].open == 2, "the idle client's slot to free")
        again = await Client.connect(path)
        assert await again.call(P.CMD_READ, 0, 4) == (0, bytes(range(4)))
        for c in [*idle, again]:
            c.close()


async def test_accept_failing_for_lack_of_descriptors_backs_off_and_logs_rarely(
        caplog: pytest.LogCaptureFixture) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    caplog.set_level(logging.WARNING, "blockdev.nbd")
    async with running({"vol": volume()}, Limits()) as (_server, path):
        first = await Client.connect(path)
        waiting = [Client(trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) for _ in range(4)]
        # Leave no descriptor for accept(): the pending clients make the listener readable forever.
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))
        try:
            for c in waiting:
                await c.sock.connect(path)  # needs no new descriptor on our side
            await until(lambda: "accept failed" in caplog.text, "an accept failure")
            for _ in range(20):
                await trio.sleep(0.01)  # a spinning accept loop would log (and burn CPU) here
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert caplog.text.count("accept failed") == 1 and "Too many open files" in caplog.text
        for c in waiting:
            c.close()
        assert await first.call(P.CMD_READ, 0, 4) == (0, bytes(range(4)))  # the server lives on
        later = await Client.connect(path)
        assert await later.call(P.CMD_READ, 4, 4) == (0, bytes(range(4, 8)))
        first.close()
        later.close()


async def test_ops_failing_on_a_full_disk_are_logged_rarely_not_once_each(
        caplog: pytest.LogCaptureFixture) -> None:
    # A full disk fails every write: one log line per LOG_EVERY (saying how many more), not one per
    # request (a client's flood of doomed writes must not flood the log, often on that same disk).
    import errno

    from blockdev.layers.faults import Fault, FaultLayer

    caplog.set_level(logging.WARNING, "blockdev.nbd")
    full = FaultLayer(volume())
    full.faults.append(Fault("pwrite", errno.ENOSPC))
    async with running({"vol": full}, Limits()) as (_server, path):
        c = await Client.connect(path)
        for _ in range(50):
            assert (await c.call(P.CMD_WRITE, 0, 4096, bytes(4096)))[0] == P.wire_errno(errno.ENOSPC)
        assert (await c.call(P.CMD_READ, 0, 4))[0] == 0  # the connection lives on
        c.close()
    assert caplog.text.count("WRITE on vol failed") == 1


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        assert raise_fd_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(want, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_rate_limited_log_and_backoff_are_pure(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    say = RateLimited(logging.getLogger("test.ratelimit"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "test.ratelimit"):
        assert say(logging.WARNING, "failed: %s", "x") and not say(logging.WARNING, "failed: %s", "y")
        assert not say(logging.WARNING, "failed: %s", "z")
        now[0] += 10
        assert say(logging.WARNING, "failed: %s", "w") and not say(logging.WARNING, "failed")
    assert [r.getMessage() for r in caplog.records] == ["failed: x", "failed: w (2 more since the last message)"]
    b = Backoff(0.05, 0.3)
    assert [b.next() for _ in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    b.reset()
    assert b.next() == 0.05


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="connections"):
        Limits(connections=0)


# -- 5.3 end to end: `vdisk serve` started with a soft descriptor limit below its connection cap ----------
CAP = 600
SOFT = 512  # like `ulimit -n 1024` with 1010 idle clients, at half the scale


def _low_soft_fd_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, min(hard, 4096)))


def test_idle_clients_past_the_soft_fd_limit_neither_exhaust_descriptors_nor_flood_the_log(  # type: ignore[no-untyped-def]
        vd, serve, raw_nbd) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * CAP + 200:
        pytest.skip(f"this test opens {CAP + 10} connections: the hard descriptor limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2 * CAP + 200), hard))
    try:
        vd.create("vol", "16M")
        srv = serve("vol", extra=("--max-connections", str(CAP)), preexec=_low_soft_fd_limit)
        idle = []
        for _ in range(CAP):  # past the handshake, then silent: more descriptors than the soft limit
            c = raw_nbd(srv.sock)
            c.go("vol", structured=False)
            idle.append(c)
        for _ in range(10):  # over the cap: told why, with the spec's error for an unwilling server
            c = raw_nbd(srv.sock)
            c.greeting()
            c.option(P.OPT_GO, c.go_payload("vol"))
            _opt, rep, msg = c.opt_reply()
            assert rep == P.REP_ERR_POLICY and b"too many connections" in msg, (rep, msg)
            c.close()
        for c in idle[:5]:
            c.close()
        # The freed slots are usable at once by a real client (the server notices the hang-ups first).
        deadline = [0]

        def legit() -> bool:
            c = raw_nbd(srv.sock)
            c.greeting()
            c.option(P.OPT_GO, c.go_payload("vol"))
            reps = c.opt_replies()
            if reps[-1][1] == P.REP_ERR_POLICY:
                c.close()
                deadline[0] += 1
                assert deadline[0] < 500, "closed connections never freed their slots"
                return False
            assert reps[-1][1] == P.REP_ACK
            assert c.call(P.CMD_WRITE, 0, 4, payload=b"live")[0] == 0
            assert c.call(P.CMD_READ, 0, 4) == (0, b"live")
            return True

        while not legit():
            pass
        for c in idle[5:]:
            c.close()
        log = srv.log()
        assert "accept failed" not in log and "Too many open files" not in log, log[-2000:]
        assert 1 <= log.count("refusing an NBD client") <= 2, log[-2000:]  # rate-limited
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _hard_fd_limit_256() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_a_hard_fd_limit_below_the_connection_cap_refuses_clients_with_a_reason(  # type: ignore[no-untyped-def]
        vd, serve, raw_nbd) -> None:
    # `ulimit -n 256` with the default --max-connections 1000: past ~256 accept() would fail and
    # clients hang in the backlog; the server says at start what it can hold and refuses the rest.
    vd.create("vol", "16M")
    srv = serve("vol", preexec=_hard_fd_limit_256)
    idle = []
    try:
        while True:
            assert len(idle) < 256, "never refused: the descriptor limit was not taken into account"
            c = raw_nbd(srv.sock)
            c.greeting()
            c.option(P.OPT_GO, c.go_payload("vol"))
            reps = c.opt_replies()
            idle.append(c)
            if reps[-1][1] == P.REP_ERR_POLICY:
                assert b"open-file limit of 256" in reps[-1][2], reps[-1]
                break
            assert reps[-1][1] == P.REP_ACK
        assert len(idle) - 1 == 256 - 64  # every slot the limit allows was served
    finally:
        for c in idle:
            c.close()
    log = srv.log()
    assert "allows only 192 NBD connections" in log and "accept failed" not in log, log[-2000:]
