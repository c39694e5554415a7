"""WAN data reduction (mirror/reduce.py, mirror/content_index.py): packs round-trip, zeroes cross as
ranges, overwrites in one unit coalesce, the accounting adds up to the byte, hostile packs are
refused with bounded memory, capabilities are negotiated, and dedup works across volumes, across
restarts of both daemons and against a forged reference."""
from __future__ import annotations

import json
import os
import random
import resource
import uuid

import pytest
import zstandard

from mirror.content_index import INDEX_FILE, ContentIndex
from mirror.reduce import (
    BLOCK,
    CAP_DEDUP,
    CAP_ZSTD,
    S_REF,
    Frames,
    KnownBlocks,
    Reducer,
    Reduction,
    StaleReference,
    Stream,
    Unpacker,
    decode_rwrite,
    digest,
    resolve,
)
from mirror.target import TargetServer
from mirror.wire import RemoteProtocolError
from mirror.wire.codec import (
    DEDUP_ENTRY,
    T_RWRITE,
    FrameReader,
    _frame,
    encode,
    encode_pack,
    encode_rwrite,
)
from mirror.wire.events import Checkpoint, Hello, Pack, RWrite, Welcome, Write, Zero
from tests.mirror_procs import Procs, corrupt_silently

VOL = str(uuid.uuid4())
MiB = 1 << 20


def apply(image: bytearray, events: list, read=None) -> None:
    """What a target does with a pack's inner frames (references read from ``read``)."""
    for ev in events:
        if type(ev) is RWrite:
            apply(image, resolve(ev.seq, ev.fua, decode_rwrite(ev, len(image)), read))
        elif type(ev) is Write:
            image[ev.offset:ev.offset + len(ev.data)] = ev.data
        elif type(ev) is Zero:
            image[ev.offset:ev.offset + ev.length] = bytes(ev.length)


def unpack_all(bufs: list, unpacker: Unpacker) -> list:
    reader = FrameReader()
    reader.feed(b"".join(bytes(b) for b in bufs))
    out = []
    for ev in reader.frames():
        assert type(ev) is Pack
        out.extend(unpacker.unpack(ev))
    assert not reader.buffered
    return out


def check_counts(acct: Reduction) -> None:
    assert acct.logical == acct.data + acct.zero + acct.dedup + acct.compression + acct.coalesced


async def test_compression_round_trips_random_zero_and_repetitive_data():
    rng = random.Random(1)
    size = 16 * MiB
    random_data = rng.randbytes(2 * MiB)
    repetitive = (b"the same log line, again and again\n" * 60000)[:2 * MiB]
    mixed = bytearray(rng.randbytes(MiB))
    mixed[BLOCK:5 * BLOCK] = bytes(4 * BLOCK)  # zero blocks inside a write cross as ranges
    red = Reducer(VOL, (CAP_ZSTD,), KnownBlocks())
    unpacker = Unpacker()
    expect, got = bytearray(size), bytearray(size)
    acct = Reduction()
    seq = 0
    for offset, data in ((0, random_data), (2 * MiB, bytes(2 * MiB)), (4 * MiB, repetitive),
                         (6 * MiB + 100, bytes(mixed)), (9 * MiB, b"x" * 7)):
        f = Frames()
        seq += 1
        f.write(seq, offset, memoryview(data))
        seq += 1
        f.checkpoint(seq, seq, 123)
        step = Reduction()
        events = unpack_all(await red.encode(f, step), unpacker)
        assert [ev.seq for ev in events] == [seq - 1, seq] and type(events[-1]) is Checkpoint
        apply(got, events)
        expect[offset:offset + len(data)] = data
        check_counts(step)
        assert step.logical == len(data)
        acct.add(step)
    assert got == expect
    check_counts(acct)
    assert acct.zero == 2 * MiB + 3 * BLOCK  # aligned blocks: the write starts 100 bytes into one
    assert acct.compression > 2 * MiB - 64 * 1024  # the repetitive part is almost free
    assert acct.data >= 3 * MiB - 4 * BLOCK  # random data does not shrink
    assert acct.wire < acct.logical / 2


