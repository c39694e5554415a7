"""Lock-step (synchronous) replication: a host write is acknowledged once the local volume and the
replica both have it (DRBD protocol C).

Shape (DESIGN.md, "The sync mirror: what was measured"): ``on_write`` (any thread) assigns a sequence
number and appends the frame to a coalesced outbox under one lock, then schedules a single send on
the trio thread; the local write runs meanwhile. A receiver task parses cumulative Acks in batches
and finishes the pending entries they cover. No thread crossing per write, no round trip beyond the
ack itself.

On link loss every unacknowledged write is marked dirty; ``degrade`` completes host writes locally,
``block`` holds them until in sync again (or EIO after a timeout). A resync task sends the dirty
regions (an initial sync marks all allocated ones), read under the outbox lock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import trio
import trio.lowlevel

from blockdev.backend import Backend, Completion, WriteResult, wait
from blockdev.errors import BlockError
from blockdev.nbd.limits import RateLimited

from .base import Marking, MirrorState, ping_period
from .dirty import ActivityLog, DirtyMap
from .hold import HeldWrites
from .records import Pairing, SyncConfig, VolumeIdentity
from .resync import chunk, mark_allocated, read_frames
from .seal import DISCARD_REPLICA, SPLIT_BRAIN
from .secure import open_link
from .status import SyncStatus
from .verify import compare
from .wire import Connection, PeerSilent, RemoteProtocolError, Role, WireError
from .wire.codec import (
    F_FUA,
    MAX_PAYLOAD,
    T_WRITE,
    encode_checkpoint,
    encode_flush,
    encode_ping,
    encode_write,
    encode_zero,
    frame_header,
)
from .wire.events import PROTOCOL_VERSION, Ack, Bye, HashQuery, HashReply, Hello, Welcome
from .wire.link import Link, Outbox

log = logging.getLogger("vdisk.mirror")
RETRY_LOG_EVERY = 300.0  # seconds between repeats of a failing connect's log line
HOST, RESYNC, FLUSH = 0, 1, 2
# A sync checkpoint costs the target a handful of fsyncs (history.py): at most one a second, at the
# first host flush after it (a host flushing 100 times a second would otherwise pay them each time).
SYNC_CHECKPOINT_EVERY = 1.0
EAGER_SEND = 1 << 20  # queued bytes after which the trio thread sends without waiting for its batch


class _Entry:
    """One frame in flight. ``ticket``: the activity-log admission this frame ends when acknowledged
    (the last frame of an op carries it; the others None), so every admission ends exactly once."""

    __slots__ = ("completion", "kind", "length", "offset", "seq", "ticket")

    def __init__(self, seq: int, completion: Completion | None, offset: int, length: int, kind: int,
                 ticket: tuple[int, int] | None) -> None:
        self.seq, self.completion, self.offset, self.length = seq, completion, offset, length
        self.kind, self.ticket = kind, ticket


class SyncReplicator(SyncStatus, Marking):
    """The Replicator behind MirrorLayer for ``--mode sync``. Start ``run`` in a nursery.

    ``dirty``, ``al`` and ``held`` are the volume's MirrorState (mirror/base.py), shared with the
    replicator before and after this one."""

    mode = "sync"
    releases = True

    def __init__(self, config: SyncConfig, ident: VolumeIdentity, image: Backend, dirty: DirtyMap,
                 al: ActivityLog, pairing: Pairing, save_pairing: Callable[[Pairing], None] = lambda p: None,
                 held: HeldWrites | None = None) -> None:
        super().__init__(MirrorState(dirty, al, HeldWrites(config.block_timeout) if held is None else held))
        self.config, self.ident, self.image, self.pairing = config, ident, image, pairing
        self.on_link_loss = config.on_link_loss
        self._held.timeout = config.block_timeout
        self._save_pairing = save_pairing
        self.outbox = Outbox()
        self._lock = self.outbox.lock  # one lock: sequence numbers, wire order and pending agree
        self._link: Link | None = None
        self._closed = False  # replaced: ops that land from now on are resent by the successor
        self._pending: deque[_Entry] = deque()
        self._local: dict[tuple[int, int], int] = {}  # ops admitted, local half not landed: (offset, length) -> count
        self._late: dict[tuple[int, int], int] = {}  # of those, acked ones: tickets end on landing
        self._seq = 0
        self._acked = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread = -1
        self._kick_scheduled = False
        self._holder = 0  # the thread with a batch open (hold .. push): its frames wait for push
        self._send_event = trio.Event()
        self._ack_event = trio.Event()
        self._dirty_event = trio.Event()
        self._resync_idle = False  # the resync task waits for new dirty bits (wake it on a mark)
        self._send_error: BaseException | None = None
        self._resync_inflight = 0
        # The target keeps history for sync sessions (Welcome.sync_checkpoints): a Checkpoint frame
        # follows a host flush while the replica is consistent (in sync, nothing dirty).
        self._sync_cps = False
        self._cp_next = 1
        self._cp_last = -SYNC_CHECKPOINT_EVERY  # monotonic time of the last one
        self.last_checkpoint = 0
        self._hash_waiters: dict[int, tuple[trio.Event, list[bytes]]] = {}
        self._verify_first: str | None = None  # replica id to pair with once a Merkle compare is done
        self._next_req = 0
        self._last_rx = 0.0
        self._retry_log = RateLimited(log, RETRY_LOG_EVERY)
        self._ping_sent: float | None = None  # when the unanswered keep-alive left
        self.rtt: float | None = None  # seconds, of the last keep-alive
        self.state = "disconnected"
        self.last_error: str | None = None
        self.connects = 0
        self.resync_bytes_sent = 0
        self.resync_regions_sent = 0
        self.conflicts = 0  # ops that overlapped a local write still landing (resent by resync)
        self.acked_bytes = 0  # write/zero/resync bytes the replica acknowledged (metrics: shipped)

    # -- the Replicator protocol (any thread) ----------------------------------------------------
    def admit(self, offset: int, length: int) -> WriteResult:  # type: ignore[override]
        """Register the op as landing *before* it is issued (a fast zero's local half runs before
        its frame is queued), then admit its extents to the activity log (see Replicator.admit)."""
        key = (offset, length)
        with self._lock:
            local = self._local
            if local and self._overlaps_landing_locked(offset, length):
                self._conflict_locked(offset, length)
            local[key] = local.get(key, 0) + 1
        gate = self.al.admit(offset, length)
        if gate is not None:  # the log write failed: nothing was admitted, nothing will land
            gate.add_done_callback(lambda exc: exc is None or self.landed([key]))
        return gate

    def withdraw(self, offset: int, length: int) -> None:
        self.landed([(offset, length)])
        self.al.end(offset, length)

    def on_write(self, offset: int, data: memoryview | bytes, fua: bool,
                 done: Completion | None = None) -> WriteResult:
        # The hot path of every host write: kept to one lock, no per-write allocations beyond the
        # header and the pending entry (the caller passes the host's two-part Completion).
        n = len(data)
        c = done if done is not None else Completion()
        with self._lock:
            if self._link is None:
                return self._unsent(offset, n)
            outbox = self.outbox
            queued = outbox.bytes
            if n <= MAX_PAYLOAD:
                seq = self._seq = self._seq + 1
                # Zero-copy: the front end keeps ``data`` alive until the Completion finishes (the
                # NBD server pins its receive buffer), and a frame is sent or dropped before that.
                outbox.put_pair_locked(frame_header(T_WRITE, data, F_FUA if fua else 0, seq, offset), data)
                self._pending.append(_Entry(seq, c, offset, n, HOST, (offset, n)))
            else:
                view = memoryview(data)
                for pos in range(0, n, MAX_PAYLOAD):
                    self._seq += 1
                    last = pos + MAX_PAYLOAD >= n
                    outbox.put_locked(encode_write(self._seq, offset + pos, view[pos:pos + MAX_PAYLOAD], fua))
                    self._pending.append(_Entry(self._seq, c if last else None, offset + pos,
                                                min(MAX_PAYLOAD, n - pos), HOST, (offset, n) if last else None))
        # Frames of one host batch leave together (measured: sending the first frame of a batch at
        # once splits the pipeline into small waves and doubles the CPU per write on both sides):
        # at the batch's push() when one is open (hold), else once the front end yields. A very
        # large batch starts going out early.
        me = threading.get_ident()
        if me == self._trio_thread:
            if queued >= EAGER_SEND:
                self._send_direct()
            elif me != self._holder:
                self._send_event.set()
        else:
            self._kick()
        return c

    def on_zero(self, offset: int, length: int, fua: bool, trim: bool) -> WriteResult:
        with self._lock:
            if self._link is None:
                return self._unsent(offset, length)
            self._seq += 1
            c = Completion()
            self.outbox.put_locked([encode_zero(self._seq, offset, length, fua, trim)])
            self._pending.append(_Entry(self._seq, c, offset, length, HOST, (offset, length)))
        self._kick()
        return c

    def on_flush(self) -> WriteResult:
        with self._lock:
            if self._link is None:
                c = self._held.hold() if self.on_link_loss == "block" else None
            else:
                self._seq += 1
                c = Completion()
                self.outbox.put_locked([encode_flush(self._seq)])
                self._pending.append(_Entry(self._seq, c, 0, 0, FLUSH, None))
                if (self._sync_cps and self.state == "in_sync" and not self.dirty.count and not self._resync_inflight
                        and time.monotonic() - self._cp_last >= SYNC_CHECKPOINT_EVERY):
                    self._cp_last = time.monotonic()
                    # Every write before this flush is ahead of it on the wire, in order: the
                    # replica at this point is the source as of the flush.
                    self._seq += 1
                    self.outbox.put_locked([encode_checkpoint(self._seq, self._cp_next, time.time_ns())])
                    self._pending.append(_Entry(self._seq, None, 0, 0, FLUSH, None))
                    self.last_checkpoint = self._cp_next
                    self._cp_next += 1
        if c is None:
            self.dirty.save()  # what the replica lacks is durable before the host's flush returns
            return None
        self._kick()
        return c

    def local_done(self, offset: int, length: int, ok: bool) -> None:
        if not ok:  # the replica may now hold what the volume does not: resync resends the volume's data
            self.dirty.mark(offset, length)  # before landed() may end the op's ticket (see there)
        self.landed([(offset, length)])

    def landed(self, ranges: list[tuple[int, int]]) -> None:
        # Any mark comes before a ticket ends: once its extent may leave the activity log (the map is
        # saved first), the bit must be in the map, or a crash in between records the range nowhere.
        if self._closed:  # the successor's resync may have read the range before this op landed
            for offset, length in ranges:
                self.dirty.mark(offset, length)
        local, late, tickets = self._local, self._late, []
        with self._lock:
            for key in ranges:
                left = local.pop(key, 1) - 1
                if left:
                    local[key] = left
                if late and late.get(key, 0) > left:  # an acked op of this range has landed now
                    late[key] -= 1
                    if not late[key]:
                        del late[key]
                    tickets.append(key)
        if tickets:
            self.al.end_many(tickets)

    def _overlaps_landing_locked(self, offset: int, length: int) -> bool:
        end = offset + length
        return any(o < end and offset < o + n for o, n in self._local)

    def _conflict_locked(self, offset: int, length: int) -> None:
        """This op overlaps one still landing: the two may land locally in another order than their
        frames apply on the replica. The range is resent from the volume once all there landed (the
        frame still goes: the host's ack keeps meaning "the replica has this write")."""
        self.conflicts += 1
        self.dirty.mark(offset, length)  # wakes the resync (on_mark)

    def _wake_resync(self) -> None:
        """DirtyMap.on_mark (any thread): a new dirty bit wakes a resync that waits for one; one
        crossing into trio at most per wait, and none while the resync runs (it will see the bit)."""
        if not self._resync_idle:
            return
        self._resync_idle = False
        if threading.get_ident() == self._trio_thread:
            self._dirty_event.set()
        elif self._token is not None:
            try:
                self._token.run_sync_soon(self.request_resync)
            except trio.RunFinishedError:
                pass

    # -- sending (trio thread) -------------------------------------------------------------------
    def _kick(self) -> None:
        """Get the outbox sent soon: from the trio thread by waking the sender task (it runs once the
        current task yields, no syscall); from another thread with one run_sync_soon per batch."""
        if threading.get_ident() == self._trio_thread:
            self._send_event.set()
            return
        if self._kick_scheduled or self._token is None:
            return
        self._kick_scheduled = True
        try:
            self._token.run_sync_soon(self._send_now)
        except trio.RunFinishedError:
            pass

    def _send_now(self) -> None:
        self._kick_scheduled = False
        self._send_direct()

    def hold(self) -> None:
        self._holder = threading.get_ident()

    def push(self) -> None:
        """Send the queued frames now (the front end is about to do its local writes): on the trio
        thread one non-blocking sendmsg, elsewhere the usual single hop per batch."""
        self._holder = 0
        if threading.get_ident() == self._trio_thread:
            self._send_direct()
        else:
            self._kick()

    def _send_direct(self) -> None:
        link = self._link
        if link is None:
            return
        try:
            if link.send_some():
                return
        except OSError as e:
            self._send_error = e
        self._send_event.set()

    async def _sender(self, link: Link) -> None:
        while True:
            await self._send_event.wait()
            self._send_event = trio.Event()
            if self._send_error is not None:
                err, self._send_error = self._send_error, None
                raise RemoteProtocolError(f"link to {link.peer} failed: {err}")
            await link.drain()

    def _send_control(self, frames: list[bytes]) -> None:
        with self._lock:
            self.outbox.put_locked(frames)
        self._kick()

    # -- receiving (trio thread) -----------------------------------------------------------------
    async def _receiver(self, link: Link) -> None:
        while True:
            with trio.move_on_after(self.config.timeout) as scope:
                events = await link.receive()
            if scope.cancelled_caught:
                raise PeerSilent(f"target {link.peer} went silent for {self.config.timeout:g}s")
            self._last_rx = time.monotonic()
            if self._ping_sent is not None:  # a Ping goes out only after a silent second: this is its Ack
                self.rtt = self._last_rx - self._ping_sent
                self._ping_sent = None
            acked = -1
            for ev in events:
                if type(ev) is Ack:
                    acked = ev.seq
                elif isinstance(ev, HashReply):
                    waiter = self._hash_waiters.pop(ev.req, None)
                    if waiter is not None:
                        waiter[1].append(ev.digests)
                        waiter[0].set()
                elif isinstance(ev, Bye):
                    raise RemoteProtocolError(f"target {link.peer} closed the link")
            if acked >= 0:
                self._on_ack(acked)

    def _on_ack(self, seq: int) -> None:
        done: list[_Entry] = []
        with self._lock:
            if seq > self._seq:
                raise RemoteProtocolError(f"target acknowledged seq {seq}, but only {self._seq} were sent")
            pending = self._pending
            while pending and pending[0].seq <= seq:
                done.append(pending.popleft())
            self.acked_bytes += sum(e.length for e in done)
            self._acked = max(self._acked, seq)
            local, late, tickets = self._local, self._late, []
            for e in done:
                t = e.ticket
                # Local half maybe still landing: the extent stays logged until it has (see _late).
                if t is not None and (t not in local or local[t] <= late.get(t, 0)):
                    tickets.append(t)
                elif t is not None:
                    late[t] = late.get(t, 0) + 1
        self.al.end_many(tickets)
        for e in done:
            if e.kind == RESYNC:
                self._resync_inflight -= e.length
            elif e.completion is not None:
                e.completion.finish()
        self._ack_event.set()

    async def _keepalive(self, link: Link) -> None:
        token = 0
        period, quiet = ping_period(self.config.keepalive, self.config.timeout)
        while True:
            await trio.sleep(period)
            if time.monotonic() - self._last_rx >= quiet:
                token += 1
                self._ping_sent = time.monotonic()
                self._send_control([encode_ping(token)])

    # -- sessions --------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, sync, mirror; on link loss degrade (or block) and reconnect with backoff. Forever."""
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self.dirty.on_mark = self._wake_resync  # the shared map: this replicator resyncs from now on
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._held.expire_forever)
            task_status.started()
            backoff = self.config.backoff_min
            try:
                while True:
                    started = time.monotonic()
                    try:
                        await self._session()
                    except (WireError, OSError) as e:
                        self.last_error = str(e)
                        if getattr(e, "code", None) == SPLIT_BRAIN:
                            await self._split_brain(str(e).removeprefix("peer: "))
                        # Once, then every few minutes with a count (a target down for hours is one line
                        # per RETRY_LOG_EVERY, not one per backoff); a new error, or the first failure
                        # after a success, is logged at once.
                        self._retry_log(logging.WARNING, "mirror %s -> %s:%s: %s", self.ident.name,
                                        self.config.host, self.config.port, e, key=str(e))
                    except Exception as e:  # a bug here must not stop the volume being served
                        # The session's writes are in the dirty map (_link_down); reconnect and resync.
                        self.last_error = f"internal error: {e!r}"
                        log.exception("mirror %s: internal error", self.ident.name)
                    if time.monotonic() - started > 10 * backoff:
                        backoff = self.config.backoff_min
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.config.backoff_max)
            finally:
                self._link_down()
                nursery.cancel_scope.cancel()

    async def _session(self) -> None:
        conn = Connection(Role.SOURCE, self.config.psk)
        link = await open_link(self.config, conn)
        self.outbox.clear()
        link.outbox = self.outbox  # the sender task drains the outbox that on_write fills
        try:
            caps = ((DISCARD_REPLICA,) if self.pairing.discard_replica else ()) + self.ident.caps()
            conn.start(Hello(PROTOCOL_VERSION, self.ident.uuid, self.ident.name, self.ident.size,
                             self.ident.block_size, self.ident.generation, b"", "sync", caps))
            await link.send_control()
            with trio.move_on_after(self.config.timeout) as scope:
                events = await link.receive()
            if scope.cancelled_caught:
                raise PeerSilent(f"target {link.peer} did not complete the handshake")
            welcome = events[0]
            if not isinstance(welcome, Welcome):
                raise RemoteProtocolError(f"expected Welcome, got {type(welcome).__name__}")
            self._pair(welcome)
            self._last_rx = time.monotonic()
            with self._lock:
                self._sync_cps = bool(getattr(welcome, "sync_checkpoints", False))
                self._cp_next = max(self._cp_next, int(getattr(welcome, "checkpoint", 0) or 0) + 1)
                self._seq = self._acked = 0
                self._link = link
            self.connects += 1
            self._retry_log = RateLimited(log, RETRY_LOG_EVERY)
            self._ping_sent = None  # one of the last link's would time this one
            self.last_error = None
            self.state = "syncing"
            log.info("mirror %s: connected to %s (replica %s)", self.ident.name, link.peer, welcome.replica_name)
            errors: list[BaseException] = []
            async with trio.open_nursery() as nursery:
                for fn in (self._receiver, self._sender, self._keepalive, self._resync):
                    nursery.start_soon(self._guard, fn, link, nursery.cancel_scope, errors)
            if errors:
                raise errors[0]
        finally:
            self._link_down()
            with trio.CancelScope(shield=True):
                await link.close()

    @staticmethod
    async def _guard(fn: Callable[[Link], Any], link: Link, scope: trio.CancelScope,
                     errors: list[BaseException]) -> None:
        try:
            await fn(link)
        except (WireError, OSError) as e:
            errors.append(e)
            scope.cancel()

    def _pair(self, welcome: Welcome) -> None:
        if self.pairing.split_brain is not None:  # the operator resolved it (or the target forgot it)
            self.pairing = replace(self.pairing, split_brain=None)
            self._save_pairing(self.pairing)
        p = self.pairing
        self._verify_first = None
        if welcome.created:
            # A brand-new (sparse) replica: copy every allocated region (the rest is zero on both).
            mark_allocated(self.image, self.ident.size, self.dirty)
            self.pairing = Pairing(welcome.replica_id, False, self.dirty.dirty_bytes)
            self._save_map_first()
            self._save_pairing(self.pairing)
        elif welcome.replica_id != p.replica_id or welcome.verify:
            # An existing replica we did not fill (restored from elsewhere, or paired before a
            # --stop), or one that may have changed without us (the target says so: it died
            # mid-session, or --discard-replica after a split brain): compare Merkle trees first
            # and resend only the blocks that differ.
            self._verify_first = welcome.replica_id

    async def _split_brain(self, message: str) -> None:
        """The target refuses: its replica was written outside the mirror. Leave the pair
        disconnected (writes go on here, marked dirty) until the operator reconfigures the mirror
        (`vdisk mirror NAME --discard-replica` starts a new replicator)."""
        self.state, self.last_error = "split_brain", message
        if self.pairing.split_brain != message:
            self.pairing = replace(self.pairing, split_brain=message)
            self._save_pairing(self.pairing)
        log.error("mirror %s -> %s:%s: %s", self.ident.name, self.config.host, self.config.port, message)
        await trio.sleep_forever()

    def _save_map_first(self) -> None:
        """Before a pairing that relies on the map is saved (else a crash loses what the replica lacks)."""
        if not self.dirty.save(force=True):
            raise OSError(self.dirty.save_error)

    def _link_down(self) -> None:
        """Every unacknowledged frame is marked dirty (for whichever replicator resyncs next), the
        map saved, then their activity-log tickets end; held host writes complete or wait."""
        with self._lock:
            if self._link is None and not self._pending:
                return
            self._link = None
            self.outbox.clear_locked()
            lost, self._pending = list(self._pending), deque()
            for e in lost:
                if e.kind != FLUSH:
                    self.dirty.mark(e.offset, e.length)
            held = [e.completion for e in lost if e.kind != RESYNC and e.completion is not None]
            if self.on_link_loss == "block":
                self._held.add(held)
                held = []
        self._resync_inflight = 0
        self._resync_idle = False
        for event, _box in self._hash_waiters.values():  # a verify in progress fails now, not in 60 s
            event.set()
        self._hash_waiters.clear()
        self.state = "degraded" if self.connects else "disconnected"
        self.dirty.save()  # on failure logged by the map and retried; the log keeps the extents meanwhile
        self.al.end_many([e.ticket for e in lost if e.ticket is not None])
        for c in held:
            c.finish()

    # -- resync ----------------------------------------------------------------------------------
    def request_resync(self) -> None:
        """Dirty bits were added from outside (verify --repair): wake the resync task."""
        self._dirty_event.set()

    async def _resync(self, link: Link) -> None:
        if self._verify_first is not None:
            report = await compare(self.image, self.ident.size, self.dirty.region, self.query_hashes)
            for b in report.differing_blocks:
                self.dirty.mark_region(b)
            self._save_map_first()
            self.pairing = Pairing(self._verify_first, False, self.dirty.dirty_bytes)
            self._save_pairing(self.pairing)
            self._verify_first = None
            log.info("mirror %s: existing replica differs in %d blocks", self.ident.name, len(report.differing_blocks))
        cursor = 0
        saved = time.monotonic()
        while True:
            if time.monotonic() - saved > 1.0:
                # Progress survives a crash: bits cleared for frames still in flight are covered by
                # their extents in the activity log, which a restart marks dirty again.
                await trio.to_thread.run_sync(self.al.clear)  # saves the map, then drops idle extents
                saved = time.monotonic()
            r = self.dirty.next_set(cursor)
            if r is None:
                if self.dirty.count:  # regions skipped while local writes landed: go round again
                    cursor = 0
                    await trio.sleep(0.001)
                    continue
                await self._wait_acked()
                if self.dirty.count:
                    continue
                self._reach_in_sync()
                self._dirty_event = trio.Event()
                self._resync_idle = True  # from here a mark wakes us (_wake_resync)...
                if not self.dirty.count:  # ...and one made just before is seen here
                    await self._dirty_event.wait()
                self._resync_idle = False
                self.state = "syncing"
                cursor = 0
                continue
            first, last, offset, length = chunk(self.dirty, r, self.config.resync_chunk, self.ident.size)
            # One admission (ticket) for the chunk, ended once: by its last frame's ack, or here.
            await wait(self.al.admit(offset, length))  # the log write must not stall the trio thread
            cursor = self._send_chunk(first, last, offset, length)
            while self._resync_inflight > self.config.resync_window:
                self._ack_event = trio.Event()
                await self._ack_event.wait()
            await trio.lowlevel.checkpoint()  # let the front ends run between chunks

    async def _wait_acked(self) -> None:
        while True:
            with self._lock:
                if not self._pending or all(e.kind != RESYNC for e in self._pending):
                    return
            self._ack_event = trio.Event()
            await self._ack_event.wait()

    def _reach_in_sync(self) -> None:
        # Logged once by the daemon's watch (vdisk/events.py), with the bytes resent and the time taken.
        self.state = "in_sync"
        if not self.pairing.initial_sync_done:
            self.pairing = Pairing(self.pairing.replica_id, True, self.pairing.sync_total)
            self._save_pairing(self.pairing)
        # The activity log keeps its hot extents (as DRBD's does): clearing them here would cost an
        # fdatasync on the next write to each, in the host's latency.
        self.dirty.save()
        self._held.release()

    def _send_chunk(self, first: int, last: int, offset: int, length: int) -> int:
        """Read and queue a chunk (its extents admitted to the activity log); the next cursor."""
        d = self.dirty
        end = offset + length
        with self._lock:
            if self._link is None or any(o < end and offset < o + n for o, n in self._local):
                # Link gone, or a write is landing there (the chunk is read once it has landed).
                self.al.end(offset, length)
                return last + 1
            for r in range(first, last + 1):
                d.clear_region(r)
            frames = read_frames(self.image, offset, length)
            sent = 0
            for i, (f_off, f_len, payload) in enumerate(frames, 1 - len(frames)):
                self._seq += 1
                if payload is None:
                    self.outbox.put_locked([encode_zero(self._seq, f_off, f_len, False, True)])
                else:
                    self.outbox.put_locked(encode_write(self._seq, f_off, payload))
                    sent += f_len
                self._pending.append(_Entry(self._seq, None, f_off, f_len, RESYNC, None if i else (offset, length)))
                self._resync_inflight += f_len
            if not frames:
                self.al.end(offset, length)
        self.resync_bytes_sent += sent
        self.resync_regions_sent += last + 1 - first
        self._kick()
        return last + 1

    # -- verify (see verify.py) ------------------------------------------------------------------
    async def query_hashes(self, leaf_size: int, level: int, indices: list[int]) -> bytes:
        """The target's Merkle digests for ``indices`` at ``level`` (16 bytes each)."""
        if self._link is None:
            raise RemoteProtocolError("the mirror is not connected")
        from .wire.codec import encode

        self._next_req += 1
        req = self._next_req
        event, box = trio.Event(), []
        self._hash_waiters[req] = (event, box)
        self._send_control([encode(HashQuery(req, leaf_size, level, tuple(indices)))])
        with trio.move_on_after(max(60.0, self.config.timeout)) as scope:
            await event.wait()
        if scope.cancelled_caught or not box or len(box[0]) != 16 * len(indices):
            self._hash_waiters.pop(req, None)
            raise PeerSilent("the target did not answer a verify query")
        return box[0]

    def close(self, fail_held: bool = True) -> None:
        """Stop (after the run task was cancelled): unacknowledged writes are marked, the map saved.
        Held writes fail (``block``: acknowledged only once the replica has it, which it never will
        now) unless a successor takes them over (``fail_held=False``: a reconfiguration)."""
        self._closed = True
        self._link_down()
        if self.dirty.on_mark == self._wake_resync:
            self.dirty.on_mark = None
        if fail_held:
            self.releases = False  # late writes fail at once from now on (nobody would release them)
            self._held.fail(BlockError("the mirror stopped before the replica had this write (--on-link-loss block)"))
        self.dirty.save()
