"""TLS on a replication link: which side encrypts, who is trusted, and the refusals in one line.

A source with a ``SourceTls`` runs the TLS handshake right after connecting, checks the target's
certificate (expiry, then the pin: ``--target-fingerprint``, else a ``target=HOST:PORT`` line of its
trusted file, else any line without that label, else trust on first use, else the PSK, which is
bound to this certificate), then speaks the usual handshake frames inside TLS, signing the channel
binding with its own key (connection.py). A target with a ``TargetTls`` peeks at the first byte of a
new connection: a TLS record (0x16) is answered with TLS, anything else with a plain ErrorMsg saying
TLS is required; a plain target answers a ClientHello the same way. A source that finds a plain frame
where the ServerHello should be reads the target's ErrorMsg from it. Wrong pins are told to the peer
inside TLS (an ErrorMsg) before hanging up, so both logs say the same thing.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blockdev.tls import RECORD_BYTE, TlsError, client_context, server_context, start_tls

from . import keys as K
from .wire.codec import FrameReader
from .wire.connection import Connection
from .wire.errors import AuthError, PeerError, PeerSilent, RemoteProtocolError, WireError
from .wire.events import ErrorMsg
from .wire.link import Link, connect

log = logging.getLogger("vdisk.tls")


def binding_of(cert_der: bytes) -> bytes:
    """tls-server-end-point (RFC 5929): SHA-256 of the server's certificate."""
    return hashlib.sha256(cert_der).digest()


@dataclass
class SourceTls:
    """How a source secures its link to ``label`` (``target=HOST:PORT``)."""

    keys: K.SiteKeys
    data_dir: Path
    label: str
    pin: str | None = None  # --target-fingerprint
    tofu: bool = False
    psk: bool = False
    _ctx: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    verified: str | None = field(default=None, compare=False)  # the target's fingerprint, last accepted

    def context(self) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx = client_context()
        return self._ctx

    def check_target(self, cert: bytes) -> None:
        """Raise AuthError unless the target's certificate is the one we trust there."""
        self._check_target(cert)
        self.verified = K.fingerprint(cert)

    def _check_target(self, cert: bytes) -> None:
        if not cert:
            raise AuthError("the target sent no certificate")
        try:
            K.check_validity(cert, "the target's")
        except K.KeyFileError as e:
            raise AuthError(str(e)) from None
        fp = K.fingerprint(cert)
        if self.pin is not None:
            if fp != self.pin:
                raise AuthError(f"the target's certificate is {fp}, not the pinned {self.pin} (its key changed, or "
                                "someone is in the middle): check `vdisk keys show` on the target, then "
                                "`vdisk mirror NAME --target-fingerprint ...`")
            return
        trusted = K.read_trusted(self.data_dir)
        pins = trusted.pins_for(self.label)
        if pins:
            if fp not in pins:
                raise AuthError(f"the target's certificate is {fp}, not the one recorded for {self.label[7:]} "
                                f"({', '.join(sorted(pins))}) in {K.key_dir(self.data_dir) / K.TRUSTED_FILE}: "
                                "if its key was rotated, replace that line")
            return
        if fp in trusted.anywhere():
            return
        if self.tofu:
            K.add_trusted(self.data_dir, fp, self.label, "trust on first use")
            log.warning("trusting the target %s on first use: %s (recorded in %s)", self.label[7:], fp,
                        K.key_dir(self.data_dir) / K.TRUSTED_FILE)
            return
        if self.psk:
            return  # the PSK proof is bound to this certificate (connection.py)
        raise AuthError(f"the target's certificate {fp} is not trusted: pin it with --target-fingerprint {fp} "
                        "(after checking `vdisk keys show` on the target) or use --trust-on-first-use")

    def sign(self, message: bytes) -> tuple[bytes, bytes]:
        return self.keys.cert_der, self.keys.sign(message)


