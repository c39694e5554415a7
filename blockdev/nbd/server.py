"""The trio NBD server: listeners, the handshake, and the batched transmission loop.

Hot path (see ../shared DESIGN.md for the measurements behind it): one non-blocking ``recv_into`` into
a large preallocated buffer takes everything queued; every complete request in it is parsed at once;
small reads and writes run inline against the op table; big writes, FUA writes and flushes go to a
few plain worker threads as zero-copy slices of the buffer (which stays pinned until they finish);
all replies of a batch leave in one ``sendmsg``. Trio is awaited only when a socket would block.
"""
from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..backend import Backend, Completion
from ..errors import FastZeroUnsupported, to_errno
from . import proto as P
from .handshake import Closed, ExportInfo, Negotiated, ServerHandshake
from .pool import Buffer, WorkerPool  # WorkerPool is also the FUSE export's (imported from here)
from .transmission import (
    ProtocolError,
    RequestParser,
    block_status_reply,
    error_reply,
    read_reply_header,
    simple_reply,
    validate,
)

log = logging.getLogger("blockdev.nbd")

BUF_SIZE = 16 << 20
BIG_WRITE = 128 << 10  # writes at least this big go to a worker thread
BIG_READ = 256 << 10  # and reads
KEEP_FILLING = 4 << 20  # a pinned buffer with this much room left keeps receiving after its pinned bytes
OUTBOX_LIMIT = 64 << 20  # stop reading while this many reply bytes wait for a slow client
IOV_MAX = 1024
HANDSHAKE_TIMEOUT = 30.0
CHECKPOINT_EVERY = 8  # batches between explicit trio checkpoints, so other tasks run under load


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


