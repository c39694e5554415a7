"""One NBD client in the transmission phase: the batched receive loop, dispatch, and replies.

Hot path (see ../shared DESIGN.md for the measurements behind it): one non-blocking ``recv_into`` into
a large preallocated buffer takes everything queued; the complete requests in it are parsed at once
(at most ``Limits.batch`` per pass); small reads and writes run inline against the op table; big
writes, FUA writes and flushes go to a few plain worker threads as zero-copy slices of the buffer
(which stays pinned until they finish); all replies of a batch leave in one ``sendmsg``. Trio is
awaited only when a socket would block.

Bounds (``limits.py``), checked once per batch: queued reply bytes *and* pieces (a flood of tiny
reads is millions of small objects long before it is 64 MiB), ops still running, and the volume's
``WriteBudget`` of write bytes in flight. Over any of them the connection stops reading (the client's
sends block: back-pressure) until its replies drain or its writes finish. Reply bytes are also checked
per request, because one batch can ask for thousands of 32 MiB reads.
"""
from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..backend import Backend, Completion
from ..errors import FastZeroUnsupported, to_errno
from ..tls import TlsChannel
from . import proto as P
from .handshake import Negotiated
from .limits import Limits, WriteBudget
from .pool import Buffer
from .transmission import (
    RequestParser,
    block_status_reply,
    error_reply,
    read_reply_header,
    simple_reply,
    validate,
)

if TYPE_CHECKING:
    from .server import Export, NBDServer

log = logging.getLogger("blockdev.nbd")

BUF_SIZE = 16 << 20
BIG_WRITE = 128 << 10  # writes at least this big go to a worker thread
BIG_READ = 256 << 10  # and reads
KEEP_FILLING = 4 << 20  # a pinned buffer with this much room left keeps receiving after its pinned bytes
IOV_MAX = 1024
CHECKPOINT_EVERY = 8  # batches between explicit trio checkpoints, so other tasks run under load


@dataclass(frozen=True)
class ConnectionStats:
    """What one connection holds now (``Connection.statistics()``)."""

    export: str
    requests: int
    queued_replies: int  # reply pieces waiting for the client to read them
    queued_bytes: int
    inflight: int  # ops still running (workers, Completions)
    waiting: bool  # reading is stopped until replies drain or writes finish
    pauses: int  # how often reading stopped for a bound