@dataclass
class TargetTls:
    """How a target secures its links. ``open_``: a loopback listener with nothing to check sources
    against (no trusted file, no PSK, no TOFU) takes any source, as a keyless loopback target does."""

    keys: K.SiteKeys
    data_dir: Path
    tofu: bool = False
    psk: bool = False
    open_: bool = False
    _ctx: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    def context(self) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx = server_context(str(self.keys.cert_file), str(self.keys.key_file))
        return self._ctx

    def can_authenticate(self) -> bool:
        return self.psk or self.tofu or bool(K.read_trusted(self.data_dir).anywhere())

    def checker(self, peer: str) -> Callable[[bytes, bytes, bytes], None]:
        def check(cert: bytes, sig: bytes, message: bytes) -> None:
            self.check_source(cert, sig, message, peer)
        return check

    def check_source(self, cert: bytes, sig: bytes, message: bytes, peer: str) -> None:
        if not cert:
            raise AuthError("authentication failed: the source presented no certificate over TLS")
        if not K.verify_signature(cert, sig, message):
            raise AuthError("authentication failed: the source's signature does not match its certificate "
                            "(or the link is relayed)")
        try:
            K.check_validity(cert, "the source's")
        except K.KeyFileError as e:
            raise AuthError(f"authentication failed: {e}") from None
        fp = K.fingerprint(cert)
        trusted = K.read_trusted(self.data_dir).anywhere()
        if fp in trusted:
            return
        if not trusted:
            if self.tofu:
                K.add_trusted(self.data_dir, fp, "", f"source {peer}, trust on first use")
                log.warning("trusting the source %s on first use: %s (recorded in %s)", peer, fp,
                            K.key_dir(self.data_dir) / K.TRUSTED_FILE)
                return
            if self.psk or self.open_:
                return
        raise AuthError(f"authentication failed: the source's certificate {fp} is not trusted by this target "
                        f"(on the target: `vdisk keys trust {fp}`)")


def _plain_error(seen: bytes) -> str | None:
    """The message of a plain ErrorMsg frame at the start of ``seen`` (a plain target's refusal)."""
    if not seen or seen[0] == RECORD_BYTE:
        return None
    reader = FrameReader(64 << 10)
    try:
        reader.feed(seen[:60 << 10])
        frames = reader.frames()
    except WireError:  # anything that is not our protocol
        return "the target does not speak TLS (is it a vdisk target started with --tls?)"
    if frames and isinstance(frames[0], ErrorMsg):
        return frames[0].message
    return "the target does not speak TLS"


async def secure_source(link: Link, tls: SourceTls, timeout: float) -> None:
    """The source's side: TLS handshake, the target's certificate checked, the binding and our
    signer set on the link's Connection. Raises a WireError with a one-line reason."""
    try:
        chan = await start_tls(link.raw, tls.context(), False, timeout)
    except TlsError as e:
        msg = _plain_error(e.seen)
        if msg is not None:
            raise PeerError(f"peer: {msg}", "tls") from None
        raise RemoteProtocolError(f"{e} (is the target using TLS? `vdisk target --tls`)") from None
    link.use_tls(chan)
    cert = chan.peer_certificate()
    try:
        tls.check_target(cert)
    except AuthError as e:
        link.conn.fail(f"the source refuses this target: {e}", "auth")  # sent by link.close()
        raise
    link.conn.binding = binding_of(cert)
    link.conn.signer = tls.sign


async def _peek(sock: socket.socket, timeout: float) -> bytes:
    with trio.move_on_after(timeout):
        while True:
            try:
                return sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
    raise PeerSilent(f"did not start the handshake in {timeout:g}s (sent nothing)")


async def secure_target(link: Link, tls: TargetTls | None, timeout: float) -> None:
    """The target's side: TLS when configured (else plain), a mismatch refused in a way the peer
    can read. Raises a WireError whose message is logged as the refusal."""
    try:
        first = await _peek(link.raw, timeout)
    except OSError as e:
        raise RemoteProtocolError(f"link failed: {e.strerror or e}") from None
    if not first:
        raise RemoteProtocolError("the peer closed the connection")
    hello_is_tls = first[0] == RECORD_BYTE
    if tls is None:
        if hello_is_tls:
            msg = "this target does not use TLS: the source must connect without it (or start the target with --tls)"
            link.conn.fail(msg, "tls")  # a plain frame: the source finds it where its ServerHello should be
            raise AuthError(f"refused a TLS connection: {msg}")
        return
    if not hello_is_tls:
        msg = ("this target requires TLS: the source connected without it (give `vdisk mirror` --tls, "
               "or --insecure on both sides for a plain link)")
        link.conn.fail(msg, "tls")
        raise AuthError(f"refused a plain connection: {msg}")
    try:
        chan = await start_tls(link.raw, tls.context(), True, timeout)
    except TlsError as e:
        raise RemoteProtocolError(str(e)) from None
    link.use_tls(chan)
    link.conn.binding = binding_of(tls.keys.cert_der)
    link.conn.check_source = tls.checker(link.peer)


async def open_link(config: Any, conn: Connection) -> Link:
    """A source's link to ``config.host:port``, secured when ``config.tls`` is set (closed on failure)."""
    link = await connect(config.host, config.port, conn, config.timeout)
    if config.tls is not None:
        try:
            await secure_source(link, config.tls, config.timeout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await link.close()
            raise
    return link
