"""WAN data reduction (DESIGN.md ``reduce.py``): what an async shipper sends, made small.

Negotiated in the handshake (``Hello.caps`` offered, ``Welcome.caps`` taken; an older peer takes
none and gets plain frames). With ``zstd`` the data frames of one shipper step travel as a Pack: a
chunk of one session-long zstd stream (flushed per pack, the context and a 32 MiB window kept, with
long-distance matching), whose level follows the link: raised while compressing costs little next
to sending, lowered when the CPU is what holds the shipper back. Inside, each write becomes a plain
Write or an RWrite made of segments:

- ``zero``: an all-zero 4 KiB block crosses as a range, never as bytes;
- ``skip``: a block a later write of the same unshipped checkpoint overwrites (coalesced: the target
  applies a checkpoint's frames atomically under its undo log, so nobody sees the skipped state);
- ``ref``: a run of blocks the target already holds (``dedup``), named by (source volume uuid,
  offset) and the BLAKE3 hash of the run's content, which the target checks before it copies;
- ``data``: the bytes.

Where the target holds a block is learnt from ``KnownBlocks``, shared by every volume of this daemon
mirrored to the same target (blocks they shipped, usable by another stream once acknowledged), and
from the target's persistent content index (``content_index.py``), asked in one DedupQuery per
shipper step for the blocks the cache does not know.

Accounting is exact: logical = data + zero + dedup + compression + coalesced, to the byte; wire
bytes are what went to the socket (data plus framing, queries included).
"""
from __future__ import annotations

import struct
import time
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import blake3
import trio
import zstandard

from .wire import RemoteProtocolError
from .wire.codec import (
    DEDUP_ENTRY,
    DEDUP_PREFIX,
    INNER_TYPES,
    MAX_DEDUP_QUERY,
    MAX_PAYLOAD,
    FrameReader,
    encode_checkpoint,
    encode_pack,
    encode_rwrite,
    encode_write,
    encode_zero,
)
from .wire.events import Event, Pack, RWrite, Write, Zero

CAP_ZSTD, CAP_DEDUP = "zstd", "dedup-blake3"
OFFERED = (CAP_ZSTD, CAP_DEDUP)
BLOCK = 4096
PACK_INNER = 128 << 10  # inner bytes per pack: a pack crosses a slow line in about a second, and an
# inner frame may span packs (the zstd context spans them all)
WINDOW_LOG = 25  # 32 MiB of history: long-distance matches across the blocks of a pack and the last ones
MAX_WINDOW = 1 << 27  # a target refuses a stream that needs more decompression memory
LEVEL_MIN, LEVEL_MAX, LEVEL_START = 1, 19, 12
LEVEL_EVERY = 2.0  # seconds between level changes (each one starts a new zstd frame)
WAIT_PENDING = 120.0  # seconds a stream waits for another stream's copy of its blocks to be acknowledged
GATE_BYTES = 1 << 20  # a step with this much data the target lacks takes the target's bulk turn
GATE_SMALL = 64 << 10  # ...and one with less than this never waits for another stream's turn
GATE_WAIT = 600.0  # seconds a bulk step waits for another stream's bulk transfer before it goes anyway
KNOWN_ENTRIES = 1 << 18  # cached block locations (1 GiB of 4 KiB blocks)

S_DATA, S_ZERO, S_SKIP, S_REF = 0, 1, 2, 3
_SEG = struct.Struct(">BI")  # kind, length
_REF = struct.Struct(">16sQ32s")  # source volume uuid, its offset, BLAKE3 of the run
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">B16sQ")
_ZERO_BLOCK = bytes(BLOCK)
OP_WRITE, OP_ZERO, OP_CP = 0, 1, 2