async def test_overwrites_in_one_unit_coalesce_and_a_checkpoint_between_keeps_them():
    rng = random.Random(2)
    a, b = rng.randbytes(8 * BLOCK), rng.randbytes(4 * BLOCK)
    red, unpacker = Reducer(VOL, (CAP_ZSTD,), KnownBlocks()), Unpacker()
    got = bytearray(MiB)
    f = Frames()
    f.write(1, 0, a)
    f.write(2, 2 * BLOCK, b)  # overwrites blocks 2..5 of the first write
    f.zero(3, 7 * BLOCK, BLOCK)  # and block 7
    f.checkpoint(4, 4, 0)
    step = Reduction()
    events = unpack_all(await red.encode(f, step), unpacker)
    apply(got, events)
    assert got[:8 * BLOCK] == a[:2 * BLOCK] + b + a[6 * BLOCK:7 * BLOCK] + bytes(BLOCK)
    assert step.coalesced == 5 * BLOCK
    check_counts(step)
    # With a checkpoint in between, the first unit is a commit point of its own: nothing coalesces.
    f = Frames()
    f.write(5, 0, a)
    f.checkpoint(6, 6, 0)
    f.write(7, 0, b)
    f.checkpoint(8, 8, 0)
    step = Reduction()
    apply(got, unpack_all(await red.encode(f, step), unpacker))
    assert step.coalesced == 0 and got[:8 * BLOCK] == b + a[4 * BLOCK:]


async def test_dedup_references_within_a_stream_and_against_the_target():
    rng = random.Random(3)
    blocks = rng.randbytes(64 * BLOCK)
    src_vol = uuid.uuid4()
    held = bytearray(MiB)
    held[BLOCK:BLOCK + len(blocks)] = blocks  # another replica already holds them, one block further

    async def query(prefixes: bytes) -> bytes:
        out = bytearray()
        for i in range(0, len(prefixes), 16):
            p = prefixes[i:i + 16]
            hit = next((j for j in range(64) if digest(blocks[j * BLOCK:(j + 1) * BLOCK])[:16] == p), None)
            out += b"\0" * DEDUP_ENTRY if hit is None else \
                b"\1" + src_vol.bytes + ((hit + 1) * BLOCK).to_bytes(8, "big")
        return bytes(out)

    def read(vol: bytes, off: int, n: int) -> bytes | None:
        return bytes(held[off:off + n]) if vol == src_vol.bytes else bytes(mine[off:off + n])

    red, unpacker = Reducer(VOL, (CAP_ZSTD, CAP_DEDUP), KnownBlocks(), query), Unpacker()
    mine = bytearray(MiB)
    fresh = rng.randbytes(8 * BLOCK)
    f = Frames()
    f.write(1, 0, blocks)  # all held by the other replica: one reference
    f.write(2, 512 * 1024, fresh)
    f.write(3, 768 * 1024, fresh)  # the same again: a reference to the previous write, in order
    step = Reduction()
    bufs = await red.encode(f, step)
    events = unpack_all(bufs, unpacker)
    refs = [s for ev in events if type(ev) is RWrite for s in decode_rwrite(ev, MiB) if s[0] == S_REF]
    assert len(refs) == 2  # runs, not one reference per block
    apply(mine, events, read)
    assert mine[:len(blocks)] == blocks and mine[512 * 1024:512 * 1024 + len(fresh)] == fresh
    assert mine[768 * 1024:768 * 1024 + len(fresh)] == fresh
    assert step.dedup == len(blocks) + len(fresh)
    check_counts(step)
    assert sum(len(b) for b in bufs) < 8 * BLOCK + 2048  # the fresh blocks once, plus a little framing
    # A forged reference (the held block changed since indexed) is refused, never copied.
    held[BLOCK + 5] ^= 0xFF
    with pytest.raises(StaleReference):
        apply(bytearray(MiB), events, read)


def test_known_blocks_are_usable_by_another_stream_only_once_acknowledged():
    known = KnownBlocks(capacity=4)
    s1, s2 = Stream(VOL), Stream(str(uuid.uuid4()))
    h = digest(b"x" * BLOCK)
    known.put(h, s1.uuid, 0, s1, 5)
    assert known.lookup(h, s1)[0] == "ref"  # its own stream: applied in order
    assert known.lookup(h, s2) == ("wait", (s1, 5))
    s1.acked = 5
    assert known.lookup(h, s2)[0] == "ref"
    s1.acked, s1.alive, s1.committed = 4, False, 4  # the session ended before it committed
    assert known.lookup(h, s2) == ("ask", None) and len(known) == 0
    known.put(h, s1.uuid, 0, None, 0)
    known.forget(s1.uuid, 100, 10)  # that location is overwritten
    assert known.lookup(h, s2) == ("ask", None)
    for i in range(10):  # bounded
        known.put(digest(bytes([i]) * BLOCK), s1.uuid, i * BLOCK, None, 0)
    assert len(known) == 4


