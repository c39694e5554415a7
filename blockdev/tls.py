"""TLS 1.3 under a batched non-blocking socket loop: ``ssl.SSLObject`` with memory BIOs.

The loops of the NBD server and the replication link call ``recv_into``/``sendmsg`` on a
non-blocking socket and await readiness only on ``BlockingIOError``. ``TlsChannel`` offers the same
two calls with plaintext on our side and ciphertext on the socket, so those loops and the frame
parsers above them stay as they are: received ciphertext is decrypted straight into the parser's
buffer (every whole record available, not one per call), and outgoing plaintext is coalesced into
large writes that OpenSSL cuts into 16 KiB records (it releases the GIL while it encrypts).

Peers are authenticated by the caller (certificate fingerprints, see mirror/keys.py): the contexts
here do not verify certificates, so a self-signed certificate needs no PKI. TLS 1.3 only: its
cipher suites are all AEAD. An ``SSLObject`` is not thread-safe: one thread (trio's) uses a channel.
"""
from __future__ import annotations

import socket
import ssl

import trio

RECORD_BYTE = 0x16  # the first byte of a TLS handshake record (a ClientHello)
CIPHER_BUFFER = 1 << 20  # ciphertext read from the socket at once, at most (it starts at one record:
FIRST_BUFFER = 17 << 10  # an unauthenticated connection costs kilobytes; it grows when a read fills it)
ENCRYPT_BATCH = 256 << 10  # plaintext encrypted per sendmsg call, sent at once: the peer decrypts while we
# encrypt the next (1 MiB at once: 0.42-0.48x of plain on 1 MiB writes, 256 KiB: 0.60x; bench_tls.py, loaded host)


class TlsError(Exception):
    """The TLS layer failed: the message says why, in one line. ``seen``: the peer's first bytes
    (a peer that does not speak TLS may have said why in its own protocol)."""

    seen: bytes = b""


def client_context(certfile: str | None = None, keyfile: str | None = None) -> ssl.SSLContext:
    """TLS 1.3 client; the caller checks the server's certificate fingerprint after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """TLS 1.3 server with the site's certificate; no session tickets (nothing resumes sessions)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_NONE
    ctx.num_tickets = 0
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def describe_ssl_error(e: BaseException) -> str:
    """An OpenSSL error as a short phrase ('bad record mac', 'wrong version number')."""
    reason = getattr(e, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return str(e) or type(e).__name__


class TlsChannel:
    """One TLS connection over a connected non-blocking socket. ``recv_into`` and ``sendmsg`` take
    and give plaintext; ``flush`` sends ciphertext left over when the socket was full."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                 initial: bytes = b"") -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        if initial:
            self._in.write(initial)
        self._cbuf = bytearray(FIRST_BUFFER)
        self._cview = memoryview(self._cbuf)
        self._pending = memoryview(b"")  # ciphertext the socket did not take yet
        self.raw_seen = bytearray()  # the peer's first bytes during the handshake (a plain peer's error)
        self.eof = False

    # -- handshake -------------------------------------------------------------------------------
    async def handshake(self) -> None:
        """Complete the handshake (the caller bounds it in time). Raises TlsError."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush_wait()
                try:
                    n = await self._recv_wait()
                except OSError as e:
                    raise TlsError(f"connection lost during the TLS handshake: {e.strerror or e}") from None
                if n == 0:
                    raise TlsError("the peer closed the connection during the TLS handshake")
            except ssl.SSLError as e:
                await self._flush_wait(best_effort=True)  # our alert tells the peer why
                raise TlsError(f"TLS handshake failed: {describe_ssl_error(e)}") from None
        await self._flush_wait()

    async def _recv_wait(self) -> int:
        while True:
            try:
                n = self.sock.recv_into(self._cbuf)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            if n:
                if len(self.raw_seen) < 4096:
                    self.raw_seen += self._cview[:n]
                self._in.write(self._cview[:n])
            return n

    async def _flush_wait(self, best_effort: bool = False) -> None:
        try:
            while not self.flush():
                await trio.lowlevel.wait_writable(self.sock)
        except OSError:
            if not best_effort:
                raise TlsError("connection lost during the TLS handshake") from None

    def fileno(self) -> int:  # trio waits on the socket for us
        return self.sock.fileno()

    def peer_certificate(self) -> bytes:
        """The peer's certificate (DER), or b'' if it sent none."""
        return self.obj.getpeercert(binary_form=True) or b""

    # -- data ------------------------------------------------------------------------------------
    def recv_into(self, buf: memoryview) -> int:
        """Plaintext into ``buf``: every whole record available; 0 at the peer's end of stream.
        Raises BlockingIOError when nothing can be decrypted yet, ssl.SSLError (an OSError) on a
        record that fails authentication."""
        size = len(buf)
        total = 0
        obj, bio = self.obj, self._in
        while True:
            # Only while there is something to decrypt: a read that finds nothing raises, which
            # costs more than the check (this runs once per batch of frames).
            while total < size and (bio.pending or obj.pending()):
                try:
                    n = obj.read(size - total, buf[total:])
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self.eof = True
                    break
                if n == 0:
                    break
                total += n
            if total or self.eof:
                return total
            n = self.sock.recv_into(self._cbuf)  # BlockingIOError propagates: the caller waits
            if n == 0:
                return 0
            bio.write(self._cview[:n])
            if 2 * n > len(self._cbuf) < CIPHER_BUFFER:  # the peer sends in bulk: read more at once
                self._cbuf = bytearray(min(4 * len(self._cbuf), CIPHER_BUFFER))
                self._cview = memoryview(self._cbuf)

    def sendmsg(self, bufs: list[bytes | memoryview]) -> int:
        """Encrypt and send up to ENCRYPT_BATCH bytes of ``bufs``; the number of plaintext bytes
        consumed (all of those encrypted: what the socket does not take now waits for ``flush``).
        BlockingIOError while earlier ciphertext is still waiting."""
        if not self.flush():
            raise BlockingIOError
        if len(bufs) == 1 or len(bufs[0]) >= ENCRYPT_BATCH:
            data: bytes | memoryview = bufs[0]
        else:
            parts, n = [], 0
            for b in bufs:
                if n and n + len(b) > ENCRYPT_BATCH:
                    break
                parts.append(b)
                n += len(b)
            data = b"".join(parts)
        if len(data) > ENCRYPT_BATCH:
            data = memoryview(data)[:ENCRYPT_BATCH]
        n = self.obj.write(data)
        self._pending = memoryview(self._out.read())
        self.flush()
        return n

    def flush(self) -> bool:
        """Send waiting ciphertext; True when none is left. Raises OSError (not BlockingIOError)."""
        if not self._pending and self._out.pending:
            self._pending = memoryview(self._out.read())
        while self._pending:
            try:
                n = self.sock.send(self._pending)
            except BlockingIOError:
                return False
            self._pending = self._pending[n:]
            if not self._pending and self._out.pending:
                self._pending = memoryview(self._out.read())
        return True

    def close_notify(self) -> None:
        """Queue our close_notify alert (sent by the next flush)."""
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass


async def start_tls(sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, timeout: float,
                    initial: bytes = b"") -> TlsChannel:
    """A TLS channel over ``sock`` once its handshake completed within ``timeout`` seconds."""
    chan = TlsChannel(sock, ctx, server_side, initial)
    try:
        with trio.move_on_after(timeout) as scope:
            await chan.handshake()
        if scope.cancelled_caught:
            raise TlsError(f"the TLS handshake did not complete in {timeout:g}s")
    except TlsError as e:
        e.seen = bytes(chan.raw_seen)
        raise
    return chan