class Connection:
    """One client in the transmission phase."""

    def __init__(self, server: "NBDServer", sock: socket.socket, export: Export, neg: Negotiated) -> None:
        self.server = server
        self.sock = sock
        self.export = export
        self.backend = export.backend
        self.structured = neg.structured
        self.base_allocation = neg.base_allocation
        info = neg.export
        self.size = info.size
        self.writable = info.writable
        self.outbox: list[bytes | bytearray | memoryview] = []
        self.out_bytes = 0
        self.reading = 0  # bytes of reads on the workers: replies that will join the outbox
        self.inflight = 0
        self.closing = False
        self.broken = False
        self._blocked = False
        self._send_scheduled = False
        self._writer_wake = trio.Event()
        self._idle = trio.Event()
        self._drained = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._read_scope = trio.CancelScope()
        self._pool: list[Buffer] = []
        self._current: Buffer | None = None
        self.requests = 0

    # -- sending --------------------------------------------------------------------------------
    def _queue(self, *parts: bytes | bytearray | memoryview) -> None:
        for p in parts:
            if n := len(p):  # an empty part never leaves the outbox: sendmsg reports 0 bytes for it
                self.outbox.append(p)
                self.out_bytes += n

    def send_now(self) -> None:
        """Send what the socket takes without blocking; the writer task finishes the rest."""
        self._send_scheduled = False
        while self.outbox and not self._blocked and not self.broken:
            try:
                n = self.sock.sendmsg(self.outbox[:IOV_MAX])
            except BlockingIOError:
                self._blocked = True
                self._writer_wake.set()
                return
            except OSError:
                self.broken = True
                self.outbox.clear()
                self.out_bytes = 0
                break
            self.out_bytes -= n
            i = 0
            while n:
                first = self.outbox[i]
                if n >= len(first):
                    n -= len(first)
                    i += 1
                else:
                    self.outbox[i] = memoryview(first)[n:]
                    n = 0
            del self.outbox[:i]
        if self.broken:
            self.outbox.clear()
            self.out_bytes = 0
        if not self.outbox:
            self._drained.set()

    def _schedule_send(self) -> None:
        """Send the queued replies once the current task yields, so replies finished together (a
        mirror's ack covers a batch) leave in one sendmsg. On the trio thread that is a wake-up of
        the writer task (no syscall); from elsewhere, one run_sync_soon."""
        if self._send_scheduled:
            return
        self._send_scheduled = True
        if threading.get_ident() == self._trio_thread:
            self._writer_wake.set()
        else:
            self._token.run_sync_soon(self.send_now)

    async def writer(self) -> None:
        while True:
            await self._writer_wake.wait()
            self._writer_wake = trio.Event()
            if self._send_scheduled:
                self.send_now()
            while self._blocked:
                await trio.lowlevel.wait_writable(self.sock)
                self._blocked = False
                self.send_now()

    # -- completing ops -------------------------------------------------------------------------
    def _reply_error(self, cmd: int, handle: int, err: int, msg: str = "") -> None:
        if self.structured and cmd in (P.CMD_READ, P.CMD_BLOCK_STATUS):
            self._queue(error_reply(handle, err, True, msg))
        else:
            self._queue(simple_reply(handle, err))

    def _finish(self, cmd: int, handle: int, buf: Buffer | None, exc: BaseException | None,
                read: tuple[int, bytearray] | None = None) -> None:
        """Trio thread: an op that left the batch finished (``read``: offset and data of a READ)."""
        if buf is not None:
            buf.pins -= 1
            if buf.pins == 0 and len(self._pool) < 2 and buf is not self._current:
                self._pool.append(buf)
        self.inflight -= 1
        if read is not None:
            self.reading -= len(read[1])
        if exc is not None:
            self._log_error(cmd, exc)
            self._reply_error(cmd, handle, P.wire_errno(to_errno(exc)), str(exc))
        elif read is not None:
            self._queue(read_reply_header(handle, read[0], len(read[1]), self.structured), read[1])
        else:
            self._queue(simple_reply(handle))
        self._schedule_send()
        if self.inflight == 0:
            self._idle.set()

    def _done_from_any_thread(self, cmd: int, handle: int, buf: Buffer | None) -> Callable[[Any, BaseException | None], None]:
        def done(result: Any, exc: BaseException | None) -> None:
            if exc is None and isinstance(result, Completion):
                result.add_done_callback(lambda e: self._call_in_trio(self._finish, cmd, handle, buf, e))
                return
            self._call_in_trio(self._finish, cmd, handle, buf, exc)
        return done

    def _call_in_trio(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._trio_thread:
            fn(*args)
        else:
            try:
                self._token.run_sync_soon(fn, *args)
            except trio.RunFinishedError:
                pass

    def _log_error(self, cmd: int, exc: BaseException) -> None:
        if not isinstance(exc, (FastZeroUnsupported,)) and to_errno(exc) not in (errno.EPERM,):
            log.warning("%s on %s failed: %s", P.CMD_NAMES.get(cmd, cmd), self.export.name, exc)

    # -- requests -------------------------------------------------------------------------------
    def handle_batch(self, reqs: list[tuple], buf: Buffer) -> int:
        """Handle requests in order; returns how many, stopping early once OUTBOX_LIMIT of replies wait.

        Each run of small inline writes is plugged (BATCH_OPS): a mirror sends the run's replica frames
        before its local pwrites. Anything else unplugs first, so it sees those writes done locally.
        """
        backend = self.backend
        plugged = False
        try:
            for i, (cmd, flags, handle, offset, length, payload, perr) in enumerate(reqs):
                if self.out_bytes + self.reading > OUTBOX_LIMIT:
                    return i
                small_write = cmd == P.CMD_WRITE and length < BIG_WRITE and not flags & P.CMD_FLAG_FUA
                if plugged and not small_write:
                    plugged = False
                    backend.unplug()
                elif small_write and not plugged:
                    plugged = True
                    backend.plug()
                self._handle_one(backend, buf, cmd, flags, handle, offset, length, payload, perr)
                if cmd == P.CMD_DISC:
                    return len(reqs)
            return len(reqs)
        finally:
            if plugged:
                backend.unplug()

    def _handle_one(self, backend: Backend, buf: Buffer, cmd: int, flags: int, handle: int, offset: int,
                    length: int, payload: memoryview | None, perr: int) -> None:
        """One request: replied to now, or once it finishes (on a worker or by its Completion)."""
        self.requests += 1
        err = perr or validate(cmd, flags, offset, length, self.size, self.writable, self.base_allocation)
        if err:
            self._reply_error(cmd, handle, err, "request rejected")
            return
        if not length and (cmd == P.CMD_TRIM or cmd == P.CMD_WRITE_ZEROES):
            # Nothing to do: answered here, so no layer (nor the mirror's region maps) sees an empty range.
            self._queue(simple_reply(handle))
            return
        fua = bool(flags & P.CMD_FLAG_FUA)
        try:
            if cmd == P.CMD_READ:
                data = bytearray(length)
                if length >= BIG_READ:  # a cold big read must not stall the loop
                    self._offload_read(handle, offset, data)
                else:
                    backend.pread(memoryview(data), offset)
                    self._queue(read_reply_header(handle, offset, length, self.structured), data)
            elif cmd == P.CMD_WRITE:
                if length >= BIG_WRITE or fua:
                    self._offload(cmd, handle, buf, backend.pwrite, (payload, offset, fua))
                else:
                    self._result(cmd, handle, buf, backend.pwrite(payload, offset, False))
            elif cmd == P.CMD_FLUSH:
                self._offload(cmd, handle, None, backend.flush, ())
            elif cmd == P.CMD_WRITE_ZEROES:
                args = (length, offset, fua, not flags & P.CMD_FLAG_NO_HOLE, bool(flags & P.CMD_FLAG_FAST_ZERO))
                self._offload(cmd, handle, None, backend.write_zeroes, args)
            elif cmd == P.CMD_TRIM:
                self._offload(cmd, handle, None, backend.trim, (length, offset, fua))
            elif cmd == P.CMD_BLOCK_STATUS:
                self._queue(block_status_reply(handle, self._extents(length, offset, flags)))
            elif cmd == P.CMD_CACHE:
                self._queue(simple_reply(handle))
            elif cmd == P.CMD_DISC:
                self.closing = True
        except Exception as e:  # noqa: BLE001 - an op's failure is the client's error reply
            self._log_error(cmd, e)
            self._reply_error(cmd, handle, P.wire_errno(to_errno(e)), str(e))

    def _result(self, cmd: int, handle: int, buf: Buffer, result: Any) -> None:
        """An inline write returned: reply now, or when its Completion finishes."""
        if result is None or (result.done and result.exception is None):
            self._queue(simple_reply(handle))
            return
        if result.done:
            raise result.exception  # type: ignore[misc]
        # Someone (the mirror) still holds the payload: keep the buffer pinned until it is done.
        buf.pins += 1
        self._op_started()
        result.add_done_callback(lambda e: self._call_in_trio(self._finish, cmd, handle, buf, e))

    def _op_started(self) -> None:
        """An op left the batch; finish() waits for ``_idle`` until every such op is done."""
        self.inflight += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _offload(self, cmd: int, handle: int, buf: Buffer | None, fn: Callable[..., Any], args: tuple) -> None:
        if buf is not None:
            buf.pins += 1
        self._op_started()
        self.server.pool.submit(fn, args, self._done_from_any_thread(cmd, handle, buf))

    def _offload_read(self, handle: int, offset: int, data: bytearray) -> None:
        self._op_started()
        self.reading += len(data)

        def done(_result: Any, exc: BaseException | None) -> None:
            self._call_in_trio(self._finish, P.CMD_READ, handle, None, exc, (offset, data))

        self.server.pool.submit(self.backend.pread, (memoryview(data), offset), done)

    def _extents(self, length: int, offset: int, flags: int) -> list[tuple[int, int]]:
        length = min(length, 0xFFFFFFFF)
        if self.backend.can_extents():
            runs = self.backend.extents(length, offset)
        else:
            runs = [(length, 0)]
        out: list[tuple[int, int]] = []
        left = length
        for n, f in runs:
            n = min(n, left)
            if n <= 0:
                break
            state = (P.STATE_HOLE if f & 1 else 0) | (P.STATE_ZERO if f & 2 else 0)
            if out and out[-1][1] == state:
                out[-1] = (out[-1][0] + n, state)
            else:
                out.append((n, state))
            left -= n
            if flags & P.CMD_FLAG_REQ_ONE:
                break
        return out or [(length, 0)]

    # -- receiving ------------------------------------------------------------------------------
    def _new_buffer(self, need: int) -> Buffer:
        if need <= BUF_SIZE:
            while self._pool:
                b = self._pool.pop()
                if b.pins == 0:
                    return b
            return Buffer(BUF_SIZE)
        return Buffer(need)

    async def read_loop(self, leftover: bytes) -> None:
        parser = RequestParser()
        sock = self.sock
        buf = self._current = self._new_buffer(max(BUF_SIZE, len(leftover)))
        buf.view[:len(leftover)] = leftover
        start, end = 0, len(leftover)
        parse_first = end > 0  # the handshake may have read the first requests already
        batches = 0
        with self._read_scope:
            while not self.closing and not self.broken:
                if not parse_first:
                    try:
                        n = sock.recv_into(buf.view[end:])
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(sock)
                        continue
                    except OSError:
                        return
                    if n == 0:
                        return
                    end += n
                parse_first = False
                reqs, used, need = parser.parse(buf.view[start:end])
                start += used
                if reqs:
                    done = self.handle_batch(reqs, buf)
                    while done < len(reqs) and not self.broken:
                        # One recv can hold thousands of 32 MiB reads: answer them an outbox at a time.
                        self.send_now()
                        await self._outbox_room()
                        done += self.handle_batch(reqs[done:], buf)
                self.send_now()
                # Make room for the next request without touching bytes that ops still hold.
                if start == end:
                    if not buf.pins:
                        start = end = 0
                    elif len(buf.data) - end < KEEP_FILLING:
                        buf = self._current = self._new_buffer(BUF_SIZE)
                        start = end = 0
                    # else: go on filling behind the pinned bytes (a mirror pins every batch until
                    # the replica acks it; a fresh buffer per batch would be an mmap and page faults)
                elif len(buf.data) - start < need or len(buf.data) - end < 65536:
                    size = max(need, BUF_SIZE)
                    nxt = buf
                    if buf.pins or len(buf.data) < size:
                        nxt = self._new_buffer(size)
                        if len(nxt.data) < size:
                            nxt = Buffer(size)
                    partial = bytes(buf.view[start:end])
                    nxt.view[:len(partial)] = partial
                    buf = self._current = nxt
                    start, end = 0, len(partial)
                batches += 1
                if self.out_bytes + self.reading > OUTBOX_LIMIT:
                    await self._outbox_room()
                elif batches % CHECKPOINT_EVERY == 0:
                    await trio.lowlevel.checkpoint()

    async def _outbox_room(self) -> None:
        while self.out_bytes + self.reading > OUTBOX_LIMIT and not self.broken:
            self._drained = trio.Event()
            await self._drained.wait()

    def stop_reading(self) -> None:
        self.closing = True
        self._read_scope.cancel()

    async def finish(self) -> None:
        """After reading stops: let in-flight ops finish and their replies leave."""
        while self.inflight:
            await self._idle.wait()
        self.send_now()
        with trio.move_on_after(5):
            while self.outbox and not self.broken:
                self._drained = trio.Event()
                await self._drained.wait()


class NBDServer:
    """Serves exports looked up by name; ``serve`` runs one listener."""

    def __init__(self, lookup: Callable[[str], Export | None], names: Callable[[], list[str]], workers: int = 4) -> None:
        self.lookup = lookup
        self.names = names
        self.pool = WorkerPool(workers)
        self.connections: set[Connection] = set()
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
            host, bound = lsock.getsockname()[:2]
            addr = f"tcp:{'[' + host + ']' if ':' in host else host}:{bound}"
        lsock.listen(128)
        lsock.setblocking(False)
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
                            log.warning("accept failed: %s", e)
                            await trio.sleep(0.05)
                            continue
                        nursery.start_soon(self._client, conn)
        finally:
            lsock.close()

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

    async def _client(self, sock: socket.socket) -> None:
        self._active += 1
        self.total_connections += 1
        self._none_active = trio.Event() if self._none_active.is_set() else self._none_active
        conn: Connection | None = None
        try:
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            neg = None
            with trio.CancelScope() as scope:  # drain() ends handshakes still in progress
                self._handshakes.add(scope)
                if self.draining:
                    scope.cancel()
                try:
                    neg = await self._handshake(sock)
                finally:
                    self._handshakes.discard(scope)
            if neg is None or self.draining:
                return
            export = self.lookup(neg.export.name)
            if export is None:
                return
            conn = Connection(self, sock, export, neg)
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
        except Exception:  # noqa: BLE001 - one broken client must never take the server down
            log.exception("NBD connection failed")
        finally:
            if conn is not None:
                self.connections.discard(conn)
            sock.close()
            self._active -= 1
            if self._active == 0:
                self._none_active.set()

    async def _handshake(self, sock: socket.socket) -> Negotiated | None:
        hs = ServerHandshake(self._info, self.names)
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            await _send_all(sock, hs.data_to_send())
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if not data:
                    return None
                result = hs.receive_data(data)
                await _send_all(sock, hs.data_to_send())
                if isinstance(result, Negotiated):
                    return result
                if isinstance(result, Closed):
                    log.info("NBD handshake closed: %s", result.reason)
                    return None
        log.info("NBD handshake timed out")
        return None

    def statistics(self) -> dict[str, int]:
        return {"connections": len(self.connections), "total_connections": self.total_connections}

    def close(self) -> None:
        self.pool.close()


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[n:]


__all__ = ["Export", "NBDServer"]
