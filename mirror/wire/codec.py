"""Frames on the wire: a fixed 32-byte header, a payload, and a checksum over both.

    header  >IBBHQQQ  payload length, type, flags, reserved (0), a, b, checksum
    payload binary for data frames, JSON for handshake and control frames

``checksum = xxh3_64(payload, seed=xxh3_64(header[:24]))``: a flipped bit anywhere in a frame, or a
peer that is not speaking this protocol, is caught before anything is applied to a replica.
``FrameReader`` owns the receive buffer (sans-IO: bytes in, events out) and parses every complete
frame in it at once, so a single ``recv_into`` may yield hundreds of writes.
"""
from __future__ import annotations

import json
import re
import struct
from typing import Any

import xxhash

from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    Ack,
    Auth,
    Bye,
    Challenge,
    Checkpoint,
    DedupQuery,
    DedupReply,
    Demote,
    Demoted,
    ErrorMsg,
    Event,
    Flush,
    HashQuery,
    HashReply,
    Hello,
    Pack,
    Ping,
    RWrite,
    Welcome,
    Write,
    Zero,
)

HEADER = struct.Struct(">IBBHQQQ")
HEADER_SIZE = HEADER.size  # 32
_PREFIX = struct.Struct(">IBBHQQ")  # the checksummed part of the header
MAX_PAYLOAD = 64 << 20  # a write is split into frames no larger than this (NBD caps requests at 32 MiB)
MAX_JSON = 1 << 20
# Before the peer has authenticated (target side) a frame may carry at most this much: a Hello is a
# few hundred bytes, and an anonymous connection must not make us buffer megabytes.
PRE_AUTH_PAYLOAD = 64 << 10
MAX_QUERY_INDICES = 16384  # digests per HashQuery (the source asks for at most verify.QUERY_BATCH)
MAX_INT = (1 << 63) - 1  # every integer field of a control frame is in [0, MAX_INT] unless narrower
MAX_CERT = 16 << 10  # a source's certificate in its Auth (a self-signed P-256 one is about 600 bytes)
MAX_NAME = 255  # volume names, modes, caps and error codes are short strings
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# Frame types. Numbers are part of the protocol: never reuse one.
T_HELLO, T_CHALLENGE, T_AUTH, T_WELCOME, T_ERROR, T_BYE = 1, 2, 3, 4, 5, 6
T_WRITE, T_ZERO, T_FLUSH, T_ACK, T_PING, T_CHECKPOINT = 16, 17, 18, 19, 20, 21
T_HASHQ, T_HASHR = 32, 33
T_PACK, T_RWRITE, T_DEDUPQ, T_DEDUPR = 40, 41, 42, 43  # WAN reduction (mirror/reduce.py)
T_DEMOTE, T_DEMOTED = 60, 61  # planned failover (issue 18 owns 60-79)
F_FUA, F_TRIM = 1, 2
F_RESET = 1  # on a Pack: a new zstd frame starts (the decompressor starts afresh)
DEDUP_PREFIX = 16  # bytes of a BLAKE3 digest in a DedupQuery
DEDUP_ENTRY = 25  # found (1) + source volume uuid (16) + offset (8), per prefix, in a DedupReply
MAX_DEDUP_QUERY = 16384  # prefixes per DedupQuery
_ZERO_LEN = struct.Struct(">Q")

_xxh = xxhash.xxh3_64_intdigest


def _frame(ftype: int, payload: bytes | memoryview = b"", flags: int = 0, a: int = 0, b: int = 0) -> bytes:
    prefix = _PREFIX.pack(len(payload), ftype, flags, 0, a, b)
    return prefix + _xxh(payload, _xxh(prefix)).to_bytes(8, "big")


def frame_header(ftype: int, payload: bytes | memoryview, flags: int = 0, a: int = 0, b: int = 0) -> bytes:
    """The 32-byte header of a frame whose payload is sent separately (zero-copy gather)."""
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise LocalProtocolError(f"frame payload of {n} bytes exceeds {MAX_PAYLOAD}")
    prefix = _PREFIX.pack(n, ftype, flags, 0, a, b)  # _frame inlined: one call per host write saved
    return prefix + _xxh(payload, _xxh(prefix)).to_bytes(8, "big")


def encode_write(seq: int, offset: int, data: bytes | memoryview, fua: bool = False) -> list[bytes | memoryview]:
    """Header and payload of a Write, for sendmsg; the caller keeps ``data`` alive until sent."""
    return [frame_header(T_WRITE, data, F_FUA if fua else 0, seq, offset), data]


