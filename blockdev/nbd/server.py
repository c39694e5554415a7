"""The trio NBD server: listeners, the handshake driver, and the bounds on connections.

The transmission phase of one client lives in session.py (``Connection``); the numbers that bound a
client, a volume and a listener in limits.py. Here: each listener accepts until it holds
``Limits.connections`` open connections; past that a client is told why (NBD_REP_ERR_POLICY to its
options, for a few at once, within a short timeout) or simply closed, and one log line says so at
most every ``LOG_EVERY`` seconds. Accept errors (EMFILE when descriptors run out) back off instead
of spinning, and are logged at the same rate. The soft descriptor limit is raised at the first listen.
With a TLS context the server requires NBD_OPT_STARTTLS (fixed newstyle: ACK, then the TLS
handshake, then options again); transmission then reads and writes through the TLS channel, which
has the socket's recv_into/sendmsg (blockdev/tls.py): session.py's loop is the same either way.
"""
from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..backend import Backend
from ..tls import TlsChannel, TlsError, describe_ssl_error, start_tls
from .handshake import Closed, ExportInfo, Negotiated, ServerHandshake
from .limits import Backoff, Limits, RateLimited, WriteBudget, raise_fd_limit
from .pool import WorkerPool  # WorkerPool is also the FUSE export's (imported from here)
from .session import Connection, ConnectionStats
from .transmission import ProtocolError

log = logging.getLogger("blockdev.nbd")

HANDSHAKE_TIMEOUT = 30.0
LOG_EVERY = 10.0  # seconds between two log lines about refused connections or failing accepts
# accept() errors that mean "out of a resource": wait (doubling) rather than retry at once
FD_RESERVE = 64  # descriptors kept for images, logs, control and FUSE: never handed to NBD clients
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class Export:
    """A named backend offered to NBD clients."""

    name: str
    backend: Backend
    description: str = ""

    def info(self) -> ExportInfo:
        b = self.backend
        writable = b.can_write()
        return ExportInfo(
            name=self.name, size=b.size(), writable=writable, can_flush=b.can_flush(), can_fua=b.can_fua(),
            can_trim=writable and b.can_trim(), can_zero=writable and b.can_zero(),
            can_fast_zero=writable and b.can_fast_zero(), pref_block=b.block_size(),
            description=self.description,
        )


