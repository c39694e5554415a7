"""Sans-IO transmission phase: parse every complete request in a buffer, encode replies.

The parser takes a memoryview of the receive buffer and returns requests whose WRITE payloads are
zero-copy slices of it, so the server can hand them to the op table (or a worker thread) without
copying. Requests are plain tuples: this is the hot path.
"""
from __future__ import annotations

import struct

from . import proto as P

REQ = struct.Struct(">IHHQQI")
REQ_SIZE = REQ.size  # 28
SIMPLE = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
CHUNK_OFFSET = struct.Struct(">IHHQIQ")

# (cmd, flags, handle, offset, length, payload | None, parse_error)
Request = tuple[int, int, int, int, int, "memoryview | None", int]


class ProtocolError(Exception):
    """The client broke framing (bad magic): the connection cannot continue."""


class RequestParser:
    """Splits a byte stream into requests; remembers payload bytes still to discard."""

    __slots__ = ("discard", "max_payload")

    def __init__(self, max_payload: int = P.MAX_PAYLOAD) -> None:
        self.discard = 0
        self.max_payload = max_payload

    def parse(self, view: memoryview, limit: int = 1 << 30) -> tuple[list[Request], int, int]:
        """Parse ``view``, at most ``limit`` requests; returns (requests, bytes consumed, bytes the
        next request needs in all). The limit bounds one batch: 16 MiB of 28-byte requests would
        otherwise be 600,000 tuples at once."""
        out: list[Request] = []
        pos, end = 0, len(view)
        unpack = REQ.unpack_from
        left = limit
        while left:
            left -= 1
            if self.discard:
                n = min(self.discard, end - pos)
                pos += n
                self.discard -= n
                if self.discard:
                    return out, pos, REQ_SIZE
            if end - pos < REQ_SIZE:
                return out, pos, REQ_SIZE
            magic, flags, cmd, handle, offset, length = unpack(view, pos)
            if magic != P.REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if cmd == P.CMD_WRITE:
                if length > self.max_payload:
                    # Too big to buffer: read past the payload and fail just this request.
                    pos += REQ_SIZE
                    self.discard = length
                    out.append((cmd, flags, handle, offset, length, None, P.EINVAL))
                    continue
                if end - pos < REQ_SIZE + length:
                    return out, pos, REQ_SIZE + length
                out.append((cmd, flags, handle, offset, length, view[pos + REQ_SIZE:pos + REQ_SIZE + length], 0))
                pos += REQ_SIZE + length
            else:
                out.append((cmd, flags, handle, offset, length, None, 0))
                pos += REQ_SIZE
        return out, pos, REQ_SIZE


_KNOWN_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_DF | P.CMD_FLAG_FUA,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_DISC: 0,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_CACHE: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_REQ_ONE | P.CMD_FLAG_FUA,
}
_WRITE_LIKE = frozenset({P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES})


def validate(cmd: int, flags: int, offset: int, length: int, size: int, writable: bool,
             base_allocation: bool) -> int:
    """The edge check, done once: 0 if the request may reach the op table, else an NBD error."""
    known = _KNOWN_FLAGS.get(cmd)
    if known is None or flags & ~known:
        return P.EINVAL
    if cmd == P.CMD_FLUSH:
        return 0  # offset and length are reserved for flush; clients send zeroes
    if cmd in _WRITE_LIKE and not writable:
        return P.EPERM
    if cmd == P.CMD_BLOCK_STATUS and not base_allocation:
        return P.EINVAL
    if offset + length > size:
        # The spec's SHOULDs: ENOSPC for a write past the end of the device, EINVAL for the rest.
        return P.ENOSPC if cmd == P.CMD_WRITE or cmd == P.CMD_WRITE_ZEROES else P.EINVAL
    if length == 0 and cmd == P.CMD_BLOCK_STATUS:
        return P.EINVAL
    if cmd == P.CMD_READ and length > P.MAX_PAYLOAD:
        # Over the advertised maximum: EINVAL. EOVERFLOW is only for a DF read too big to send
        # unfragmented, which never happens here (every read is one chunk).
        return P.EINVAL
    return 0


def simple_reply(handle: int, error: int = 0) -> bytes:
    return SIMPLE.pack(P.SIMPLE_REPLY_MAGIC, error, handle)


def read_reply_header(handle: int, offset: int, length: int, structured: bool) -> bytes:
    """Header preceding ``length`` bytes of read data."""
    if not structured:
        return SIMPLE.pack(P.SIMPLE_REPLY_MAGIC, 0, handle)
    if length == 0:
        return CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, handle, 0)
    return CHUNK_OFFSET.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, handle,
                             8 + length, offset)


def error_reply(handle: int, error: int, structured: bool, message: str = "") -> bytes:
    """An error reply; structured (with a message) when negotiated, which reads require."""
    if not structured:
        return SIMPLE.pack(P.SIMPLE_REPLY_MAGIC, error, handle)
    msg = message.encode()[:4096]
    return (CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, handle, 6 + len(msg))
            + struct.pack(">IH", error, len(msg)) + msg)


def block_status_reply(handle: int, extents: list[tuple[int, int]]) -> bytes:
    body = struct.pack(">I", P.META_CONTEXT_ID) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, handle,
                      len(body)) + body