def encode_zero(seq: int, offset: int, length: int, fua: bool = False, trim: bool = False) -> bytes:
    payload = _ZERO_LEN.pack(length)
    return _frame(T_ZERO, payload, (F_FUA if fua else 0) | (F_TRIM if trim else 0), seq, offset) + payload


def encode_flush(seq: int) -> bytes:
    return _frame(T_FLUSH, b"", 0, seq)


def encode_checkpoint(seq: int, cp_id: int, time_ns: int) -> bytes:
    """A checkpoint frame: ``cp_id`` in [1, MAX_INT] (0 means "none" in a Welcome), ``time_ns`` in [0, MAX_INT]."""
    if not (1 <= cp_id <= MAX_INT and 0 <= time_ns <= MAX_INT):
        raise LocalProtocolError(f"checkpoint {cp_id} at {time_ns} ns is out of range")
    payload = _ZERO_LEN.pack(time_ns)
    return _frame(T_CHECKPOINT, payload, 0, seq, cp_id) + payload


def encode_ack(seq: int) -> bytes:
    return _frame(T_ACK, b"", 0, seq)


def encode_ping(token: int) -> bytes:
    return _frame(T_PING, b"", 0, token)


def encode_hash_reply(req: int, digests: bytes) -> bytes:
    return frame_header(T_HASHR, digests, 0, req) + digests


def encode_pack(inner_size: int, data: bytes, reset: bool = False) -> list[bytes]:
    return [frame_header(T_PACK, data, F_RESET if reset else 0, inner_size), data]


def encode_rwrite(seq: int, offset: int, payload: bytes, fua: bool = False) -> bytes:
    return frame_header(T_RWRITE, payload, F_FUA if fua else 0, seq, offset) + payload


def encode_dedup_query(req: int, prefixes: bytes) -> bytes:
    return frame_header(T_DEDUPQ, prefixes, 0, req) + prefixes


def encode_dedup_reply(req: int, entries: bytes) -> bytes:
    return frame_header(T_DEDUPR, entries, 0, req) + entries


