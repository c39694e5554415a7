"""Sans-IO server side of the NBD fixed-newstyle handshake: bytes in, bytes out, one result.

    hs = ServerHandshake(lookup, list_names)
    send(hs.data_to_send())            # the greeting
    while (result := hs.receive_data(await recv())) is None:
        send(hs.data_to_send())
    send(hs.data_to_send())            # the final option replies
    -> Negotiated(export, ...) to enter transmission, or Closed(reason)

No sockets, no clocks: tested by feeding conversations split at every byte boundary.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import proto as P

_OPT_HDR = struct.Struct(">QII")
_REP_HDR = struct.Struct(">QIII")


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake tells a client about an export."""

    name: str
    size: int
    writable: bool
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_multi_conn: bool = True
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = P.MAX_PAYLOAD
    description: str = ""

    def transmission_flags(self, structured: bool) -> int:
        f = P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_CACHE
        if not self.writable:
            f |= P.TFLAG_READ_ONLY
        else:
            if self.can_trim:
                f |= P.TFLAG_SEND_TRIM
            if self.can_zero:
                f |= P.TFLAG_SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    f |= P.TFLAG_SEND_FAST_ZERO
        if self.can_flush:
            f |= P.TFLAG_SEND_FLUSH
        if self.can_fua:
            f |= P.TFLAG_SEND_FUA
        if self.can_multi_conn:
            f |= P.TFLAG_CAN_MULTI_CONN
        if structured:
            f |= P.TFLAG_SEND_DF
        return f


@dataclass(frozen=True)
class Negotiated:
    """The client chose an export; what follows ``leftover`` is the transmission phase."""

    export: ExportInfo
    structured: bool
    base_allocation: bool
    leftover: bytes


@dataclass(frozen=True)
class Closed:
    """The handshake ended without an export (abort, bad client, unknown export via EXPORT_NAME)."""

    reason: str


class HandshakeError(Exception):
    """The client broke the protocol in a way that ends the connection."""


Lookup = Callable[[str], "ExportInfo | None"]


