"""A running target against hostile peers: nothing a peer sends ends the daemon, unauthenticated
connections are cheap and bounded, verify work is bounded and off the frame loop, and one replica's
slow disk does not stall another source. After every hostile input a legitimate source still mirrors."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import trio
from target_peers import (
    OTHER,
    SIZE,
    UUID,
    RawSource,
    drained,
    hashq,
    hello_json,
    json_frame,
    legit_source_mirrors,
)

from blockdev.volume import VolumeError, VolumeStore
from mirror import verify
from mirror.target import TargetConfig, TargetServer
from mirror.wire import codec
from mirror.wire.events import Auth, Bye, HashQuery


async def start_target(nursery, tmp, open_replica=None, **over) -> tuple[TargetServer, int]:
    cfg = TargetConfig(**{"timeout": 5.0, **over})
    store = VolumeStore(tmp / "dst")
    if open_replica is not None:  # fault injection: the target opens replicas through its store
        real = store.open_image
        store.open_image = lambda name, **kw: open_replica(real(name, **kw))  # type: ignore[method-assign]
    server = TargetServer(store, cfg)
    addr = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, int(addr.rsplit(":", 1)[1])


NEST = 30000  # within the 64 KiB pre-auth frame cap; the codec test covers 100k levels
PRE_AUTH = {
    "nested-hello": json_frame(codec.T_HELLO, b"[" * NEST + b"]" * NEST),
    "nested-hello-field": json_frame(codec.T_HELLO, b'{"version":' + b"[" * NEST + b"]" * NEST + b"}"),
    "bye-first": codec.encode(Bye()),
    "hello-then-bye": hello_json() + codec.encode(Bye()),
    "hello-auth-bye": hello_json() + codec.encode(Auth(b"")) + codec.encode(Bye()),
    "uuid-path": hello_json(volume_uuid="../../../../tmp/x"),
    "size-bool": hello_json(size=True),
    "size-negative": hello_json(size=-4096),
    "size-str": hello_json(size="4096"),
    "size-huge": hello_json(size=10 ** 4000),
    "nonce-short": hello_json(nonce="ab"),
    "caps-nested": hello_json(caps=[[1]]),
    "oversized-pre-auth": codec.HEADER.pack(codec.PRE_AUTH_PAYLOAD + 1, codec.T_HELLO, 0, 0, 0, 0, 0),
    "garbage": bytes(range(256)) * 20,
}


@pytest.mark.parametrize("case", sorted(PRE_AUTH))
async def test_nothing_before_authentication_ends_the_target(tmp_path, nursery, caplog, case):
    _, port = await start_target(nursery, tmp_path)
    s = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await s.send_all(PRE_AUTH[case])
    except trio.BrokenResourceError:
        pass
    await drained(s)
    await s.aclose()
    await legit_source_mirrors(port, tmp_path / "dst")
    assert not [r for r in caplog.records if r.exc_info], "a peer's mistake was logged as an internal error"
    assert not any(p.name.startswith(("..", "replica-..")) for p in (tmp_path / "dst").iterdir())
    assert (tmp_path / "tmp" / "x.img").exists() is False


async def test_a_name_with_a_trailing_newline_gets_a_safe_replica_name(tmp_path, nursery):
    server, port = await start_target(nursery, tmp_path)
    src = await RawSource.connect(port, name="vol\n")
    assert list(server.active) == ["replica-9f1d6d7e"]
    await src.close()


AFTER_AUTH = {
    "hashq-negative-level": hashq(1, 65536, -1, [0]),
    "hashq-level-above-root": hashq(1, 65536, 9, [0]),
    "hashq-index-beyond": hashq(1, 65536, 0, [10 ** 6]),
    "hashq-bool-index": hashq(1, 65536, 0, [True]),
    "hashq-tiny-leaf": hashq(1, 512, 0, [0]),
    "hashq-odd-leaf": hashq(1, 65537, 0, [0]),
    "hashq-many-indices": hashq(1, 65536, 0, [0] * (codec.MAX_QUERY_INDICES + 1)),
    "hashq-level-str": hashq(1, 65536, "0", [0]),
    "zero-beyond-end": codec.encode_zero(1, SIZE - 512, 4096),
    "write-unknown-flag": codec._frame(codec.T_WRITE, b"x", 0x80, 1, 0) + b"x",
    "hello-again": hello_json(volume_uuid=UUID),
    "ack-from-source": codec.encode_ack(5),
    "seq-gap": codec.encode_flush(7),
    "nested-query": json_frame(codec.T_HASHQ, b"[" * NEST + b"]" * NEST),
}


@pytest.mark.parametrize("case", sorted(AFTER_AUTH))
async def test_nothing_after_authentication_ends_the_target(tmp_path, nursery, caplog, case):
    _, port = await start_target(nursery, tmp_path)
    src = await RawSource.connect(port)
    await src.send(AFTER_AUTH[case])
    reply = await drained(src.stream)
    assert b"protocol" in reply or b"bad" in reply  # the source is told why
    await legit_source_mirrors(port, tmp_path / "dst")
    assert not [r for r in caplog.records if r.exc_info], "a peer's mistake was logged as an internal error"


async def test_a_bug_in_one_link_is_logged_with_its_traceback_and_the_target_goes_on(tmp_path, nursery, caplog):
    server, port = await start_target(nursery, tmp_path)
    real = server._replica_for
    calls = []

    def buggy(hello):
        calls.append(hello)
        if len(calls) == 1:
            raise KeyError("our own bug")
        return real(hello)

    server._replica_for = buggy  # type: ignore[method-assign]
    with pytest.raises(AssertionError):
        await RawSource.connect(port)
    await legit_source_mirrors(port, tmp_path / "dst")
    internal = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(internal) == 1 and internal[0].exc_info is not None


async def test_idle_unauthenticated_connections_are_capped_timed_out_and_cheap(tmp_path, nursery, caplog):
    server, port = await start_target(nursery, tmp_path, handshake_timeout=1.0, max_handshakes=8)
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(8)]
    with trio.fail_after(5):
        while server.handshaking < 8:
            await trio.sleep(0.01)
    extra = await trio.open_tcp_stream("127.0.0.1", port)
    assert await drained(extra) == b""  # refused at once: closed without a word
    with trio.fail_after(5):  # the handshake deadline frees the slots
        while server.handshaking:
            await trio.sleep(0.02)
    for s in idle:
        assert b"handshake" in await drained(s)
        await s.aclose()
    await legit_source_mirrors(port, tmp_path / "dst")
    assert sum("refused a connection" in r.getMessage() for r in caplog.records) == 1


# -- verify: bounded, and off the frame loop -----------------------------------------------------
async def test_verify_of_a_huge_volume_with_tiny_leaves_is_refused_not_built(tmp_path, nursery):
    size = 128 << 30
    _, port = await start_target(nursery, tmp_path)
    src = await RawSource.connect(port, size=size)
    await src.send(hashq(1, 4096, 5, [0]))
    assert b"more than 1048576 leaves" in await drained(src.stream)


async def test_compare_of_a_volume_over_max_leaves_uses_larger_leaves_and_finds_the_difference(tmp_path):
    size = 128 << 30
    store = VolumeStore(tmp_path)
    store.create("a", size)
    store.create("b", size)
    a, b = store.open_image("a"), store.open_image("b")
    try:
        for img in (a, b):
            img.pwrite(b"same" * 1024, 1 << 30)
        b.pwrite(b"diff" * 1024, (100 << 30) + 65536)
        remote = verify.build_tree(b, size, verify.leaf_for(size, 65536))
        assert len(remote.levels[0]) == verify.MAX_LEAVES * verify.DIGEST  # 16 MiB, not 32

        async def query(leaf, level, indices):
            from mirror.target_io import check_query

            check_query(HashQuery(0, leaf, level, tuple(indices)), size)
            return remote.nodes(level, indices)

        report = await verify.compare(a, size, 65536, query)
    finally:
        a.close()
        b.close()
    assert report.tree_leaf == 128 << 10 and report.leaf_size == 65536
    assert report.ranges == [(100 << 30, 128 << 10)]
    assert report.differing_blocks == [(100 << 30) // 65536, (100 << 30) // 65536 + 1]  # dirty-map regions


class GatedImage:
    """A replica whose reads (hashing) or flushes wait for a gate: a slow disk, deterministically."""

    def __init__(self, inner, gate_reads: bool = False, gate_flush: bool = False, delay: float = 0.0) -> None:
        self.inner, self.gate = inner, threading.Event()
        self.gate_reads, self.gate_flush, self.delay = gate_reads, gate_flush, delay
        self.waiting = threading.Event()
        # Never hang the test run if the code under test blocks the event loop (the old behaviour).
        self._watchdog = threading.Timer(8.0, self.gate.set)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _wait(self) -> None:
        self.waiting.set()
        self.gate.wait()

    def pread(self, buf, offset):
        if self.gate_reads:
            self._wait()
        return self.inner.pread(buf, offset)

    def extents(self, length, offset):
        if self.gate_reads:
            self._wait()
        if self.delay:  # a slow disk: every chunk of a hash costs this much (in the hashing thread)
            self.waiting.set()
            time.sleep(self.delay)
        return self.inner.extents(length, offset)

    def flush(self):
        if self.gate_flush:
            self._wait()
        return self.inner.flush()

    def pwrite(self, data, offset, fua=False):
        return self.inner.pwrite(data, offset, fua)

    def write_zeroes(self, length, offset, fua=False, may_trim=True, fast=False):
        return self.inner.write_zeroes(length, offset, fua, may_trim, fast)

    def close(self):
        self._watchdog.cancel()
        self.gate.set()
        self.inner.close()


async def wait_thread_event(ev: threading.Event, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not ev.is_set():
            await trio.sleep(0.01)


async def test_writes_are_acked_while_the_target_hashes_for_verify(tmp_path, nursery):
    images: dict[str, GatedImage] = {}

    def open_replica(image):
        images["vol"] = GatedImage(image, gate_reads=True)
        return images["vol"]

    _, port = await start_target(nursery, tmp_path, open_replica=open_replica)
    src = await RawSource.connect(port)
    img = images["vol"]
    await src.send(hashq(1, 65536, 0, [0]))  # 4 MiB in 64 KiB leaves: the root is level 1
    await src.send(hashq(1, 65536, 1, [0]))
    await wait_thread_event(img.waiting)  # the hash is running, stuck on the disk
    for i in range(5):
        await src.send(src.write(i * 4096, b"w" * 4096, fua=True), codec.encode_ping(i))
        evs = await src.until_ack(src.seq, timeout=3)
        assert not img.gate.is_set(), "acked only after the hash finished"
        assert not any(type(e).__name__ == "HashReply" for e in evs)
    img.gate.set()
    got = []
    while len(got) < 2:
        got += [e for e in await src.events() if type(e).__name__ == "HashReply"]
    assert [len(e.digests) for e in got] == [16, 16]
    await src.close()


async def test_a_cancelled_session_stops_its_hash_and_frees_the_replica(tmp_path, nursery):
    images: list[GatedImage] = []

    size = 4 << 30  # 512 chunks of 8 MiB at 50 ms each: a 25 s hash

    def open_replica(image):
        images.append(GatedImage(image, delay=0.05 if not images else 0.0))
        return images[-1]

    server, port = await start_target(nursery, tmp_path, open_replica=open_replica)
    old = await RawSource.connect(port, size=size)
    await old.send(hashq(1, 65536, 3, [0]))
    await wait_thread_event(images[0].waiting)
    # The source reconnects (the old link looks alive here): the new one takes over at once; the old
    # session's hash stops within a chunk instead of keeping the replica busy.
    with trio.fail_after(3):
        fresh = await RawSource.connect(port, size=size)
    await fresh.send(fresh.flush())
    await fresh.until_ack(1)
    assert server.statistics()["active"] == 1
    await fresh.close()


async def test_a_slow_fsync_on_one_replica_does_not_stall_another_source(tmp_path, nursery):
    images: dict[str, GatedImage] = {}

    def open_replica(image):
        name = "slow" if not images else "vol"  # the slow source connects first
        images[name] = GatedImage(image, gate_flush=(name == "slow"))
        return images[name]

    _, port = await start_target(nursery, tmp_path, open_replica=open_replica)
    slow = await RawSource.connect(port, uuid=OTHER, name="slow")
    fast = await RawSource.connect(port, name="vol")
    await slow.send(slow.write(0, b"s" * 4096), slow.flush())
    await wait_thread_event(images["slow"].waiting)  # its fdatasync hangs
    for i in range(3):
        await fast.send(fast.write(i * 4096, b"f" * 4096, fua=True))
        await fast.until_ack(fast.seq, timeout=3)
        assert not images["slow"].gate.is_set(), "the fast source was acked only after the slow fsync"
    images["slow"].gate.set()
    await slow.until_ack(2)
    await slow.close()
    await fast.close()


# -- the daemon: one per data directory ----------------------------------------------------------
async def test_a_second_target_on_the_same_data_directory_is_refused(tmp_path, nursery):
    await start_target(nursery, tmp_path)
    second = TargetServer(VolumeStore(tmp_path / "dst"), TargetConfig())
    with pytest.raises(VolumeError, match=f"another vdisk target \\(pid {os.getpid()}\\)"):
        await second.serve("127.0.0.1", 0)


def test_keyless_listening_beyond_loopback_is_refused_unless_insecure(tmp_path, caplog):
    from mirror.target import check_exposure

    with pytest.raises(VolumeError, match="without --psk-file"):
        check_exposure("0.0.0.0", TargetConfig())
    with caplog.at_level(logging.WARNING, "vdisk.target"):
        check_exposure("0.0.0.0", TargetConfig(insecure=True))
        check_exposure("::1", TargetConfig())
        check_exposure("0.0.0.0", TargetConfig(psk=b"k" * 16))
    assert len(caplog.records) == 2


async def test_accept_errors_such_as_emfile_are_logged_rate_limited_and_survived(tmp_path, caplog, autojump_clock):
    import errno

    server = TargetServer(VolumeStore(tmp_path / "dst"), TargetConfig())
    calls = []

    class Exhausted:
        """A listener out of descriptors for its first 4 accepts."""

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def accept(self):
            calls.append(1)
            if len(calls) <= 4:
                raise OSError(errno.EMFILE, "Too many open files")
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._accept_loop, Exhausted(), nursery)
        with trio.fail_after(5):
            while len(calls) < 5:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert sum("accept failed: Too many open files" in r.getMessage() for r in caplog.records) == 1


async def test_a_read_error_while_hashing_ends_that_link_as_an_io_error(tmp_path, nursery, caplog):
    import errno

    class Failing(GatedImage):
        def extents(self, length, offset):
            raise OSError(errno.EIO, "Input/output error")

    first = []

    def open_replica(image):
        first.append(image)
        return Failing(image) if len(first) == 1 else image

    _, port = await start_target(nursery, tmp_path, open_replica=open_replica)
    src = await RawSource.connect(port)
    await src.send(hashq(1, 65536, 1, [0]))
    assert b"target I/O error" in await drained(src.stream)
    await legit_source_mirrors(port, tmp_path / "dst")
    assert not [r for r in caplog.records if r.exc_info]


def _random_frame(rng, seq: int) -> bytes:
    """A data or control frame with field values a hostile or buggy source might send."""
    def num():
        return rng.choice([0, 1, 2**63, 2**64 - 1, rng.randrange(1 << 64), rng.randrange(100), 4096, 1 << 22])

    kind = rng.randrange(8)
    if kind == 0:
        n = rng.choice([0, 1, 4096, 300000])
        return b"".join(bytes(x) for x in codec.encode_write(seq if rng.random() < 0.8 else num(),
                                                              rng.choice([0, SIZE - n, num()]), b"x" * n,
                                                              rng.random() < 0.5))
    if kind == 1:
        return codec.encode_zero(seq, rng.choice([0, num()]), rng.choice([0, 4096, num()]), rng.random() < 0.5,
                                 rng.random() < 0.5)
    if kind == 2:
        return codec.encode_flush(seq)
    if kind == 3:
        return codec.encode_ping(num())
    if kind == 4:
        import json

        q = {"req": num(), "leaf_size": rng.choice([4096, 65536, 1 << 30, num()]),
             "level": rng.choice([0, 1, 2, num() % 70]), "indices": [rng.choice([0, 63, 64, num()]) for _ in range(3)]}
        return json_frame(codec.T_HASHQ, json.dumps(q).encode())
    if kind == 5:
        return json_frame(rng.choice(sorted(codec._JSON_TYPES)), b'{"x": 1}')
    if kind == 6:
        return codec.encode(Bye())
    return codec._frame(rng.choice(sorted(codec._KNOWN_TYPES)), b"", rng.randrange(256), num(), num())


async def test_random_frame_sequences_after_authentication_never_hurt_the_target(tmp_path, nursery, caplog):
    import random

    _, port = await start_target(nursery, tmp_path, timeout=1.0)
    rng = random.Random(13)
    for _ in range(40):
        src = await RawSource.connect(port)
        try:
            await src.send(b"".join(_random_frame(rng, k + 1) for k in range(rng.randrange(1, 6))))
        except trio.BrokenResourceError:
            pass
        with trio.move_on_after(0.3):  # a valid sequence leaves the link open: move on
            await drained(src.stream)
        await src.stream.aclose()
    await legit_source_mirrors(port, tmp_path / "dst")
    assert not [r for r in caplog.records if r.exc_info]


async def test_connections_of_one_source_racing_each_other_leave_the_newest_replaceable(tmp_path, nursery):
    """Two reconnects of one source (its uuid) race while its old link is being dropped: one wins,
    and a later reconnect replaces the winner (the loser used to unregister it on its way out, so
    the replica stayed "busy" to every reconnect until the winner's link timed out)."""
    from mirror.wire import PeerError

    _, port = await start_target(nursery, tmp_path)
    for _ in range(3):
        first = await RawSource.connect(port)
        results: list = []

        async def connect(out: list) -> None:
            try:
                out.append(await RawSource.connect(port))
            except (PeerError, AssertionError) as e:
                out.append(e)

        async with trio.open_nursery() as racers:
            racers.start_soon(connect, results)
            racers.start_soon(connect, results)
        assert len([r for r in results if isinstance(r, RawSource)]) >= 1
        last = await RawSource.connect(port)  # after a partition, say: replaces whichever won
        await last.send(last.write(0, os.urandom(4096), fua=True))
        await last.until_ack(last.seq)
        await last.close()
        del first