def digest(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


SAVED = ("zero", "dedup", "compression", "coalesced")  # the causes of bytes that did not cross


# -- accounting ------------------------------------------------------------------------------------
@dataclass
class Reduction:
    """Bytes by fate. ``logical == data + zero + dedup + compression + coalesced`` always holds."""

    logical: int = 0
    data: int = 0  # payload bytes on the wire (after compression)
    zero: int = 0
    dedup: int = 0
    compression: int = 0
    coalesced: int = 0
    wire: int = 0  # everything sent: data plus framing (headers, references, queries)

    def add(self, other: Reduction) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def check(self) -> None:
        saved = self.data + self.zero + self.dedup + self.compression + self.coalesced
        assert self.logical == saved, f"reduction accounting is off: {self.logical} != {saved}"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["framing"] = self.wire - self.data
        d["ratio"] = round(self.logical / self.wire, 2) if self.wire else None
        return d


def summary(red: dict[str, Any] | None) -> str:
    """The short form for a status line: ``14.2x (zero 40% dedup 50% zstd 8%)``."""
    if not red or not red.get("logical"):
        return ""
    total = red["logical"]
    parts = [f"{name} {100 * red[key] / total:.0f}%" for key, name in
             (("zero", "zero"), ("dedup", "dedup"), ("compression", "zstd"), ("coalesced", "coalesced"))
             if red.get(key)]
    ratio = f"{red['ratio']:.1f}x" if red.get("ratio") else "-"
    return f"{ratio} ({' '.join(parts)})" if parts else ratio


# -- the operations of one shipper step ------------------------------------------------------------
class Frames:
    """The data frames of one shipper step as operations; sent plain, or reduced once negotiated."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[tuple[int, int, int, Any, int, int]] = []  # (op, seq, offset, data|len, flags, time)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def write(self, seq: int, offset: int, data: memoryview | bytes, fua: bool = False) -> None:
        self.ops.append((OP_WRITE, seq, offset, data, int(fua), 0))

    def zero(self, seq: int, offset: int, length: int, fua: bool = False, trim: bool = False) -> None:
        self.ops.append((OP_ZERO, seq, offset, length, int(fua) | (2 if trim else 0), 0))

    def checkpoint(self, seq: int, cp_id: int, time_ns: int) -> None:
        self.ops.append((OP_CP, seq, cp_id, 0, 0, time_ns))

    def plain(self, acct: Reduction) -> list[Any]:
        """The frames as they go to a peer that took no reduction (zeroes are ranges anyway)."""
        out: list[Any] = []
        for op, seq, offset, x, flags, t in self.ops:
            if op == OP_WRITE:
                out.extend(encode_write(seq, offset, x, bool(flags & 1)))
                acct.logical += len(x)
                acct.data += len(x)
            elif op == OP_ZERO:
                out.append(encode_zero(seq, offset, x, bool(flags & 1), bool(flags & 2)))
                acct.logical += x
                acct.zero += x
            else:
                out.append(encode_checkpoint(seq, offset, t))
        acct.wire += sum(len(b) for b in out)
        return out


# -- what the target is known to hold --------------------------------------------------------------
class Stream:
    """One session of one volume: blocks it sent are usable by others once acknowledged."""

    __slots__ = ("acked", "alive", "committed", "idle", "uuid")

    def __init__(self, volume_uuid: str) -> None:
        self.uuid = uuidlib.UUID(volume_uuid).bytes
        self.alive = True
        self.acked = 0  # wire seqs the target applied
        self.committed = 0  # ...and committed (a lost link rolls back the rest)
        self.idle = False  # its shipper has nothing to send (the replicator says)


class KnownBlocks:
    """A bounded LRU cache: BLAKE3 digest -> where the target holds (or will hold) that block, shared
    by every stream to one target. Not thread-safe: the trio thread only."""

    def __init__(self, capacity: int = KNOWN_ENTRIES) -> None:
        self.capacity = capacity
        # The bulk turn: streams whose steps carry much data the target lacks ship one at a time, so
        # clones written at once cross once (the later ones find the earlier one's blocks). Steps
        # with little new data (a host's steady writes, references, zeroes) never wait for it.
        self.turn: Stream | None = None
        # digest -> (volume uuid bytes, offset, stream or None (the target said so), wire seq)
        self._map: OrderedDict[bytes, tuple[bytes, int, Stream | None, int]] = OrderedDict()
        self._at: dict[tuple[bytes, int], bytes] = {}  # (volume uuid, block number) -> digest

    def __len__(self) -> int:
        return len(self._map)

    def clear(self) -> None:
        self._map.clear()
        self._at.clear()

    def put(self, h: bytes, vol: bytes, offset: int, stream: Stream | None, seq: int) -> None:
        old = self._map.pop(h, None)
        if old is not None:
            self._at.pop((old[0], old[1] // BLOCK), None)
        key = (vol, offset // BLOCK)
        prev = self._at.pop(key, None)
        if prev is not None:
            self._map.pop(prev, None)
        self._map[h] = (vol, offset, stream, seq)
        self._at[key] = h
        while len(self._map) > self.capacity:
            _gone, (v, o, _s, _q) = self._map.popitem(last=False)
            self._at.pop((v, o // BLOCK), None)

    def forget(self, vol: bytes, offset: int, length: int) -> None:
        """Locations about to be overwritten by ``vol``'s stream."""
        if not self._at:
            return
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        if last - first > len(self._at):
            for key in [k for k in self._at if k[0] == vol and first <= k[1] <= last]:
                self._map.pop(self._at.pop(key), None)
            return
        at = self._at
        for b in range(first, last + 1):
            h = at.pop((vol, b), None)
            if h is not None:
                self._map.pop(h, None)

    def turn_free(self, stream: Stream) -> bool:
        t = self.turn
        return t is None or t is stream or not t.alive or t.idle

    def lookup(self, h: bytes, stream: Stream) -> tuple[str, Any]:
        """("ref", (vol, offset)) usable by ``stream`` now; ("wait", (stream, seq)); or ("ask", None)."""
        e = self._map.get(h)
        if e is None:
            return "ask", None
        vol, off, owner, seq = e
        if owner is None or owner is stream or owner.acked >= seq:
            self._map.move_to_end(h)
            return "ref", (vol, off)
        if owner.alive:
            return "wait", (owner, seq)
        if seq <= owner.committed:
            return "ref", (vol, off)
        self._map.pop(h, None)  # its session ended before the target committed it
        self._at.pop((vol, off // BLOCK), None)
        return "ask", None


# -- source: one session's reducer -----------------------------------------------------------------
class Reducer:
    """Turns a shipper step's Frames into Packs (trio thread; compression runs in a worker thread)."""

    def __init__(self, volume_uuid: str, caps: Iterable[str], known: KnownBlocks,
                 query: Callable[[bytes], Awaitable[bytes]] | None = None, level: int = LEVEL_START) -> None:
        caps = tuple(caps)
        self.stream = Stream(volume_uuid)
        self.dedup = CAP_DEDUP in caps and query is not None
        self.known, self._query = known, query
        self._compress_s = 0.0  # the last step's compression time
        self.level = max(LEVEL_MIN, min(LEVEL_MAX, level))
        self._cctx: Any = None
        self._last_level_change = 0.0
        self.queries = 0
        self.waits = 0

    # -- level -----------------------------------------------------------------------------------
    def _compressor(self) -> tuple[Any, bool]:
        if self._cctx is None:
            params = zstandard.ZstdCompressionParameters.from_level(
                self.level, window_log=WINDOW_LOG, enable_ldm=True)
            self._cctx = zstandard.ZstdCompressor(compression_params=params).compressobj()
            return self._cctx, True
        return self._cctx, False

    def sent(self, blocked: float) -> None:
        """The shipper waited ``blocked`` seconds for the socket to take the last step: the level
        follows the link (waiting for it: compress harder) vs the CPU (the socket took everything
        at once while compressing took long: compress faster)."""
        now = time.monotonic()
        c = self._compress_s
        if now - self._last_level_change < LEVEL_EVERY or c <= 0:
            return
        new = self.level
        if blocked >= c and self.level < LEVEL_MAX:
            new = min(LEVEL_MAX, self.level + 2)
        elif blocked < 0.001 and c > 0.5 and self.level > LEVEL_MIN:
            new = max(LEVEL_MIN, self.level - 2)
        if new != self.level:
            self.level, self._cctx, self._last_level_change = new, None, now

    # -- the step --------------------------------------------------------------------------------
    async def encode(self, frames: Frames, acct: Reduction) -> list[Any]:
        ops = frames.ops
        skips = coalesce(ops)
        plan = self._classify(ops, skips)
        if self.dedup and plan:
            await self._resolve(plan, acct)
            await self._take_turn(plan, acct)
        inner, d_bytes, step = self._build(ops, skips, plan)
        out: list[Any] = []
        cctx, reset = self._compressor()
        started = time.monotonic()
        packs = await trio.to_thread.run_sync(_compress, cctx, inner)
        self._compress_s = time.monotonic() - started
        for n, data in packs:
            out.extend(encode_pack(n, data, reset))
            reset = False
            step.wire += 32 + len(data)
        # Compression's share: what the inner stream lost, up to the data in it (framing compresses too).
        saved = max(0, min(d_bytes, len(inner) - sum(len(d) for _n, d in packs)))
        step.compression += saved
        step.data += d_bytes - saved
        step.check()
        acct.add(step)
        return out

    def _classify(self, ops: list[Any], skips: dict[int, set[int]]) -> dict[bytes, str]:
        """Every data block's digest and what the cache says of it; {} without dedup."""
        plan: dict[bytes, str] = {}
        if not self.dedup:
            return plan
        for i, (op, _seq, offset, data, _flags, _t) in enumerate(ops):
            if op != OP_WRITE:
                continue
            skip = skips.get(i, ())
            for b, blk in _blocks(offset, data):
                if b in skip or blk == _ZERO_BLOCK:
                    continue
                h = digest(blk)
                if h not in plan:
                    plan[h] = "?"
        return plan

    async def _resolve(self, plan: dict[bytes, str], acct: Reduction) -> None:
        """Wait for another stream's copy of a block to be acknowledged; ask the target for the rest."""
        known, stream = self.known, self.stream
        deadline = time.monotonic() + WAIT_PENDING
        while True:  # until no block is on its way in another stream (others may send meanwhile)
            waits: dict[Stream, int] = {}
            ask: list[bytes] = []
            for h in plan:
                how, where = known.lookup(h, stream)
                if how == "wait":
                    owner, seq = where
                    waits[owner] = max(waits.get(owner, 0), seq)
                elif how == "ask":
                    ask.append(h)
            if not waits or time.monotonic() >= deadline or not stream.alive:
                break
            self.waits += 1
            for owner, seq in waits.items():
                while owner.alive and owner.acked < seq and stream.alive and time.monotonic() < deadline:
                    await trio.sleep(0.05)
        for i in range(0, len(ask), MAX_DEDUP_QUERY):
            part = ask[i:i + MAX_DEDUP_QUERY]
            assert self._query is not None
            self.queries += 1
            acct.wire += 32 + DEDUP_PREFIX * len(part)
            reply = await self._query(b"".join(h[:DEDUP_PREFIX] for h in part))
            if len(reply) != DEDUP_ENTRY * len(part):
                raise RemoteProtocolError("the target answered a dedup query with the wrong number of entries")
            for j, h in enumerate(part):
                found, vol, off = _ENTRY.unpack_from(reply, j * DEDUP_ENTRY)
                if found == 1 and off % BLOCK == 0:
                    known.put(h, vol, off, None, 0)

    async def _take_turn(self, plan: dict[bytes, str], acct: Reduction) -> None:
        """A step with much data the target lacks waits its turn behind another stream's bulk
        transfer (then asks again: most of its blocks may have crossed meanwhile)."""
        known, stream = self.known, self.stream
        novel = sum(1 for h in plan if known.lookup(h, stream)[0] != "ref") * BLOCK
        free = known.turn_free(stream)
        if novel < GATE_BYTES and (free or novel < GATE_SMALL):
            # Little new data: it goes now (a host's steady writes are not held up). A step of a
            # bulk transfer that starts while another is under way waits even when it is small:
            # its host is still writing (the first steps are small), and its blocks may be crossing.
            if known.turn is stream:
                known.turn = None
            return
        if not free:
            self.waits += 1
            deadline = time.monotonic() + GATE_WAIT
            while not known.turn_free(stream) and stream.alive and time.monotonic() < deadline:
                await trio.sleep(0.1)
            await self._resolve(plan, acct)
        known.turn = stream

    def _build(self, ops: list[Any], skips: dict[int, set[int]],
               plan: dict[bytes, str]) -> tuple[bytes, int, Reduction]:
        """The inner frames, the data payload bytes among them, and the step's accounting so far."""
        step = Reduction()
        known, vol = self.known, self.stream.uuid
        cur: list[bytes | memoryview] = []
        cur_data = 0
        for i, (op, seq, offset, x, flags, t) in enumerate(ops):
            d_bytes = 0
            if op == OP_CP:
                frame: list[bytes | memoryview] = [encode_checkpoint(seq, offset, t)]
            elif op == OP_ZERO:
                known.forget(vol, offset, max(x, 1))
                frame = [encode_zero(seq, offset, x, bool(flags & 1), bool(flags & 2))]
                step.logical += x
                step.zero += x
            else:
                n = len(x)
                step.logical += n
                if n:
                    known.forget(vol, offset, n)
                segs = self._segments(seq, offset, x, skips.get(i, ()), plan)
                if len(segs) == 1 and segs[0][0] == S_DATA:
                    frame = encode_write(seq, offset, x, bool(flags & 1))
                    d_bytes = n
                else:
                    table = [_COUNT.pack(len(segs))]
                    body: list[bytes | memoryview] = []
                    for kind, length, extra in segs:
                        table.append(_SEG.pack(kind, length))
                        if kind == S_DATA:
                            body.append(extra)
                            d_bytes += length
                        elif kind == S_REF:
                            table.append(extra)
                            step.dedup += length
                        elif kind == S_ZERO:
                            step.zero += length
                        else:
                            step.coalesced += length
                    frame = [encode_rwrite(seq, offset, b"".join(table + body), bool(flags & 1))]
            cur.extend(frame)
            cur_data += d_bytes
        return b"".join(cur), cur_data, step

    def _segments(self, seq: int, offset: int, data: memoryview | bytes, skip: set[int] | tuple[()],
                  plan: dict[bytes, str]) -> list[tuple[int, int, Any]]:
        """(kind, length, data view | packed reference) covering the write, merged."""
        segs: list[list[Any]] = []  # [kind, length, start in data, ref (vol, src offset) | None]
        known, stream, vol = self.known, self.stream, self.stream.uuid
        view = memoryview(data)
        pos, end = 0, offset + len(view)
        for b, blk in _blocks(offset, data, partial=True):
            n = len(blk)
            kind, ref = S_DATA, None
            full = n == BLOCK and (offset + pos) % BLOCK == 0
            if full and b in skip:
                kind = S_SKIP
            elif blk == _ZERO_BLOCK[:n]:
                kind = S_ZERO
            elif full and plan:
                h = digest(blk)
                how, where = known.lookup(h, stream)
                # Not into this write's own range: the target reads references before it writes.
                if how == "ref" and not (where[0] == vol and offset <= where[1] < end):
                    kind, ref = S_REF, where
                if kind != S_REF:  # a usable location stays (a new pending one would make others wait)
                    known.put(h, vol, offset + pos, stream, seq)  # it holds this block once applied
            last = segs[-1] if segs else None
            if last is not None and last[0] == kind and (
                    kind != S_REF or (last[3][0] == ref[0] and last[3][1] + last[1] == ref[1])):  # type: ignore[index]
                last[1] += n
            else:
                segs.append([kind, n, pos, ref])
            pos += n
        out: list[tuple[int, int, Any]] = []
        for kind, n, start, ref in segs:
            if kind == S_DATA:
                out.append((kind, n, view[start:start + n]))
            elif kind == S_REF:
                out.append((kind, n, _REF.pack(ref[0], ref[1], digest(view[start:start + n]))))
            else:
                out.append((kind, n, None))
        return out


def _compress(cctx: Any, inner: bytes) -> list[tuple[int, bytes]]:
    """(inner bytes, compressed chunk) per PACK_INNER slice, each flushed (a worker thread)."""
    view = memoryview(inner)
    out = []
    for i in range(0, len(view), PACK_INNER):
        part = view[i:i + PACK_INNER]
        out.append((len(part), cctx.compress(part) + cctx.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)))
    return out


def _blocks(offset: int, data: memoryview | bytes, partial: bool = False) -> Iterable[tuple[int, memoryview]]:
    """(block number, view) of the full 4 KiB blocks of a write (and its partial ends if asked)."""
    view = memoryview(data)
    n = len(view)
    pos = 0
    head = (-offset) % BLOCK
    if head and n:
        if partial:
            yield (offset // BLOCK, view[:min(head, n)])
        pos = min(head, n)
    while pos + BLOCK <= n:
        yield ((offset + pos) // BLOCK, view[pos:pos + BLOCK])
        pos += BLOCK
    if pos < n and partial:
        yield ((offset + pos) // BLOCK, view[pos:])


def coalesce(ops: list[Any]) -> dict[int, set[int]]:
    """For each write (by index), its full blocks that a later write or zero of the same unit (no
    checkpoint in between) overwrites: they need not cross at all."""
    out: dict[int, set[int]] = {}
    if sum(1 for o in ops if o[0] != OP_CP) < 2:
        return out
    covered: set[int] = set()
    for i in range(len(ops) - 1, -1, -1):
        op, _seq, offset, x, _flags, _t = ops[i]
        if op == OP_CP:
            covered = set()
            continue
        n = len(x) if op == OP_WRITE else x
        first, end = -(-offset // BLOCK), (offset + n) // BLOCK
        if first >= end:
            continue
        if op == OP_WRITE and covered:
            hit = {b for b in range(first, end) if b in covered} if end - first < len(covered) else \
                {b for b in covered if first <= b < end}
            if hit:
                out[i] = hit
        covered.update(range(first, end))
    return out


# -- target ----------------------------------------------------------------------------------------
class StaleReference(RemoteProtocolError):
    """A reference whose content the target no longer holds: the source resends the data."""

    code = "dedup-stale"


SLICE = 1024  # compressed bytes fed at once: zstd expands at most ~32768x, so a bomb overshoots by 32 MiB


class Unpacker:
    """The target's end of a session's zstd stream: a Pack in, its inner frames out. Memory is
    bounded by the pack's announced size (at most MAX_PAYLOAD) plus one slice's expansion, and the
    window (at most MAX_WINDOW): a zstd bomb is refused before it fills memory."""

    def __init__(self) -> None:
        self._dctx: Any = None
        self._tail = bytearray()  # an inner frame's beginning (frames may span packs)
        self._need = 32

    def unpack(self, pack: Pack) -> list[Event]:
        if pack.reset or self._dctx is None:
            if self._tail:
                raise RemoteProtocolError("bad frame: a new zstd frame starts inside an inner frame")
            self._dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj()
        dctx, cap = self._dctx, pack.inner_size
        out = self._tail
        cap += len(out)
        data = pack.data
        try:
            for i in range(0, len(data), SLICE):
                out += dctx.decompress(data[i:i + SLICE])
                if len(out) > cap:
                    raise RemoteProtocolError(f"bad frame: pack decompresses to more than the {cap} bytes "
                                              "it announced")
        except zstandard.ZstdError as e:
            raise RemoteProtocolError(f"bad frame: pack does not decompress: {e}") from None
        if len(out) != cap:
            raise RemoteProtocolError(f"bad frame: pack decompressed to {len(out) - cap + pack.inner_size} "
                                      f"bytes, announced {pack.inner_size}")
        if len(out) < self._need:  # a large frame still arriving: parse it once, when whole
            self._tail = out
            return []
        reader = FrameReader(len(out), MAX_PAYLOAD, INNER_TYPES)
        reader.feed(out)
        events = reader.frames()  # views into the reader's buffer: valid while the events live
        rest, self._need = reader.rest()
        self._tail = bytearray(rest)
        return events


Segment = tuple[int, int, int, Any]  # (kind, offset, length, data view | (vol, src offset, digest))


def decode_rwrite(rw: RWrite, size: int) -> list[Segment]:
    """The segments of an RWrite, checked: lengths add up, data is all there, ranges inside."""
    p = rw.payload
    try:
        (count,) = _COUNT.unpack_from(p, 0)
        pos, segs, total, data_len = _COUNT.size, [], 0, 0
        if count > len(p):
            raise RemoteProtocolError("bad frame: reduced write with more segments than bytes")
        raw: list[tuple[int, int, Any]] = []
        for _ in range(count):
            kind, n = _SEG.unpack_from(p, pos)
            pos += _SEG.size
            if kind > S_REF or n == 0:
                raise RemoteProtocolError(f"bad frame: reduced write segment of kind {kind}, {n} bytes")
            ref = None
            if kind == S_REF:
                vol, src, h = _REF.unpack_from(p, pos)
                pos += _REF.size
                if src % BLOCK or src > 1 << 62:
                    raise RemoteProtocolError("bad frame: reference out of range")
                ref = (vol, src, h)
            elif kind == S_DATA:
                data_len += n
            raw.append((kind, n, ref))
            total += n
    except struct.error:
        raise RemoteProtocolError("bad frame: reduced write cut short") from None
    if data_len != len(p) - pos:
        raise RemoteProtocolError("bad frame: reduced write data does not match its segments")
    if rw.offset + total > size or total > MAX_PAYLOAD:
        raise RemoteProtocolError(f"bad frame: reduced write of {total} bytes at {rw.offset} is beyond the "
                                  "replica's end")
    off = rw.offset
    for kind, n, ref in raw:
        if kind == S_DATA:
            segs.append((kind, off, n, p[pos:pos + n]))
            pos += n
        else:
            segs.append((kind, off, n, ref))
        off += n
    return segs


def has_refs(segs: list[Segment]) -> bool:
    return any(s[0] == S_REF for s in segs)


def resolve(seq: int, fua: bool, segs: list[Segment],
            read: Callable[[bytes, int, int], bytes | None] | None = None) -> list[Write | Zero]:
    """The frames to apply for a reduced write (any thread when it has references: they are read
    with ``read(vol, offset, length)`` and their BLAKE3 checked; StaleReference if one fails)."""
    out: list[Write | Zero] = []
    for kind, off, n, x in segs:
        if kind == S_DATA:
            out.append(Write(seq, off, x, fua))
        elif kind == S_ZERO:
            out.append(Zero(seq, off, n, fua, True))
        elif kind == S_REF:
            vol, src, h = x
            data = read(vol, src, n) if read is not None else None
            if data is None or len(data) != n or digest(data) != h:
                raise StaleReference(f"reference to {n} bytes at {src} of volume {uuidlib.UUID(bytes=vol)} "
                                     "does not match its content here (changed since indexed): resend the data")
            out.append(Write(seq, off, memoryview(data), fua))
    return out