class Connection:
    """One client in the transmission phase."""

    def __init__(self, server: NBDServer, sock: socket.socket | TlsChannel, export: Export, neg: Negotiated,
                 budget: WriteBudget, limits: Limits) -> None:
        self.server = server
        self.budget = budget
        self.limits = limits
        self._reply_bytes = limits.reply_bytes
        self.sock = sock  # or a TLS channel: the same recv_into/sendmsg/fileno
        self._tls = sock if isinstance(sock, TlsChannel) else None
        self.export = export
        self.backend = export.backend
        self._error_log = server.op_error_log(export.name)
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
        self.waiting = False
        self.pauses = 0

    def statistics(self) -> ConnectionStats:
        return ConnectionStats(self.export.name, self.requests, len(self.outbox), self.out_bytes, self.inflight,
                               self.waiting, self.pauses)

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
        if self._tls is not None and not self.outbox and not self._blocked and not self.broken:
            try:  # the last records may wait for the socket: the writer finishes them
                if not self._tls.flush():
                    self._blocked = True
                    self._writer_wake.set()
                    return
            except OSError:
                self.broken = True
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
                read: tuple[int, bytearray] | None = None, held: int = 0) -> None:
        """Trio thread: an op that left the batch finished (``read``: offset and data of a READ;
        ``held``: write bytes it had taken from the volume's budget)."""
        if buf is not None:
            buf.pins -= 1
            if buf.pins == 0 and len(self._pool) < 2 and buf is not self._current:
                self._pool.append(buf)
        if held:
            self.budget.give(held)
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

    def _done_from_any_thread(self, cmd: int, handle: int, buf: Buffer | None,
                              held: int) -> Callable[[Any, BaseException | None], None]:
        def done(result: Any, exc: BaseException | None) -> None:
            if exc is None and isinstance(result, Completion):
                result.add_done_callback(lambda e: self._call_in_trio(self._finish, cmd, handle, buf, e, None, held))
                return
            self._call_in_trio(self._finish, cmd, handle, buf, exc, None, held)
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
            self._error_log(logging.WARNING, "%s on %s failed: %s", P.CMD_NAMES.get(cmd, cmd), self.export.name, exc)

    # -- requests -------------------------------------------------------------------------------
    def handle_batch(self, reqs: list[tuple], buf: Buffer) -> int:
        """Handle requests in order; returns how many, stopping early once ``reply_bytes`` of replies wait.

        Each run of small inline writes is plugged (BATCH_OPS): a mirror sends the run's replica frames
        before its local pwrites. Anything else unplugs first, so it sees those writes done locally.
        """
        backend = self.backend
        limit = self._reply_bytes
        plugged = False
        try:
            for i, (cmd, flags, handle, offset, length, payload, perr) in enumerate(reqs):
                if self.out_bytes + self.reading > limit:
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
                    self._offload(cmd, handle, buf, backend.pwrite, (payload, offset, fua), held=length)
                else:
                    self._result(cmd, handle, buf, backend.pwrite(payload, offset, False), length)
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

    def _result(self, cmd: int, handle: int, buf: Buffer, result: Any, length: int) -> None:
        """An inline write returned: reply now, or when its Completion finishes."""
        if result is None or (result.done and result.exception is None):
            self._queue(simple_reply(handle))
            return
        if result.done:
            raise result.exception  # type: ignore[misc]
        # Someone (the mirror) still holds the payload: keep the buffer pinned until it is done.
        buf.pins += 1
        self._op_started()
        self.budget.take(length)
        result.add_done_callback(lambda e: self._call_in_trio(self._finish, cmd, handle, buf, e, None, length))

    def _op_started(self) -> None:
        """An op left the batch; finish() waits for ``_idle`` until every such op is done."""
        self.inflight += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _offload(self, cmd: int, handle: int, buf: Buffer | None, fn: Callable[..., Any], args: tuple,
                 held: int = 0) -> None:
        if buf is not None:
            buf.pins += 1
        self._op_started()
        if held:
            self.budget.take(held)
        self.server.pool.submit(fn, args, self._done_from_any_thread(cmd, handle, buf, held))

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
        batch = self.limits.batch
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
                reqs, used, need = parser.parse(buf.view[start:end], batch)
                start += used
                # A full batch may leave complete requests in the buffer: parse again before receiving.
                parse_first = len(reqs) >= batch
                if reqs:
                    done = self.handle_batch(reqs, buf)
                    while done < len(reqs) and not self.broken:
                        # One recv can hold thousands of 32 MiB reads: answer them an outbox at a time.
                        self.send_now()
                        await self._room()
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
                elif not parse_first and (len(buf.data) - start < need or len(buf.data) - end < 65536):
                    # (Not while complete requests remain to parse: moving them each pass would copy
                    # up to a buffer per batch.)
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
                if self._over():
                    await self._room()
                elif batches % CHECKPOINT_EVERY == 0:
                    await trio.lowlevel.checkpoint()

    def _over(self) -> bool:
        """Once per batch: must reading stop until replies drain or ops finish?"""
        lim = self.limits
        return (self.out_bytes + self.reading > self._reply_bytes or len(self.outbox) > lim.reply_parts
                or self.inflight > lim.inflight or self.budget.used >= self.budget.cap)

    async def _room(self) -> None:
        """Stop reading (the client's sends block) until every bound is met again."""
        lim = self.limits
        self.waiting = True
        self.pauses += 1
        try:
            while not self.broken:
                if (self.out_bytes + self.reading > self._reply_bytes or len(self.outbox) > lim.reply_parts
                        or self.inflight > lim.inflight):
                    # Set when the outbox empties (send_now); every finishing op schedules a send.
                    self._drained = trio.Event()
                    await self._drained.wait()
                elif self.budget.full():
                    await self.budget.room()
                else:
                    return
        finally:
            self.waiting = False

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