def test_hostile_packs_are_refused_with_bounded_memory():
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(1 << 30))  # 1 GiB of zeroes in ~32 KiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RemoteProtocolError, match="more than"):
        Unpacker().unpack(Pack(4096, memoryview(bomb), True))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: no 1 GiB buffer
    with pytest.raises(RemoteProtocolError, match="does not decompress"):
        Unpacker().unpack(Pack(100, memoryview(os.urandom(64)), True))
    # A pack may hold data frames only: not a pack, nor a control frame.
    inner = b"".join(bytes(b) for b in encode_pack(10, b"x" * 10))
    data = zstandard.ZstdCompressor().compress(inner)
    with pytest.raises(RemoteProtocolError, match="unknown type"):
        Unpacker().unpack(Pack(len(inner), memoryview(data), True))
    # A pack announcing more than a frame may hold is refused before anything is decompressed.
    reader = FrameReader()
    reader.feed(_frame(40, b"abc", 0, 1 << 40) + b"abc")
    with pytest.raises(RemoteProtocolError, match="inner bytes"):
        reader.frames()
    # A reduced write is an inner frame only.
    reader = FrameReader()
    reader.feed(encode_rwrite(1, 0, b"\0\0\0\0"))
    with pytest.raises(RemoteProtocolError, match=f"unknown type {T_RWRITE}"):
        reader.frames()
    one_block = b"\0\0\0\1\0\0\0\x10\0" + b"x" * 4096  # one data segment of 4096 bytes
    assert len(decode_rwrite(RWrite(1, 0, memoryview(one_block)), 1 << 20)) == 1
    for payload, size in ((b"", MiB), (b"\0\0\0\x05", MiB), (b"\0\0\0\1\0\0\0\0\x10" + b"x" * 15, MiB),
                          (b"\0\0\0\1\x07\0\0\0\x10", MiB), (b"\0\0\0\1\0\0\0\0\0", MiB),
                          (one_block, 2048), (one_block + b"extra", MiB)):
        with pytest.raises(RemoteProtocolError):
            decode_rwrite(RWrite(1, 0, memoryview(payload)), size)


def test_capabilities_are_negotiated_and_an_older_peer_gets_plain_frames(tmp_path):
    w = Welcome("r", "n", True, 1, False, 3, 4, (CAP_ZSTD, CAP_DEDUP))
    reader = FrameReader()
    reader.feed(encode(w))
    assert reader.frames() == [w]
    # An older target's Welcome has no caps: nothing is negotiated.
    old = {"replica_id": "r", "replica_name": "n", "created": True, "generation": 1}
    reader.feed(_frame(4, json.dumps(old).encode()) + json.dumps(old).encode())
    assert reader.frames()[0].caps == ()
    # The target takes what it supports of the offer; an older source offers nothing.
    from blockdev.volume import VolumeStore

    server = TargetServer(VolumeStore(tmp_path))
    hello = Hello(1, VOL, "v", MiB, 4096, 1, b"n" * 32, "async", (CAP_ZSTD, CAP_DEDUP, "something-new"))
    assert server._caps(hello) == (CAP_ZSTD,)  # no content index yet: no dedup
    server.open_index()
    assert server._caps(hello) == (CAP_ZSTD, CAP_DEDUP)
    assert server._caps(Hello(1, VOL, "v", MiB, 4096, 1, b"n" * 32, "async", ())) == ()
    assert server._caps(Hello(1, VOL, "v", MiB, 4096, 1, b"n" * 32, "sync", (CAP_ZSTD,))) == ()
    server.index.close()


def test_content_index_persists_tracks_overwrites_and_survives_damage(tmp_path):
    path = tmp_path / INDEX_FILE
    idx = ContentIndex(path)
    vol = uuid.uuid4().bytes
    a, b = os.urandom(BLOCK), os.urandom(BLOCK)
    idx.update(vol, [Write(1, 0, memoryview(a + b)), Write(2, 8 * BLOCK, memoryview(bytes(BLOCK)))])
    assert len(idx) == 2  # zero blocks are not indexed
    idx.close()
    idx = ContentIndex(path)  # persisted
    entries = idx.lookup(digest(a)[:16] + digest(b)[:16] + os.urandom(16))
    assert entries[0] == 1 and entries[1:17] == vol and int.from_bytes(entries[17:25], "big") == 0
    assert int.from_bytes(entries[25 + 17:50], "big") == BLOCK and entries[50] == 0
    idx.update(vol, [Write(3, 100, memoryview(b"y" * 10))])  # a partial overwrite of block 0
    assert idx.lookup(digest(a)[:16])[0] == 0 and idx.lookup(digest(b)[:16])[0] == 1
    idx.update(vol, [Zero(4, BLOCK, BLOCK)])
    assert len(idx) == 0
    idx.update(vol, [Write(5, 0, memoryview(a))])
    idx.drop(vol)
    assert len(idx) == 0
    idx.close()
    path.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    idx = ContentIndex(path)  # moved aside, started afresh
    assert len(idx) == 0 and list(tmp_path.glob(f"{INDEX_FILE}.damaged-*"))
    idx.close()