class ServerHandshake:
    """The option-haggling state machine of one connection."""

    def __init__(self, lookup: Lookup, list_names: Callable[[], list[str]], refuse: str | None = None,
                 tls: bool = False) -> None:
        """``refuse``: the server will not serve this client (e.g. too many connections): every option
        is answered NBD_REP_ERR_POLICY with this message, as the spec asks of an unwilling server.
        ``tls``: TLS is required (NBD_OPT_STARTTLS first; any other option before it gets
        NBD_REP_ERR_TLS_REQD). After STARTTLS is acknowledged the handshake pauses: the I/O loop
        runs the TLS handshake over ``take_leftover()`` + the socket, then calls ``tls_started``."""
        self._refuse = refuse
        self._tls_required = tls
        self.tls_active = False
        self.tls_requested = False  # STARTTLS acknowledged, TLS handshake not done yet
        self._lookup = lookup
        self._list_names = list_names
        self._in = bytearray()
        self._out = bytearray(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        self._state = "flags"  # flags -> options -> done
        self._skip = 0  # bytes of an oversized option still to discard
        self._skip_opt = 0
        self.no_zeroes = False
        self.structured = False
        self._meta_export: str | None = None  # export the base:allocation context was set for
        self.result: Negotiated | Closed | None = None

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def take_leftover(self) -> bytes:
        """After STARTTLS: the bytes the client sent behind it (the start of its TLS handshake)."""
        out, self._in = bytes(self._in), bytearray()
        return out

    def tls_started(self) -> None:
        """The TLS handshake is done: options continue, now over TLS."""
        self.tls_requested, self.tls_active = False, True

    def receive_data(self, data: bytes) -> Negotiated | Closed | None:
        """Feed bytes from the client; returns the result once the handshake is over."""
        if self.result is not None:
            raise HandshakeError("handshake already finished")
        if self.tls_requested:
            raise HandshakeError("bytes fed between STARTTLS and the TLS handshake")
        self._in += data
        try:
            while self.result is None and self._step():
                pass
        except HandshakeError as e:
            self.result = Closed(str(e))
        except UnicodeDecodeError:
            self.result = Closed("export name is not valid UTF-8")
        return self.result

    # -- internals ----------------------------------------------------------------------------
    def _step(self) -> bool:
        if self.tls_requested:  # what follows is TLS: the I/O loop takes it
            return False
        if self._state == "flags":
            if len(self._in) < 4:
                return False
            (flags,) = struct.unpack_from(">I", self._in)
            del self._in[:4]
            if flags & ~P.CLIENT_FLAGS_KNOWN:
                raise HandshakeError(f"unknown client flags {flags:#x}")
            if not flags & P.FLAG_FIXED_NEWSTYLE:
                raise HandshakeError("client does not support fixed newstyle negotiation")
            self.no_zeroes = bool(flags & P.FLAG_NO_ZEROES)
            self._state = "options"
            return True
        if self._skip:
            n = min(self._skip, len(self._in))
            del self._in[:n]
            self._skip -= n
            if self._skip:
                return False
            self._reply(self._skip_opt, P.REP_ERR_TOO_BIG, b"option too large")
            return True
        if len(self._in) < _OPT_HDR.size:
            return False
        magic, opt, length = _OPT_HDR.unpack_from(self._in)
        if magic != P.IHAVEOPT:
            raise HandshakeError(f"bad option magic {magic:#x}")
        if length > P.MAX_OPTION:
            del self._in[:_OPT_HDR.size]
            self._skip, self._skip_opt = length, opt
            return True
        if len(self._in) < _OPT_HDR.size + length:
            return False
        payload = bytes(self._in[_OPT_HDR.size:_OPT_HDR.size + length])
        del self._in[:_OPT_HDR.size + length]
        self._option(opt, payload)
        return True

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out += _REP_HDR.pack(P.OPT_REPLY_MAGIC, opt, rep, len(data)) + data

    def _error(self, opt: int, rep: int, msg: str) -> None:
        self._reply(opt, rep, msg.encode()[:4096])

    def _option(self, opt: int, data: bytes) -> None:
        if self._refuse is not None and opt != P.OPT_ABORT:
            if opt == P.OPT_EXPORT_NAME:  # this option cannot be answered with an error
                raise HandshakeError(f"refused ({self._refuse})")
            return self._error(opt, P.REP_ERR_POLICY, self._refuse)
        if opt == P.OPT_STARTTLS:
            if not self._tls_required:
                return self._error(opt, P.REP_ERR_POLICY, "TLS is not enabled on this server (vdisk serve --tls)")
            if self.tls_active:
                return self._error(opt, P.REP_ERR_INVALID, "TLS is already active")
            if data:
                return self._error(opt, P.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            self._reply(opt, P.REP_ACK)
            self.tls_requested = True
            return None
        if self._tls_required and not self.tls_active and opt != P.OPT_ABORT:
            if opt == P.OPT_EXPORT_NAME:  # cannot be answered with an error: hang up (as the spec says)
                raise HandshakeError("NBD_OPT_EXPORT_NAME before STARTTLS: this server requires TLS")
            return self._error(opt, P.REP_ERR_TLS_REQD, "this server requires TLS: use NBD_OPT_STARTTLS first")
        if opt == P.OPT_EXPORT_NAME:
            info = self._find(_decode(data))
            if info is None:
                raise HandshakeError(f"unknown export {_decode(data)!r} requested with NBD_OPT_EXPORT_NAME")
            self._out += struct.pack(">QH", info.size, info.transmission_flags(False))
            if not self.no_zeroes:
                self._out += bytes(124)
            self._finish(info, structured=False)
        elif opt == P.OPT_ABORT:
            self._reply(opt, P.REP_ACK)
            self.result = Closed("client aborted the handshake")
        elif opt == P.OPT_LIST:
            if data:
                return self._error(opt, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            for name in self._list_names():
                raw = name.encode()
                self._reply(opt, P.REP_SERVER, struct.pack(">I", len(raw)) + raw)
            self._reply(opt, P.REP_ACK)
        elif opt in (P.OPT_INFO, P.OPT_GO):
            self._info_or_go(opt, data)
        elif opt == P.OPT_STRUCTURED_REPLY:
            if data:
                return self._error(opt, P.REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            if self.structured:
                return self._error(opt, P.REP_ERR_INVALID, "structured replies already negotiated")
            self.structured = True
            self._reply(opt, P.REP_ACK)
        elif opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            self._meta_context(opt, data)
        else:
            self._error(opt, P.REP_ERR_UNSUP, f"option {opt} is not supported")

    def _find(self, name: str) -> ExportInfo | None:
        if name == "":  # the default export: the only one, if there is exactly one
            names = self._list_names()
            if len(names) != 1:
                return None
            name = names[0]
        return self._lookup(name)

    def _info_or_go(self, opt: int, data: bytes) -> None:
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = _decode(data[4:4 + nlen])
            if len(data) < 4 + nlen + 2:
                raise ValueError
            (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
            if len(data) != 4 + nlen + 2 + 2 * nreq:
                raise ValueError
            reqs = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        except (struct.error, ValueError, UnicodeDecodeError):
            return self._error(opt, P.REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request")
        info = self._find(name)
        if info is None:
            return self._error(opt, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
        flags = info.transmission_flags(self.structured)
        self._reply(opt, P.REP_INFO, struct.pack(">HQH", P.INFO_EXPORT, info.size, flags))
        if P.INFO_NAME in reqs:
            self._reply(opt, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + info.name.encode())
        if P.INFO_DESCRIPTION in reqs and info.description:
            self._reply(opt, P.REP_INFO, struct.pack(">H", P.INFO_DESCRIPTION) + info.description.encode()[:4096])
        self._reply(opt, P.REP_INFO, struct.pack(">HIII", P.INFO_BLOCK_SIZE, info.min_block, info.pref_block,
                                                 info.max_block))
        self._reply(opt, P.REP_ACK)
        if opt == P.OPT_GO:
            self._finish(info, structured=self.structured)

    def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            return self._error(opt, P.REP_ERR_INVALID, "negotiate structured replies first")
        try:
            (nlen,) = struct.unpack_from(">I", data)
            name = _decode(data[4:4 + nlen])
            if len(data) < 4 + nlen + 4:
                raise ValueError
            (nq,) = struct.unpack_from(">I", data, 4 + nlen)
            pos, queries = 4 + nlen + 4, []
            for _ in range(nq):
                (ql,) = struct.unpack_from(">I", data, pos)
                if pos + 4 + ql > len(data):
                    raise ValueError
                queries.append(_decode(data[pos + 4:pos + 4 + ql]))
                pos += 4 + ql
            if pos != len(data):
                raise ValueError
        except (struct.error, ValueError, UnicodeDecodeError):
            return self._error(opt, P.REP_ERR_INVALID, "malformed meta context request")
        if self._find(name) is None:
            return self._error(opt, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
        if opt == P.OPT_LIST_META_CONTEXT:
            match = not queries or any(q in ("base:", P.META_BASE_ALLOCATION) for q in queries)
        else:
            match = P.META_BASE_ALLOCATION in queries
            self._meta_export = name if match else None
        if match:
            raw = P.META_BASE_ALLOCATION.encode()
            self._reply(opt, P.REP_META_CONTEXT, struct.pack(">I", P.META_CONTEXT_ID) + raw)
        self._reply(opt, P.REP_ACK)

    def _finish(self, info: ExportInfo, structured: bool) -> None:
        base = structured and self._meta_export is not None and self._find(self._meta_export) == info
        self.result = Negotiated(info, structured, base, bytes(self._in))
        self._in.clear()
        self._state = "done"


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8")