def _json_frame(ftype: int, obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return _frame(ftype, payload) + payload


def encode(event: Event) -> bytes:
    """Any event as one frame (the data path uses the encode_* functions above to avoid copies)."""
    match event:
        case Hello():
            return _json_frame(T_HELLO, {
                "version": event.version, "volume_uuid": event.volume_uuid, "name": event.name,
                "size": event.size, "block_size": event.block_size, "generation": event.generation,
                "nonce": event.nonce.hex(), "mode": event.mode, "caps": list(event.caps)})
        case Challenge():
            return _json_frame(T_CHALLENGE, {"version": event.version, "nonce": event.nonce.hex(),
                                             "proof": event.proof.hex(), "auth": event.auth})
        case Auth():
            auth: dict[str, Any] = {"proof": event.proof.hex()}
            if event.cert:  # optional: only a source on a TLS link sends them
                auth.update(cert=event.cert.hex(), sig=event.sig.hex())
            return _json_frame(T_AUTH, auth)
        case Welcome():
            return _json_frame(T_WELCOME, {"replica_id": event.replica_id, "replica_name": event.replica_name,
                                           "created": event.created, "generation": event.generation,
                                           "verify": event.verify, "checkpoint": event.checkpoint,
                                           "checkpoint_time_ns": event.checkpoint_time_ns,
                                           "caps": list(event.caps),
                                           **({"sync_checkpoints": True} if event.sync_checkpoints else {})})
        case ErrorMsg():
            return _json_frame(T_ERROR, {"message": event.message, "code": event.code})
        case Bye():
            return _frame(T_BYE)
        case Demote():
            return _json_frame(T_DEMOTE, {"reason": event.reason})
        case Demoted():
            return _json_frame(T_DEMOTED, {"checkpoint": event.checkpoint})
        case Write():
            return b"".join(bytes(x) for x in encode_write(event.seq, event.offset, event.data, event.fua))
        case Zero():
            return encode_zero(event.seq, event.offset, event.length, event.fua, event.trim)
        case Flush():
            return encode_flush(event.seq)
        case Checkpoint():
            return encode_checkpoint(event.seq, event.cp_id, event.time_ns)
        case Ack():
            return encode_ack(event.seq)
        case Ping():
            return encode_ping(event.token)
        case HashQuery():
            return _json_frame(T_HASHQ, {"req": event.req, "leaf_size": event.leaf_size, "level": event.level,
                                         "indices": list(event.indices)})
        case HashReply():
            return encode_hash_reply(event.req, event.digests)
        case Pack():
            return b"".join(encode_pack(event.inner_size, bytes(event.data), event.reset))
        case RWrite():
            return encode_rwrite(event.seq, event.offset, bytes(event.payload), event.fua)
        case DedupQuery():
            return encode_dedup_query(event.req, event.prefixes)
        case DedupReply():
            return encode_dedup_reply(event.req, event.entries)
    raise LocalProtocolError(f"cannot encode {event!r}")


def _field(d: dict[str, Any], key: str, typ: type, lo: int = 0, hi: int = MAX_INT, maxlen: int = MAX_NAME) -> Any:
    """``d[key]`` checked: of exactly ``typ`` (a bool is not an int), ints in [lo, hi], strings short."""
    v = d.get(key)
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise RemoteProtocolError(f"bad frame: field {key!r} missing or not {typ.__name__}")
    if typ is int and not lo <= v <= hi:
        raise RemoteProtocolError(f"bad frame: field {key!r} out of range ({lo}..{hi})")
    if typ is str and len(v) > maxlen:
        raise RemoteProtocolError(f"bad frame: field {key!r} longer than {maxlen} characters")
    return v


def _hexfield(d: dict[str, Any], key: str, maxlen: int = 64) -> bytes:
    try:
        raw = bytes.fromhex(_field(d, key, str, maxlen=2 * maxlen))
    except ValueError:
        raise RemoteProtocolError(f"bad frame: field {key!r} is not hex") from None
    return raw


def _strings(d: dict[str, Any], key: str, most: int = 32) -> tuple[str, ...]:
    v = d.get(key, [])
    if (not isinstance(v, list) or len(v) > most
            or not all(isinstance(c, str) and len(c) <= MAX_NAME for c in v)):
        raise RemoteProtocolError(f"bad frame: field {key!r} is not a list of at most {most} short strings")
    return tuple(v)


def _decode_json(ftype: int, payload: memoryview) -> Event:
    try:
        d = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deeply nested arrays
        raise RemoteProtocolError("bad frame: control payload is not JSON (or nested too deeply)") from None
    if not isinstance(d, dict):
        raise RemoteProtocolError("bad frame: control payload is not an object")
    if ftype == T_HELLO:
        uuid = _field(d, "volume_uuid", str)
        if not UUID_RE.fullmatch(uuid):  # it becomes part of a file name on the target
            raise RemoteProtocolError("bad frame: field 'volume_uuid' is not a lowercase UUID")
        return Hello(_field(d, "version", int), uuid, _field(d, "name", str),
                     _field(d, "size", int, 1), _field(d, "block_size", int, 1, 1 << 30),
                     _field(d, "generation", int), _hexfield(d, "nonce"), _field(d, "mode", str),
                     _strings(d, "caps"))
    if ftype == T_CHALLENGE:
        return Challenge(_field(d, "version", int), _hexfield(d, "nonce"), _hexfield(d, "proof"),
                         _field(d, "auth", bool))
    if ftype == T_AUTH:
        if "cert" in d:
            return Auth(_hexfield(d, "proof"), _hexfield(d, "cert", MAX_CERT), _hexfield(d, "sig", 256))
        return Auth(_hexfield(d, "proof"))
    if ftype == T_WELCOME:
        verify = d.get("verify", False)  # optional: a target from before split-brain checks omits it
        if not isinstance(verify, bool):
            raise RemoteProtocolError("bad frame: field 'verify' is not bool")
        cps = [0, 0]
        for i, key in enumerate(("checkpoint", "checkpoint_time_ns")):  # optional: older targets omit them
            if key in d:
                cps[i] = _field(d, key, int)
        sync_cps = d.get("sync_checkpoints", False)  # optional: targets without sync history omit it
        if not isinstance(sync_cps, bool):
            raise RemoteProtocolError("bad frame: field 'sync_checkpoints' is not bool")
        return Welcome(_field(d, "replica_id", str), _field(d, "replica_name", str), _field(d, "created", bool),
                       _field(d, "generation", int), verify, cps[0], cps[1], _strings(d, "caps"), sync_cps)
    if ftype == T_ERROR:
        # Printable only: the peer's message ends up in our log and on the user's terminal.
        message = "".join(c if c.isprintable() else " " for c in _field(d, "message", str, maxlen=MAX_JSON)[:2000])
        return ErrorMsg(message, _field(d, "code", str)[:64])
    if ftype == T_DEMOTE:
        return Demote("".join(c if c.isprintable() else " " for c in _field(d, "reason", str)[:500]))
    if ftype == T_DEMOTED:
        return Demoted(_field(d, "checkpoint", int))
    # T_HASHQ
    indices = d.get("indices")
    if (not isinstance(indices, list) or len(indices) > MAX_QUERY_INDICES
            or not all(type(i) is int and 0 <= i <= MAX_INT for i in indices)):
        raise RemoteProtocolError(f"bad frame: field 'indices' is not a list of at most {MAX_QUERY_INDICES} "
                                  "non-negative integers")
    return HashQuery(_field(d, "req", int), _field(d, "leaf_size", int), _field(d, "level", int, 0, 64),
                     tuple(indices))


_JSON_TYPES = frozenset({T_HELLO, T_CHALLENGE, T_AUTH, T_WELCOME, T_ERROR, T_HASHQ, T_DEMOTE, T_DEMOTED})
# the flag bits each frame type may carry
_FLAGS = {T_WRITE: F_FUA, T_ZERO: F_FUA | F_TRIM, T_PACK: F_RESET, T_RWRITE: F_FUA}
_KNOWN_TYPES = _JSON_TYPES | {T_BYE, T_WRITE, T_ZERO, T_FLUSH, T_CHECKPOINT, T_ACK, T_PING, T_HASHR, T_PACK,
                              T_DEDUPQ, T_DEDUPR}
# Inside a Pack: data frames only (a Pack in a Pack would be a second decompression of peer data).
INNER_TYPES = frozenset({T_WRITE, T_ZERO, T_CHECKPOINT, T_RWRITE})


class FrameReader:
    """Receive buffer and parser: feed bytes (or recv_into ``buffer()``), take every complete frame.

    Payload views handed out by ``frames()`` stay valid until the next ``buffer()`` or ``feed()``.
    """

    def __init__(self, capacity: int = 4 << 20, max_payload: int = MAX_PAYLOAD,
                 types: frozenset[int] = _KNOWN_TYPES) -> None:
        self._types = types
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._need = HEADER_SIZE  # bytes the next frame needs in total, once its header is known
        self.max_payload = max_payload  # a frame announcing more is refused before it is buffered

    @property
    def buffered(self) -> int:
        return self._end - self._start

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def reserve(self, capacity: int) -> None:
        """Grow the buffer to ``capacity`` (e.g. once the peer has authenticated), keeping pending bytes.
        Views handed out earlier stay valid: they keep the old buffer alive."""
        if capacity > len(self._buf):
            pending = self._end - self._start
            fresh = bytearray(capacity)
            fresh[:pending] = self._view[self._start:self._end]
            self._buf, self._view = fresh, memoryview(fresh)
            self._start, self._end = 0, pending

    def buffer(self, min_free: int | None = None) -> memoryview:
        """Free space to ``recv_into``; then call ``commit(n)``. The buffer grows only as far as the
        next frame needs (at most one frame of ``max_payload``) or ``min_free`` asks."""
        need = max(min(256 << 10, len(self._buf) // 2) if min_free is None else min_free, self._need)
        if len(self._buf) - self._end < need:
            pending = self._end - self._start
            if pending + need > len(self._buf):
                fresh = bytearray(max(len(self._buf) * 2, pending + need))
                fresh[:pending] = self._view[self._start:self._end]
                self._buf, self._view = fresh, memoryview(fresh)
            elif self._start >= pending:  # source and destination do not overlap
                self._buf[:pending] = self._view[self._start:self._end]
            else:
                self._buf[:pending] = bytes(self._view[self._start:self._end])
            self._start, self._end = 0, pending
        return self._view[self._end:]

    def rest(self) -> tuple[bytes, int]:
        """The bytes not parsed yet (a frame's beginning) and how many the frame needs in all."""
        return bytes(self._view[self._start:self._end]), self._need

    def commit(self, n: int) -> None:
        self._end += n

    def feed(self, data: bytes | memoryview) -> None:
        view = self.buffer(len(data))
        view[:len(data)] = data
        self.commit(len(data))

    def frames(self) -> list[Event]:
        """Every complete frame in the buffer, decoded. A bad frame raises RemoteProtocolError, once the
        good frames before it have been returned."""
        out: list[Event] = []
        view, start, end = self._view, self._start, self._end
        try:
            while end - start >= HEADER_SIZE:
                length, ftype, flags, reserved, a, b, check = HEADER.unpack_from(view, start)
                if ftype not in self._types or reserved:
                    raise RemoteProtocolError(f"bad frame: unknown type {ftype} (is the peer a vdisk mirror?)")
                if length > self.max_payload:
                    raise RemoteProtocolError(f"bad frame: payload of {length} bytes is too large "
                                              f"(at most {self.max_payload} here)")
                total = HEADER_SIZE + length
                if end - start < total:
                    self._need = total
                    break
                payload = view[start + HEADER_SIZE:start + total]
                if _xxh(payload, _xxh(view[start:start + 24])) != check:
                    raise RemoteProtocolError("bad frame: checksum mismatch (corrupt link or not a vdisk mirror)")
                if ftype == T_WRITE and not flags & ~F_FUA:  # the data path: no call per frame
                    out.append(Write(a, b, payload, flags & F_FUA != 0))
                else:
                    out.append(self._decode(ftype, flags, a, b, payload))
                start += total
            else:
                self._need = HEADER_SIZE
        except RemoteProtocolError:
            if not out:
                raise
            # Hand out the good frames before the bad one; the next call raises on it.
        finally:
            self._start = start
        if start == end:
            self._start = self._end = 0
        return out

    @staticmethod
    def _decode(ftype: int, flags: int, a: int, b: int, payload: memoryview) -> Event:
        if flags & ~_FLAGS.get(ftype, 0):
            raise RemoteProtocolError(f"bad frame: unknown flags {flags:#x} on a frame of type {ftype}")
        if ftype == T_WRITE:
            return Write(a, b, payload, bool(flags & F_FUA))
        if ftype == T_ACK:
            return Ack(a)
        if ftype == T_ZERO:
            if len(payload) != _ZERO_LEN.size:
                raise RemoteProtocolError("bad frame: zero frame of the wrong size")
            return Zero(a, b, _ZERO_LEN.unpack(payload)[0], bool(flags & F_FUA), bool(flags & F_TRIM))
        if ftype == T_FLUSH:
            return Flush(a)
        if ftype == T_CHECKPOINT:
            if len(payload) != _ZERO_LEN.size:
                raise RemoteProtocolError("bad frame: checkpoint frame of the wrong size")
            # The id comes back in a Welcome (a JSON int <= MAX_INT) and 0 there means "none".
            if not 1 <= b <= MAX_INT:
                raise RemoteProtocolError(f"bad frame: checkpoint id {b} out of range (1..{MAX_INT})")
            t = _ZERO_LEN.unpack(payload)[0]
            if t > MAX_INT:
                raise RemoteProtocolError(f"bad frame: checkpoint time {t} out of range (0..{MAX_INT})")
            return Checkpoint(a, b, t)
        if ftype == T_PING:
            return Ping(a)
        if ftype == T_HASHR:
            if len(payload) % 16:
                raise RemoteProtocolError("bad frame: digest list is not a multiple of 16 bytes")
            return HashReply(a, bytes(payload))
        if ftype == T_BYE:
            return Bye()
        if ftype == T_PACK:
            if not 0 < a <= MAX_PAYLOAD:
                raise RemoteProtocolError(f"bad frame: pack of {a} inner bytes (1..{MAX_PAYLOAD})")
            return Pack(a, payload, bool(flags & F_RESET))
        if ftype == T_RWRITE:
            return RWrite(a, b, payload, bool(flags & F_FUA))
        if ftype == T_DEDUPQ:
            if len(payload) % DEDUP_PREFIX or len(payload) > MAX_DEDUP_QUERY * DEDUP_PREFIX:
                raise RemoteProtocolError(f"bad frame: dedup query is not a list of at most {MAX_DEDUP_QUERY} "
                                          f"{DEDUP_PREFIX}-byte prefixes")
            return DedupQuery(a, bytes(payload))
        if ftype == T_DEDUPR:
            if len(payload) % DEDUP_ENTRY:
                raise RemoteProtocolError(f"bad frame: dedup reply is not a list of {DEDUP_ENTRY}-byte entries")
            return DedupReply(a, bytes(payload))
        if len(payload) > MAX_JSON:
            raise RemoteProtocolError("bad frame: control payload too large")
        return _decode_json(ftype, payload)