def test_a_rollback_takes_the_blocks_it_restores_out_of_the_content_index(tmp_path):
    """A unit rolled back at the target (link lost mid-checkpoint) must not leave index entries naming
    what it wrote: the replica holds the old content again."""
    from blockdev.volume import VolumeStore
    from mirror.undo import UndoLog

    store = VolumeStore(tmp_path)
    src = str(uuid.uuid4())
    store.create("r", 64 * BLOCK, extra={"replica": {"source_uuid": src, "source_name": "r"}})
    server = TargetServer(store)
    server.open_index()
    image = store.open_image("r")
    undo = UndoLog(tmp_path / "r.mirror-undo", 64 * BLOCK)
    old, new = os.urandom(BLOCK), os.urandom(BLOCK)
    image.pwrite(old, 3 * BLOCK)
    server.index.update(uuid.UUID(src).bytes, [Write(1, 3 * BLOCK, memoryview(old))])
    undo.begin((1, 10))
    undo.save(image, [(3, 3)])
    image.pwrite(new, 3 * BLOCK)
    server.index.update(uuid.UUID(src).bytes, [Write(2, 3 * BLOCK, memoryview(new))])
    assert server.index.lookup(digest(new)[:16])[0] == 1
    assert undo.rollback(image) == BLOCK
    server._forget_restored("r", undo)
    assert server.index.lookup(digest(new)[:16])[0] == 0
    image.close()
    undo.close()
    server.close()


# -- end to end: real daemons -----------------------------------------------------------------------
nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def template() -> bytes:
    rng = random.Random(7)
    return (rng.randbytes(3 * MiB) + bytes(MiB) + (b"repetitive text\n" * 65536)[:MiB]
            + rng.randbytes(MiB // 2) + bytes(MiB // 2))


def write(sock: str, name: str, data: bytes) -> None:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    for off in range(0, len(data), MiB):
        h.pwrite(data[off:off + MiB], off)
    h.flush()
    h.shutdown()


def test_dedup_across_volumes_a_forged_reference_and_restarts_of_both_daemons(procs):
    def vd(*args: str) -> str:
        return procs.run("--data-dir", str(procs.tmp / "src"), *args).stdout

    names = ("a", "b", "c", "d")
    for n in names:
        vd("create", n, "--size", "16M")
    tgt, tport = procs.target("dst")
    sock = str(procs.tmp / "src.sock")
    srv, _ = procs.start("--data-dir", str(procs.tmp / "src"), "serve", *names, "--nbd", f"unix:{sock}", "-v",
                         log="serve.log", ready=r"serving ")
    for n in names:
        vd("mirror", n, "--to", f"127.0.0.1:{tport}", "--mode", "async", "--timeout", "3",
           "--checkpoint-interval", "1s")
    data = template()

    def synced(n: str) -> dict:
        st = procs.wait_state("src", n, "in_sync", timeout=60)
        assert (procs.tmp / "src" / f"{n}.img").read_bytes() == (procs.tmp / "dst" / f"{n}.img").read_bytes()
        red = st["reduction"]
        assert red["logical"] == red["data"] + red["zero"] + red["dedup"] + red["compression"] + red["coalesced"]
        assert red["wire"] >= red["data"]
        return red

    write(sock, "a", data)
    ra = synced("a")
    assert ra["caps"] == ["zstd", "dedup"] and ra["zero"] >= MiB + MiB // 2 and ra["compression"] > MiB // 2
    write(sock, "b", data)
    rb = synced("b")
    assert rb["dedup"] >= 3 * MiB + MiB // 2 and rb["wire"] < 64 * 1024, rb  # the clone costs almost nothing
    assert "reduction" in vd("status", "b")
    per_target = rb["per_target"]
    assert per_target["volumes"] == 4 and per_target["logical"] >= ra["logical"] + rb["logical"]
    # Forge: a's replica changes behind the target's back; c's references to it (the cache names a's
    # blocks, the first copy) are caught, the source forgets and asks again, and c is still exact.
    corrupt_silently(procs.tmp / "dst" / "a.img", [(0, os.urandom(BLOCK))])
    write(sock, "c", data)
    rc = synced("c")
    assert "does not match its content" in (procs.tmp / "target.log").read_text()
    assert procs.status("src", "c")["connects"] >= 2 and rc["logical"] >= len(data)
    # Both daemons restart: the source's cache is gone, the target's index is not.
    procs.kill9(srv)
    procs.kill9(tgt)
    tgt, _ = procs.target("dst", tport)
    srv, _ = procs.start("--data-dir", str(procs.tmp / "src"), "serve", *names, "--nbd", f"unix:{sock}", "-v",
                         log="serve.log", ready=r"serving ")
    for n in ("a", "b", "c"):
        procs.wait_state("src", n, "in_sync", timeout=60)
    write(sock, "d", data)
    rd = synced("d")
    assert rd["dedup"] >= 3 * MiB + MiB // 2 and rd["wire"] < 64 * 1024, rd
