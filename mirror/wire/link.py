"""The trio side of a replication link: a non-blocking socket around a sans-IO Connection.

The hot loop calls ``recv_into``/``sendmsg`` directly and awaits readiness only on BlockingIOError
(DESIGN.md, NBD data path): awaiting trio's socket wrappers on every call costs an epoll pass each.
"""
from __future__ import annotations

import socket
import ssl
import threading
from collections import deque

import trio

from blockdev.tls import TlsChannel, describe_ssl_error

from .connection import Connection
from .errors import PeerClosed, RemoteProtocolError, WireError
from .events import Event

IOV_MAX = 512
Buffer = bytes | memoryview


class Outbox:
    """Frames waiting for the socket. ``put`` from any thread (holding ``lock``); ``send_some`` from trio."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._bufs: deque[Buffer] = deque()
        self.bytes = 0
        self.sent = 0  # bytes handed to the socket, ever (metrics: wire bytes)

    def put_locked(self, bufs: list[Buffer] | tuple[Buffer, ...]) -> None:
        """Append (the caller holds ``lock``, so sequence numbers and wire order agree)."""
        self._bufs.extend(bufs)
        self.bytes += sum(len(b) for b in bufs)

    def put_pair_locked(self, header: bytes, payload: Buffer) -> None:
        """Append one frame given as header and payload (the per-write fast path)."""
        self._bufs.append(header)
        self._bufs.append(payload)
        self.bytes += len(header) + len(payload)

    def clear(self) -> None:
        with self.lock:
            self.clear_locked()

    def clear_locked(self) -> None:
        self._bufs.clear()
        self.bytes = 0

    def send_some(self, sock: socket.socket | TlsChannel) -> bool:
        """Send what the socket takes now; True when the outbox is empty. Raises OSError."""
        while True:
            with self.lock:
                if not self._bufs:
                    return True
                batch = [self._bufs[i] for i in range(min(IOV_MAX, len(self._bufs)))]
            try:
                n = sock.sendmsg(batch)
            except BlockingIOError:
                return False
            with self.lock:
                self.bytes -= n
                self.sent += n
                while n:
                    head = self._bufs[0]
                    if len(head) <= n:
                        n -= len(head)
                        self._bufs.popleft()
                    else:
                        self._bufs[0] = memoryview(head)[n:]
                        n = 0


class Link:
    """A connected socket and its protocol state. Not thread-safe: trio thread only.

    After ``use_tls`` the same loops run over a TLS channel (blockdev/tls.py): it has the socket's
    ``recv_into``/``sendmsg`` with plaintext on this side, so nothing above changes."""

    def __init__(self, sock: trio.socket.SocketType, conn: Connection) -> None:
        self.sock = sock
        self.raw: socket.socket = socket.socket(fileno=sock.fileno(), family=sock.family, type=sock.type)
        self.raw.setblocking(False)
        self.conn = conn
        self.outbox = Outbox()
        self.tls: TlsChannel | None = None
        self._io: socket.socket | TlsChannel = self.raw  # recv_into / sendmsg: plaintext either way
        self.peer = ""
        try:
            host, port = sock.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except (OSError, TypeError):
            pass

    async def receive(self) -> list[Event]:
        """At least one event (or raise: RemoteProtocolError when the peer hangs up)."""
        reader = self.conn.reader
        while True:
            if reader.buffered:  # complete frames may be left from the last call (or a bad one)
                events = self.conn.next_events()
                await self.send_control()  # handshake replies queued by the connection
                if events:
                    return events
            try:
                n = self._io.recv_into(reader.buffer())
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.raw)
                continue
            except ssl.SSLError as e:  # before OSError, its base class
                raise RemoteProtocolError(f"link to {self.peer} failed: TLS: {describe_ssl_error(e)} "
                                          "(a record was altered on the way, or the peer broke TLS)") from None
            except OSError as e:
                raise RemoteProtocolError(f"link to {self.peer} failed: {e.strerror or e}") from None
            if n == 0:
                # The caller's log line names the peer ("source ADDR: ...", "mirror N -> ADDR: ...").
                raise PeerClosed("the peer closed the connection")
            reader.commit(n)

    def use_tls(self, chan: TlsChannel) -> None:
        """From now on every byte crosses ``chan`` (its handshake is done)."""
        self.tls = self._io = chan

    def send_some(self) -> bool:
        """Send what the socket takes now; True when nothing is left (TLS: no ciphertext either). OSError."""
        done = self.outbox.send_some(self._io)
        tls = self.tls
        return done if tls is None else tls.flush() and done

    async def send_control(self) -> None:
        data = self.conn.data_to_send()
        if data:
            with self.outbox.lock:
                self.outbox.put_locked([data])
            await self.drain()

    async def drain(self) -> None:
        """Send everything queued, waiting for the socket as needed."""
        try:
            while not self.send_some():
                await trio.lowlevel.wait_writable(self.raw)
        except OSError as e:
            raise RemoteProtocolError(f"link to {self.peer} failed: {e.strerror or e}") from None

    async def close(self, error: WireError | None = None, message: str | None = None) -> None:
        """Tell the peer why (best effort, bounded), then hang up. Idempotent."""
        if self.raw.fileno() < 0:
            return
        if message is not None:
            self.conn.fail(message, "error")
        data = self.conn.data_to_send()
        if data:
            with trio.move_on_after(1.0):
                try:
                    self.outbox.clear()
                    with self.outbox.lock:
                        self.outbox.put_locked([data])
                    await self.drain()
                    await self._linger()
                except WireError:
                    pass
        self.raw.detach()
        self.sock.close()


    async def _linger(self, budget: int = 1 << 20) -> None:
        """After our last frame: half-close and discard what the peer still sends (bounded), so
        closing with unread bytes does not reset the connection and destroy the error message."""
        try:
            self.raw.shutdown(socket.SHUT_WR)
            junk = bytearray(64 << 10)
            while budget > 0:
                try:
                    n = self.raw.recv_into(junk)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.raw)
                    continue
                if n == 0:
                    return
                budget -= n
        except OSError:
            pass


WAN_NOTSENT_LOWAT = 256 << 10


def tune_for_wan(link: Link) -> None:
    """A long fat pipe without bufferbloat: the kernel may keep a window of a fast link in flight
    (send buffer autotuning), but holds at most 256 KiB not yet sent, so a keep-alive or a dedup
    query is not queued behind many seconds of a slow link (the shipper packs the next step meanwhile)."""
    try:
        link.raw.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", 25), WAN_NOTSENT_LOWAT)
    except OSError:
        pass


async def connect(host: str, port: int, conn: Connection, timeout: float = 10.0) -> Link:
    """Open a TCP link with TCP_NODELAY (the sync path is latency-bound)."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise RemoteProtocolError(f"cannot connect to {host}:{port}: timed out") from None
    except OSError as e:
        raise RemoteProtocolError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
    sock = stream.socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Link(sock, conn)