class Listener:
    """One listening socket's count of open connections and its rate-limited log lines."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.open = 0
        self.refused = 0
        self.refuse_log = RateLimited(log, LOG_EVERY)
        self.error_log = RateLimited(log, LOG_EVERY)


class NBDServer:
    """Serves exports looked up by name; ``serve`` runs one listener."""

    def __init__(self, lookup: Callable[[str], Export | None], names: Callable[[], list[str]], workers: int = 4,
                 limits: Limits | None = None, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: require NBD_OPT_STARTTLS (clients verify the certificate themselves)."""
        self.lookup = lookup
        self.tls = tls
        self.names = names
        self.limits = limits or Limits()
        self.pool = WorkerPool(workers)
        self.connections: set[Connection] = set()
        self.listeners: list[Listener] = []
        self._budgets: dict[str, WriteBudget] = {}
        self._op_logs: dict[str, RateLimited] = {}
        self._refusing = 0
        self.fd_limit = 0
        self.fd_cap = 0  # connections the open-file limit allows, all listeners together
        self._active = 0
        self._none_active = trio.Event()
        self._none_active.set()
        self._listen_scopes: list[trio.CancelScope] = []
        self._handshakes: set[trio.CancelScope] = set()
        self.draining = False
        self.total_connections = 0

    def _info(self, name: str) -> ExportInfo | None:
        exp = self.lookup(name)
        return exp.info() if exp is not None else None

    async def serve(self, kind: str, where: str, port: int = 0, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``unix:where`` or ``tcp:where:port`` until cancelled; reports the bound address."""
        lsock: socket.socket | None = None
        try:
            if kind == "unix":
                lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                lsock.bind(where)
                addr = f"unix:{where}"
            else:
                infos = socket.getaddrinfo(where, port, type=socket.SOCK_STREAM)
                fam, _, _, _, sa = infos[0]
                lsock = socket.socket(fam, socket.SOCK_STREAM)
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind(sa)
        except OSError as e:  # the user's one line names the address, not only "No such file or directory"
            if lsock is not None:
                lsock.close()
            raise OSError(e.errno, f"cannot listen on {kind}:{where}{'' if kind == 'unix' else f':{port}'}: "
                                   f"{e.strerror or e}") from None
        if kind != "unix":
            host, bound = lsock.getsockname()[:2]
            addr = f"tcp:{'[' + host + ']' if ':' in host else host}:{bound}"
        lsock.listen(128)
        lsock.setblocking(False)
        if not self.fd_limit:
            self.fd_limit = raise_fd_limit()
            self.fd_cap = max(1, self.fd_limit - FD_RESERVE)
            if self.fd_cap < self.limits.connections:
                # Past the limit accept() would fail and clients hang in the backlog: refuse them
                # with a reason instead, below it.
                log.warning("the open-file limit (%d) allows only %d NBD connections, fewer than the "
                            "maximum of %d (--max-connections): raise it (ulimit -n) or lower the maximum",
                            self.fd_limit, self.fd_cap, self.limits.connections)
        listener = Listener(addr)
        self.listeners.append(listener)
        backoff = Backoff()
        try:
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()
                self._listen_scopes.append(scope)
                task_status.started(addr)
                with scope:
                    while True:
                        await trio.lowlevel.wait_readable(lsock)
                        try:
                            conn, _ = lsock.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError as e:
                            # The pending connection stays queued, so the socket stays readable: without
                            # a pause this loop would spin (and log) as fast as accept fails.
                            delay = backoff.next() if e.errno in _RESOURCE_ERRORS else 0.05
                            listener.error_log(logging.WARNING, "accept failed on %s: %s", addr, e.strerror or e)
                            await trio.sleep(delay)
                            continue
                        backoff.reset()
                        if listener.open >= self.limits.connections or self._open_total() >= self.fd_cap:
                            self._refuse(nursery, listener, conn)
                            continue
                        listener.open += 1
                        nursery.start_soon(self._client, conn, listener)
        finally:
            lsock.close()
            self.listeners.remove(listener)

    def _open_total(self) -> int:
        return sum(li.open for li in self.listeners)

    def _refuse(self, nursery: trio.Nursery, listener: Listener, sock: socket.socket) -> None:
        """A client over the listener's cap: told why if few are being refused, else closed at once."""
        listener.refused += 1
        if listener.open >= self.limits.connections:
            reason = (f"too many connections: {listener.open} open on this listener (the maximum is "
                      f"{self.limits.connections})")
        else:
            reason = (f"too many connections: {self._open_total()} open (the server's open-file "
                      f"limit of {self.fd_limit} allows {self.fd_cap})")
        listener.refuse_log(logging.WARNING, "refusing an NBD client on %s: %s", listener.addr, reason)
        if self._refusing >= self.limits.refusing or self.draining:
            sock.close()
            return
        self._refusing += 1
        nursery.start_soon(self._tell_refused, sock, reason)

    async def _tell_refused(self, sock: socket.socket, reason: str) -> None:
        try:
            sock.setblocking(False)
            await self._handshake(sock, refuse=reason, timeout=self.limits.refuse_timeout)
        except OSError:
            pass
        finally:
            sock.close()
            self._refusing -= 1

    def op_error_log(self, name: str) -> RateLimited:
        """The log line for ops of export ``name`` that fail (a full disk fails every write: one
        line per ``LOG_EVERY`` saying how many more, not one per request)."""
        r = self._op_logs.get(name)
        if r is None:
            r = self._op_logs[name] = RateLimited(log, LOG_EVERY)
        return r

    def budget(self, name: str) -> WriteBudget:
        """The write budget of export ``name``, shared by all its connections."""
        b = self._budgets.get(name)
        if b is None:
            b = self._budgets[name] = WriteBudget(self.limits.write_bytes)
        return b

    async def drain(self) -> None:
        """Stop accepting; let every connection finish its in-flight requests; close them."""
        self.draining = True
        for scope in self._listen_scopes:
            scope.cancel()
        for c in list(self.connections):
            c.stop_reading()
        for scope in list(self._handshakes):
            scope.cancel()
        await self._none_active.wait()

    async def _client(self, sock: socket.socket, listener: Listener | None = None) -> None:
        self._active += 1
        self.total_connections += 1
        self._none_active = trio.Event() if self._none_active.is_set() else self._none_active
        conn: Connection | None = None
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            neg = None
            io: socket.socket | TlsChannel = sock
            with trio.CancelScope() as scope:  # drain() ends handshakes still in progress
                self._handshakes.add(scope)
                if self.draining:
                    scope.cancel()
                try:
                    neg, io = await self._handshake(sock)
                finally:
                    self._handshakes.discard(scope)
            if neg is None or self.draining:
                return
            export = self.lookup(neg.export.name)
            if export is None:
                return
            conn = Connection(self, io, export, neg, self.budget(export.name), self.limits)
            self.connections.add(conn)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.writer)
                try:
                    await conn.read_loop(neg.leftover)
                except ProtocolError as e:
                    log.warning("closing NBD connection: %s", e)
                conn.closing = True
                await conn.finish()
                nursery.cancel_scope.cancel()
        except (OSError, trio.BrokenResourceError) as e:
            log.info("NBD connection ended: %s", e)
        except Exception:  # one broken client must never take the server down
            log.exception("NBD connection failed")
        finally:
            if conn is not None:
                self.connections.discard(conn)
            sock.close()
            if listener is not None:
                listener.open -= 1
            self._active -= 1
            if self._active == 0:
                self._none_active.set()

    async def _handshake(self, sock: socket.socket, refuse: str | None = None, timeout: float = HANDSHAKE_TIMEOUT
                         ) -> tuple[Negotiated | None, socket.socket | TlsChannel]:
        """The option haggling; (the result, what transmission reads and writes: the socket or TLS)."""
        hs = ServerHandshake(self._info, self.names, refuse=refuse, tls=self.tls is not None)
        io: socket.socket | TlsChannel = sock
        buf = bytearray(65536)
        with trio.move_on_after(timeout):
            await _send_all(io, hs.data_to_send())
            while True:
                try:
                    n = io.recv_into(memoryview(buf))
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except ssl.SSLError as e:
                    log.info("NBD client's TLS failed: %s", describe_ssl_error(e))
                    return None, io
                if not n:
                    return None, io
                result = hs.receive_data(bytes(buf[:n]))
                await _send_all(io, hs.data_to_send())
                if hs.tls_requested and self.tls is not None:
                    try:
                        io = await start_tls(sock, self.tls, True, timeout, hs.take_leftover())
                    except TlsError as e:
                        log.info("NBD client's TLS handshake failed: %s", e)
                        return None, io
                    hs.tls_started()
                    continue
                if isinstance(result, Negotiated):
                    return result, io
                if isinstance(result, Closed):
                    log.info("NBD handshake closed: %s", result.reason)
                    return None, io
        log.info("NBD handshake timed out")
        return None, io

    def statistics(self) -> dict[str, int]:
        return {"connections": len(self.connections), "total_connections": self.total_connections,
                "refused": sum(li.refused for li in self.listeners), "fd_limit": self.fd_limit,
                "waiting": sum(1 for c in self.connections if c.waiting),
                "write_bytes_in_flight": sum(b.used for b in self._budgets.values())}

    def connection_statistics(self) -> list[ConnectionStats]:
        return [c.statistics() for c in self.connections]

    def close(self) -> None:
        self.pool.close()


async def _send_all(io: socket.socket | TlsChannel, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = io.sendmsg([view])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(io)
            continue
        view = view[n:]
    if isinstance(io, TlsChannel):
        while not io.flush():
            await trio.lowlevel.wait_writable(io)


__all__ = ["Export", "NBDServer"]
