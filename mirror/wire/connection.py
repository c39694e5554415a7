"""The replication protocol as a sans-IO state machine: bytes in, events out; events in, bytes out.

Handshake (source = client, target = server), all frames checksummed:

    source  Hello(version, volume uuid, size, generation, nonce_s)      ->
            <-  Challenge(version, nonce_t, proof_t)                     target (proof: HMAC of the key)
    source  Auth(proof_s)                                               ->
            <-  Welcome(replica id, created, checkpoint) | ErrorMsg      target
    then    Write/Zero/Flush/Checkpoint (seq 1, 2, 3...), Ping, HashQuery ->
            <-  Ack(cumulative seq), HashReply
    planned failover (async):  <- Demote    source fences host writes, ships, then  Demoted(checkpoint) ->

Hello.mode is "sync" or "async". An async source sends Checkpoint frames (a data frame: it takes
the next seq, and the Ack covering it means the target committed that checkpoint atomically); their
ids rise strictly within a session. A sync session writes the replica in place, so a Checkpoint
there is a protocol error unless the Welcome said ``sync_checkpoints`` (the target keeps history:
it saves undo for sync writes too, and a sync source cuts a checkpoint at a host flush when the
replica is consistent).

Both sides prove they know the pre-shared key (mutual HMAC-SHA256 challenge-response over both
nonces and the volume uuid). If only one side has a key the link is refused: a key that is silently
ignored would be worse than none. On a TLS link (blockdev/tls.py, mirror/wire/secure.py) both MACs
also cover the channel binding, the SHA-256 of the target's certificate as the source saw it
(tls-server-end-point, RFC 5929: Python's ssl has no RFC 9266 exporter): a relay that terminates TLS
with its own certificate cannot forward a valid proof, so a PSK alone authenticates both sides.
There the source also signs the binding and both nonces with its site key and sends its certificate
in Auth; the target's ``check_source`` decides whether it trusts that certificate. Any protocol violation found here raises and queues an ErrorMsg
for the peer, so both ends log the same reason.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import os
from collections.abc import Callable

from .codec import MAX_PAYLOAD, PRE_AUTH_PAYLOAD, FrameReader, encode
from .errors import AuthError, LocalProtocolError, PeerError, RemoteProtocolError, WireError
from .events import (
    MODES,
    PROTOCOL_VERSION,
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

NONCE_SIZE = 32


class Role(enum.Enum):
    SOURCE = "source"
    TARGET = "target"


class State(enum.Enum):
    START = "start"          # source: before start(); target: waiting for Hello
    HELLO_SENT = "hello-sent"
    CHALLENGED = "challenged"  # target: sent its Challenge, waiting for Auth
    AUTH_SENT = "auth-sent"
    ACCEPTING = "accepting"  # target: authenticated; the application opens the replica, then accept()
    READY = "ready"
    CLOSED = "closed"


# (role, state, event type) -> next state. One lookup decides whether an event is legal.
_TRANSITIONS: dict[tuple[Role, State, type], State] = {
    (Role.SOURCE, State.HELLO_SENT, Challenge): State.AUTH_SENT,
    (Role.SOURCE, State.AUTH_SENT, Welcome): State.READY,
    (Role.SOURCE, State.READY, Ack): State.READY,
    (Role.SOURCE, State.READY, HashReply): State.READY,
    (Role.SOURCE, State.READY, DedupReply): State.READY,
    (Role.SOURCE, State.READY, Demote): State.READY,
    (Role.TARGET, State.START, Hello): State.CHALLENGED,
    (Role.TARGET, State.CHALLENGED, Auth): State.ACCEPTING,
    (Role.TARGET, State.READY, Write): State.READY,
    (Role.TARGET, State.READY, Zero): State.READY,
    (Role.TARGET, State.READY, Flush): State.READY,
    (Role.TARGET, State.READY, Checkpoint): State.READY,
    (Role.TARGET, State.READY, Ping): State.READY,
    (Role.TARGET, State.READY, HashQuery): State.READY,
    (Role.TARGET, State.READY, Pack): State.READY,  # its inner frames go through check_inner
    (Role.TARGET, State.READY, DedupQuery): State.READY,
    (Role.TARGET, State.READY, Demoted): State.READY,
}


# Frames a target in READY takes (the data path's fast check; the table above is the reference).
_TARGET_READY = frozenset(t for (role, state, t) in _TRANSITIONS if role is Role.TARGET and state is State.READY)


def _mac(key: bytes, label: bytes, first: bytes, second: bytes, volume_uuid: str, binding: bytes = b"") -> bytes:
    return hmac.new(key, label + first + second + volume_uuid.encode() + binding, hashlib.sha256).digest()


# A source's signature covers this, the binding, the target's nonce, its own, and the volume uuid.
SIGN_LABEL = b"vdisk-mirror source key"
Signer = Callable[[bytes], tuple[bytes, bytes]]  # message -> (certificate DER, signature)
SourceCheck = Callable[[bytes, bytes, bytes], None]  # (certificate, signature, message); raises AuthError


class Connection:
    """One end of a replication link. Feed received bytes, take events, send what ``data_to_send`` gives."""

    def __init__(self, role: Role, psk: bytes | None = None, *, randbytes: Callable[[int], bytes] = os.urandom,
                 reader: FrameReader | None = None, binding: bytes = b"", signer: Signer | None = None,
                 check_source: SourceCheck | None = None) -> None:
        self.role = role
        self.binding = binding  # set by the TLS layer before the handshake frames (b"" on a plain link)
        self.signer = signer  # source on a TLS link
        self.check_source = check_source  # target on a TLS link
        self.state = State.START
        self._psk = psk or None
        self._rand = randbytes
        self.reader = reader or FrameReader()
        if role is Role.TARGET:  # an unauthenticated peer gets small frames only (accept() lifts it)
            self.reader.max_payload = min(self.reader.max_payload, PRE_AUTH_PAYLOAD)
        self._out: list[bytes] = []
        self.hello: Hello | None = None
        self._nonce = b""
        self._peer_nonce = b""
        self._next_seq = 1  # target: the seq the next data frame must carry
        self._last_cp = 0  # target: the id of the last Checkpoint frame of this session
        self._sync_cps = False  # target: the Welcome let a sync source send Checkpoint frames

    # -- output ---------------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out, self._out = b"".join(self._out), []
        return out

    def send(self, event: Event) -> None:
        """Queue a control event (data frames go through codec.encode_* straight to the socket)."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        self._out.append(encode(event))

    def start(self, hello: Hello) -> None:
        """Source: open the handshake."""
        if self.role is not Role.SOURCE or self.state is not State.START:
            raise LocalProtocolError(f"start() in state {self.state.value}")
        self._nonce = self._rand(NONCE_SIZE)
        self.hello = dataclasses.replace(hello, nonce=self._nonce)
        self._out.append(encode(self.hello))
        self.state = State.HELLO_SENT

    def accept(self, welcome: Welcome) -> None:
        """Target: the replica is ready; data frames may flow."""
        if self.role is not Role.TARGET or self.state is not State.ACCEPTING:
            raise LocalProtocolError(f"accept() in state {self.state.value}")
        self._out.append(encode(welcome))
        self._sync_cps = welcome.sync_checkpoints
        self.state = State.READY
        self.reader.max_payload = MAX_PAYLOAD

    def fail(self, message: str, code: str = "error") -> None:
        """Queue an ErrorMsg for the peer and close (the caller sends data_to_send(), then hangs up)."""
        if self.state is not State.CLOSED:
            self._out.append(encode(ErrorMsg(message, code)))
            self.state = State.CLOSED

    # -- input ----------------------------------------------------------------------------------
    def receive_data(self, data: bytes | memoryview) -> None:
        self.reader.feed(data)

    def next_events(self) -> list[Event]:
        """Every event in the received bytes; raises WireError (and queues an ErrorMsg) on a violation."""
        try:
            events = self.reader.frames()
            if self.state is State.READY and self.role is Role.TARGET:
                return self._check_data(events)
            return [e for e in (self._handle(ev) for ev in events) if e is not None]
        except PeerError:
            self.state = State.CLOSED
            raise
        except WireError as e:
            self.fail(str(e), "auth" if isinstance(e, AuthError) else "protocol")
            raise

    def check_inner(self, events: list[Event]) -> list[Event]:
        """Target: the frames a Pack held, checked like frames off the wire (sequence, checkpoints);
        raises WireError (and queues an ErrorMsg) on a violation."""
        try:  # (only data frame types can be inside: the Unpacker's reader parses INNER_TYPES only)
            return self._check_data(events)
        except WireError as e:
            self.fail(str(e), "protocol")
            raise

    def _check_data(self, events: list[Event]) -> list[Event]:
        # The hot path of the target: one set lookup and one seq check per frame (a lookup keyed
        # on the enums would hash them in Python, ≈ 1 µs per frame).
        seq = self._next_seq
        try:
            for ev in events:
                t = type(ev)
                if t is Write or t is Zero or t is Flush or t is Checkpoint or t is RWrite:
                    if ev.seq != seq:  # type: ignore[union-attr]
                        raise RemoteProtocolError(f"bad frame: seq {ev.seq} where {seq} was expected")  # type: ignore[union-attr]
                    seq += 1
                    if t is Checkpoint:
                        self._check_checkpoint(ev)  # type: ignore[arg-type]
                elif t not in _TARGET_READY:
                    self._handle(ev)  # raises (ErrorMsg, Bye or an illegal frame)
        finally:
            self._next_seq = seq
        return events

    def _check_checkpoint(self, cp: Checkpoint) -> None:
        assert self.hello is not None
        if self.hello.mode != "async" and not self._sync_cps:
            raise RemoteProtocolError(f"bad frame: checkpoint {cp.cp_id} in a {self.hello.mode} session")
        if cp.cp_id <= self._last_cp:
            raise RemoteProtocolError(f"bad frame: checkpoint {cp.cp_id} after checkpoint {self._last_cp}")
        self._last_cp = cp.cp_id

    def _handle(self, ev: Event) -> Event | None:
        if isinstance(ev, ErrorMsg):
            raise PeerError(f"peer: {ev.message}", ev.code)
        if isinstance(ev, Bye):
            self.state = State.CLOSED
            return ev
        nxt = _TRANSITIONS.get((self.role, self.state, type(ev)))
        if nxt is None:
            raise RemoteProtocolError(f"unexpected {type(ev).__name__} frame in state {self.state.value}")
        out: Event | None = ev
        if isinstance(ev, Hello):
            out = self._on_hello(ev)
        elif isinstance(ev, Challenge):
            out = self._on_challenge(ev)
        elif isinstance(ev, Auth):
            self._on_auth(ev)
            out = self.hello
        self.state = nxt
        return out

    def _on_hello(self, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"version mismatch: source speaks protocol {hello.version}, target speaks {PROTOCOL_VERSION}")
        if len(hello.nonce) != NONCE_SIZE:
            raise RemoteProtocolError("bad hello: nonce of the wrong size")
        if hello.mode not in MODES:
            raise RemoteProtocolError(f"bad hello: unknown mirror mode {hello.mode!r} (sync or async)")
        self.hello, self._peer_nonce = hello, hello.nonce
        self._nonce = self._rand(NONCE_SIZE)
        proof = _mac(self._psk, b"vdisk-mirror target", hello.nonce, self._nonce, hello.volume_uuid,
                     self.binding) if self._psk else b""
        self._out.append(encode(Challenge(PROTOCOL_VERSION, self._nonce, proof, self._psk is not None)))
        # the application sees the Hello once the source has authenticated

    def _on_challenge(self, ch: Challenge) -> None:
        assert self.hello is not None
        if ch.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"version mismatch: target speaks protocol {ch.version}, source speaks {PROTOCOL_VERSION}")
        if len(ch.nonce) != NONCE_SIZE:
            raise RemoteProtocolError("bad challenge: nonce of the wrong size")
        if ch.auth and not self._psk:
            raise AuthError("authentication failed: the target requires a pre-shared key (--psk-file)")
        if not ch.auth and self._psk:
            raise AuthError("authentication failed: a pre-shared key is configured but the target has none")
        proof = b""
        if self._psk:
            want = _mac(self._psk, b"vdisk-mirror target", self._nonce, ch.nonce, self.hello.volume_uuid,
                        self.binding)
            if not hmac.compare_digest(want, ch.proof):
                raise AuthError("authentication failed: wrong pre-shared key (the target's proof does not match"
                                + (", or a relay holds another certificate)" if self.binding else ")"))
            proof = _mac(self._psk, b"vdisk-mirror source", ch.nonce, self._nonce, self.hello.volume_uuid,
                         self.binding)
        cert = sig = b""
        if self.signer is not None:
            cert, sig = self.signer(SIGN_LABEL + self.binding + ch.nonce + self._nonce + self.hello.volume_uuid.encode())
        self._out.append(encode(Auth(proof, cert, sig)))

    def _on_auth(self, auth: Auth) -> None:
        assert self.hello is not None
        if self._psk:
            want = _mac(self._psk, b"vdisk-mirror source", self._nonce, self._peer_nonce, self.hello.volume_uuid,
                        self.binding)
            if not hmac.compare_digest(want, auth.proof):
                raise AuthError("authentication failed: wrong pre-shared key (the source's proof does not match)")
        elif auth.proof:
            raise AuthError("authentication failed: the source uses a pre-shared key but this target has none")
        if self.check_source is not None:
            self.check_source(auth.cert, auth.sig,
                              SIGN_LABEL + self.binding + self._nonce + self._peer_nonce + self.hello.volume_uuid.encode())
