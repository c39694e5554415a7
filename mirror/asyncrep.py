"""Asynchronous replication: a host write is acknowledged once it is in the local image and the
source journal; a shipper task sends the journal to the replica when the link, the throttle and the
schedule allow (DataCore's AIM, Zerto's continuous replication). DESIGN.md, "The asynchronous mirror".

The promise: the replica is at every instant byte-identical to the source as it was at some
checkpoint (write-order fidelity). The pieces:

- **Journal** (``journal.py``): every write, zero and trim is appended, in the order the seam saw it,
  before the host hears of it; a checkpoint is a record of its own (``cp id == its seq``), cut every
  ``checkpoint_interval``, at every host flush (durable: the journal is fdatasync'd), and when the
  shipper runs dry. The target applies the frames of a checkpoint under its undo log and commits them
  in one step (``target.py``/``undo.py``); its cumulative Ack past a Checkpoint frame means "committed".
  Records are released once a checkpoint after them is committed.
- **Overflow**: once the journal holds ``buffer_size`` bytes, writes only mark the dirty map (the host
  never waits, the disk never fills). A *catch-up* then reads the dirty regions from the image and ships
  them ("chunks") between journal records. Rules that keep every committed checkpoint exact:

  1. A checkpoint is a valid commit point only if nothing was dirty when it was cut (every write before
     it is then either a journal record before it, or was read by a chunk shipped before it).
  2. Chunks are read only while the journal accepts writes, and only once every record appended before
     it last started accepting (``_era_start``) has been shipped: a journal record shipped after a chunk
     is then never older than an unjournaled write the chunk holds, so replaying it cannot undo one.
  3. A chunk is read under the replicator's lock, skipping ranges whose local write is still landing,
     and its regions are *pinned* in the dirty map (clear in memory, still dirty on disk) until the
     checkpoint after them commits; link loss marks them dirty again and invalidates every checkpoint
     retained so far (their chunks must be resent first).
  4. If the journal is full and every record in it is shipped but none can be released (no valid
     checkpoint among them), their ranges are marked dirty and the journal is emptied ("fold").

- **Throttle / schedule / ship-at** (``throttle.py``, ``schedule.py``): pure; the shipper awaits what
  they say. Concurrent overlapping writes that may land locally in another order than the journal's are
  marked dirty (as in the sync mirror) and resent from the image.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import trio
import trio.lowlevel

from blockdev.backend import Backend, WriteResult
from blockdev.errors import ReadOnlyError
from blockdev.nbd.limits import RateLimited

from .base import Marking, MirrorState, ping_period
from .journal import CHECKPOINT, WRITE, ZERO, Journal, JournalClosed
from .records import Pairing, VolumeIdentity
from .reduce import CAP_ZSTD, OFFERED, Frames, KnownBlocks, Reducer, Reduction, StaleReference
from .resync import chunk, mark_allocated, read_frames
from .schedule import Schedule, ShipAt
from .seal import DISCARD_REPLICA, SPLIT_BRAIN
from .secure import open_link
from .throttle import TokenBucket
from .verify import compare
from .wire import Connection, PeerSilent, RemoteProtocolError, Role, WireError
from .wire.codec import MAX_PAYLOAD, encode, encode_dedup_query, encode_ping
from .wire.events import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    DedupReply,
    Demote,
    Demoted,
    HashQuery,
    HashReply,
    Hello,
    Welcome,
)
from .wire.link import Link, tune_for_wan

log = logging.getLogger("vdisk.mirror")
RETRY_LOG_EVERY = 300.0  # seconds between repeats of a failing connect's log line
DEMOTE_DRAIN = 60.0  # seconds a planned failover waits for the journal to drain
RECORD_OVERHEAD = 64  # journal header bytes counted against the buffer (an estimate for the check)
READ_BYTES = 4 << 20  # journal bytes read per shipper step
F_WRITE, F_ZERO, F_CP, F_CHUNK = 0, 1, 2, 3
PROGRESS_BYTES = 64 << 10  # sent during a timeout with no frame back: the link is slow, not dead


@dataclass(frozen=True)
class AsyncConfig:
    """An async mirror's settings. Rates in bytes/s (None: unlimited), times in seconds."""

    host: str
    port: int
    psk: bytes | None = None
    timeout: float = 10.0
    keepalive: float = 1.0
    backoff_min: float = 0.2
    backoff_max: float = 5.0
    rate: float | None = None
    schedule: str | None = None
    ship_at: str | None = None
    buffer_size: int = 10 << 30
    checkpoint_interval: float = 5.0
    paused: bool = False
    chunk: int = 1 << 20
    window: int = 32 << 20  # wire bytes sent and not yet acknowledged
    on_link_loss: str = "degrade"  # the host never waits for the WAN
    tls: Any = None  # mirror.secure.SourceTls: encrypt the link (None: plain)


class RateMeter:
    """Bytes per second over the last 10 s / 60 s, from per-second buckets. Caller holds a lock."""

    SPAN = 60

    def __init__(self) -> None:
        self._b: deque[list[int]] = deque()
        self.total = 0

    def add(self, n: int, now: float) -> None:
        sec = int(now)
        b = self._b
        if b and b[-1][0] == sec:
            b[-1][1] += n
        else:
            b.append([sec, n])
            while b and b[0][0] <= sec - self.SPAN:
                b.popleft()
        self.total += n

    def rate(self, window: int, now: float) -> float:
        start = now - window
        return sum(n for s, n in self._b if s + 1 > start) / window


class AsyncReplicator(Marking):
    """The Replicator behind MirrorLayer for ``--mode async``. Start ``run`` in a nursery."""

    mode = "async"
    releases = False

    def __init__(self, config: AsyncConfig, ident: VolumeIdentity, image: Backend, state: MirrorState,
                 journal: Journal, pairing: Pairing, save_pairing: Callable[[Pairing], None] = lambda p: None,
                 inherited: bool = False, known: KnownBlocks | None = None) -> None:
        super().__init__(state)
        # WAN reduction (reduce.py): the blocks the target holds, shared with the other volumes of
        # this daemon mirrored to it; a session's reducer once the target took zstd; bytes by fate.
        self._known = known if known is not None else KnownBlocks()
        self._reducer: Reducer | None = None
        self.reduction = Reduction()
        self.config, self.ident, self.image, self.journal, self.pairing = config, ident, image, journal, pairing
        self._save_pairing = save_pairing
        self.on_link_loss = "degrade"
        self._lock = threading.Lock()
        self._local: dict[tuple[int, int], int] = {}  # ops admitted, local half not landed
        self._closed = False
        self._accepting = True
        self._era_start = journal.next_seq
        # Checkpoints cut by this replicator: valid commit points? (rule 1). Older ones (from before a
        # restart or a hand-over) are valid only if nothing was dirty when we took over.
        self._valid: dict[int, bool] = {}
        self._valid_default = not inherited and state.dirty.count == 0 and state.dirty.pinned_count == 0
        self._holder = 0  # the thread with a batch open (hold .. push)
        self._held: list[tuple[int, int, Any, bool]] = []  # (kind, offset, data|length, flag) until push
        self._held_bytes = 0
        self._sync_on_push = False
        self._uncut = False  # records appended since the last checkpoint
        self._last_cut = time.monotonic()
        self._pins_open: list[tuple[int, int]] = []  # regions pinned since the last valid cut
        self._pins_cut: deque[tuple[int, list[tuple[int, int]]]] = deque()  # (cp, pins it commits)
        self.committed: tuple[int, int] = (0, 0)  # (checkpoint id, time_ns) the replica last committed
        self._pos = journal.first_seq  # next journal seq to ship in this session
        self._pending: deque[tuple[int, int, int, int]] = deque()  # (wire seq, kind, journal seq, bytes)
        self._wire_seq = 0
        self._inflight = 0
        self._applied_uncommitted = 0  # journal bytes the replica applied, not yet committed
        self._link: Link | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._steps: Any = None  # a session's packed steps, to _sender
        self._steps_out: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread = -1
        self._poked = False
        self._wake: trio.Event | None = None
        self._bucket = TokenBucket(config.rate)
        self._schedule = Schedule.parse(config.schedule) if config.schedule else None
        self._ship_at = ShipAt.parse(config.ship_at) if config.ship_at else None
        self._ship_open = self._ship_at is None  # ship-at: shipping only from the instant until caught up
        self._ship_target = 0  # ship-at: the checkpoint cut at the instant (and closing ones after it)
        self._window: Any = None  # the schedule's current Window
        self._ship_next: dt.datetime | None = None  # ship-at: the next instant
        self._cp_time: dict[int, int] = {}  # checkpoint shipped -> its time_ns (for lag once committed)
        self._chunk_turn = True  # chunks and records take turns while both wait
        self._hash_waiters: dict[int, tuple[trio.Event, list[bytes]]] = {}
        self._next_req = 0
        self._verify_first: str | None = None
        self._last_rx = 0.0
        self._retry_log = RateLimited(log, RETRY_LOG_EVERY)
        self._ping_sent: float | None = None  # when the unanswered keep-alive left
        # Planned failover (the target's Demote): host writes are refused from ``fenced`` on; once
        # the replica has committed everything, ``demoted`` is that checkpoint and no link is retried.
        self.fenced = False
        self.demoted: int | None = None
        self._demote_asked: trio.Event | None = None
        self.rtt: float | None = None  # seconds, of the last keep-alive
        self._cursor = 0
        self.state = "disconnected"
        self.last_error: str | None = None
        self.connects = 0
        self.conflicts = 0
        self.overflows = 0
        self.overflow_bytes = 0
        self.folds = 0
        self.chunk_bytes_sent = 0
        self.in_meter, self.out_meter, self.wire_meter = RateMeter(), RateMeter(), RateMeter()
        self._dirty_since: float | None = time.time() if state.dirty.count else None

    # -- the Replicator protocol (any thread) ----------------------------------------------------
    def admit(self, offset: int, length: int) -> WriteResult:  # type: ignore[override]
        if self.fenced:  # demoted for a planned failover: the replica is the primary from here
            raise ReadOnlyError()
        key = (offset, length)
        with self._lock:
            local = self._local
            if local:
                end = offset + length
                if any(o < end and offset < o + n for o, n in local):
                    # It may land locally in the other order than the journal has them: resent
                    # from the image (the journal record still goes; the later read fixes it).
                    self.conflicts += 1
                    self._mark_locked(offset, length)
            local[key] = local.get(key, 0) + 1
        gate = self.al.admit(offset, length)
        if gate is not None:
            gate.add_done_callback(lambda exc: exc is None or self._unland([key]))
        return gate

    def _unland(self, ranges: list[tuple[int, int]]) -> None:
        local = self._local
        with self._lock:
            for key in ranges:
                left = local.pop(key, 1) - 1
                if left:
                    local[key] = left

    def withdraw(self, offset: int, length: int) -> None:
        self._unland([(offset, length)])
        self.al.end(offset, length)

    def local_done(self, offset: int, length: int, ok: bool) -> None:
        if not ok or self._closed:  # the replica may get what the volume refused / a successor took over
            self.dirty.mark(offset, length)
        self._unland([(offset, length)])
        self.al.end(offset, length)

    def landed(self, ranges: list[tuple[int, int]]) -> None:
        if self._closed:
            for offset, length in ranges:
                self.dirty.mark(offset, length)
        self._unland(ranges)
        self.al.end_many(ranges)

    def _mark_locked(self, offset: int, length: int) -> None:
        if self._dirty_since is None:
            self._dirty_since = time.time()
        self.dirty.mark(offset, length)

    def _room_locked(self, n: int) -> bool:
        if self._closed:
            return False
        if self._accepting and self.journal.bytes + self._held_bytes + n + RECORD_OVERHEAD > self.config.buffer_size:
            self._accepting = False
            self.overflows += 1
            log.warning("mirror %s: the source buffer is full (%d bytes): new writes are tracked in the "
                        "dirty map and caught up later", self.ident.name, self.config.buffer_size)
        return self._accepting

    def _append(self, kind: int, offset: int, payload: Any, flag: bool, n: int) -> bool:
        """Journal one write/zero (or mark it dirty); True if the shipper should be woken."""
        me = threading.get_ident()
        with self._lock:
            if not self._room_locked(n if kind == WRITE else 0):
                self.overflow_bytes += n
                self._mark_locked(offset, n)
                return True
            self.in_meter.add(n, time.monotonic())
            if me == self._holder:
                self._held.append((kind, offset, payload, flag))
                self._held_bytes += (n if kind == WRITE else 0) + RECORD_OVERHEAD
                if flag and kind == WRITE:
                    self._sync_on_push = True
                self._uncut = True
                return False
        # The journal orders appends under its own lock; holding ours meanwhile serialized every
        # worker's admit and landing behind a 1 MiB pwritev (a fold or close marks a concurrent
        # record or keeps it: Journal.reset). Room is checked before, so the buffer may be
        # overshot by the writes in flight at that instant, never more.
        try:
            if kind == WRITE:
                self.journal.append_write(offset, payload, flag)
            else:
                self.journal.append_zero(offset, payload, flag)
        except JournalClosed:  # retired meanwhile (mode switch, stop): the shared map covers it
            self.dirty.mark(offset, n)
            return False
        self._uncut = True  # after the record: a cut in between covers it (one spare cut at most)
        if flag and kind == WRITE:
            self.journal.sync()  # FUA: durable in the journal before the host's ack
        return True

    def on_write(self, offset: int, data: memoryview | bytes, fua: bool, done: Any = None) -> WriteResult:
        if self._append(WRITE, offset, data, fua, len(data)):
            self._poke()
        return None

    def on_zero(self, offset: int, length: int, fua: bool, trim: bool) -> WriteResult:
        if self._append(ZERO, offset, length, trim, length):
            self._poke()
        if fua:
            self.journal.sync()
        return None

    def on_flush(self) -> WriteResult:
        with self._lock:
            if self._uncut and not self._closed:
                self._cut_locked()
        self.journal.sync()
        self.dirty.save()
        self._poke()
        return None

    def hold(self) -> None:
        self._holder = threading.get_ident()

    def push(self) -> None:
        """The batch's records go into the journal in one write (group commit), in seam order."""
        with self._lock:
            held, self._held, self._held_bytes = self._held, [], 0
            self._holder = 0
            sync, self._sync_on_push = self._sync_on_push, False
            if held:
                j = self.journal
                j.hold()
                try:
                    for kind, offset, payload, flag in held:
                        if kind == WRITE:
                            j.append_write(offset, payload, flag)
                        else:
                            j.append_zero(offset, payload, flag)
                finally:
                    j.push()
        if sync:
            self.journal.sync()
        if held:
            self._poke()

    def _cut_locked(self) -> int:
        """Append a checkpoint; remember whether it is a valid commit point (rule 1)."""
        cp = self.journal.append_checkpoint()
        valid = self.dirty.count == 0 and not self._closed
        self._valid[cp] = valid
        if valid and self._pins_open:
            self._pins_cut.append((cp, self._pins_open))
            self._pins_open = []
        self._uncut = False
        self._last_cut = time.monotonic()
        if self._ship_open and self._ship_at is not None and valid:
            self._ship_target = max(self._ship_target, cp)
        return cp

    def _poke(self) -> None:
        """Wake the shipper (any thread); one crossing into trio at most per wait."""
        ev = self._wake
        if ev is None or ev.is_set():
            return
        if threading.get_ident() == self._trio_thread:
            ev.set()
        elif not self._poked and self._token is not None:
            self._poked = True
            try:
                self._token.run_sync_soon(self._poked_set)
            except trio.RunFinishedError:
                pass

    def _poked_set(self) -> None:
        self._poked = False
        if self._wake is not None:
            self._wake.set()

    # -- control ---------------------------------------------------------------------------------
    def configure(self, config: AsyncConfig) -> None:
        """Apply rate, schedule, ship-at, buffer size, checkpoint interval and pause live."""
        old = self.config
        self.config = config
        if config.rate != old.rate:
            self._bucket.set_rate(config.rate, trio.current_time())
        if config.schedule != old.schedule:
            self._schedule = Schedule.parse(config.schedule) if config.schedule else None
        self._window = None  # the schedule decides again which rate applies
        if config.ship_at != old.ship_at:
            self._ship_at = ShipAt.parse(config.ship_at) if config.ship_at else None
            self._ship_open = self._ship_at is None
        self._poke()

    def request_resync(self) -> None:
        self._poke()

    async def wait_in_sync(self, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self.statistics()["state"] != "in_sync":
                await trio.sleep(0.05)
            return True
        return False

    # -- sessions --------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._wake = trio.Event()
        self.dirty.on_mark = self._poke
        self.al.before_evict = self._before_evict
        rec = getattr(self.journal, "recovery", None) or {}
        if rec.get("damaged"):
            log.error("mirror %s: the journal was damaged; every allocated region is sent again", self.ident.name)
            mark_allocated(self.image, self.ident.size, self.dirty)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._cutter)
            nursery.start_soon(self._saver)
            task_status.started()
            backoff = self.config.backoff_min
            try:
                while True:
                    started = time.monotonic()
                    if self.demoted is not None:  # planned failover done: this side is no longer the source
                        self.state, self.last_error = "demoted", f"demoted at checkpoint {self.demoted}"
                        await trio.sleep_forever()
                    try:
                        await self._session()
                    except (WireError, OSError) as e:
                        self.last_error = str(e)
                        if getattr(e, "code", None) == StaleReference.code:
                            self._known.clear()  # the target no longer holds what we thought: ask again
                        if getattr(e, "code", None) == SPLIT_BRAIN:
                            await self._split_brain(str(e).removeprefix("peer: "))
                        # Once, then every few minutes with a count (a target down for hours is one line
                        # per RETRY_LOG_EVERY, not one per backoff); a new error, or the first failure
                        # after a success, is logged at once.
                        self._retry_log(logging.WARNING, "mirror %s -> %s:%s: %s", self.ident.name,
                                        self.config.host, self.config.port, e, key=str(e))
                    except Exception as e:  # a bug here must not stop the volume being served
                        self.last_error = f"internal error: {e!r}"
                        log.exception("mirror %s: internal error", self.ident.name)
                    if self.demoted is not None:
                        continue  # no retry: the top of the loop settles in "demoted"
                    if time.monotonic() - started > 10 * backoff:
                        backoff = self.config.backoff_min
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.config.backoff_max)
            finally:
                self._link_down()
                nursery.cancel_scope.cancel()

    def _before_evict(self) -> bool:
        """An extent may leave the activity log only once its journal records and marks are durable."""
        try:
            self.journal.sync()
        except OSError:
            return False
        return self.dirty.save()

    async def _cutter(self) -> None:
        """A checkpoint every ``checkpoint_interval`` while writes arrive."""
        while True:
            await trio.sleep(min(self.config.checkpoint_interval, 1.0))
            if self._uncut and time.monotonic() - self._last_cut >= self.config.checkpoint_interval:
                with self._lock:
                    if self._uncut:
                        self._cut_locked()
                self._poke()

    async def _saver(self) -> None:
        while True:
            await trio.sleep(1.0)
            if self.dirty.count or self.dirty.pinned_count:
                await trio.to_thread.run_sync(self.dirty.save)

    async def _session(self) -> None:
        conn = Connection(Role.SOURCE, self.config.psk)
        link = await open_link(self.config, conn)
        try:
            caps = ((DISCARD_REPLICA,) if self.pairing.discard_replica else ()) + self.ident.caps() + OFFERED
            conn.start(Hello(PROTOCOL_VERSION, self.ident.uuid, self.ident.name, self.ident.size,
                             self.ident.block_size, self.ident.generation, b"", "async", caps))
            await link.send_control()
            with trio.move_on_after(self.config.timeout) as scope:
                events = await link.receive()
            if scope.cancelled_caught:
                raise PeerSilent(f"target {link.peer} did not complete the handshake")
            welcome = events[0]
            if not isinstance(welcome, Welcome):
                raise RemoteProtocolError(f"expected Welcome, got {type(welcome).__name__}")
            self._pair(welcome)
            self._resume(welcome)
            self._reducer = Reducer(self.ident.uuid, welcome.caps, self._known,
                                    self._dedup_query) if CAP_ZSTD in welcome.caps else None
            if self._reducer is not None:
                tune_for_wan(link)
            self._last_rx = time.monotonic()
            self._link = link
            self.connects += 1
            self._retry_log = RateLimited(log, RETRY_LOG_EVERY)
            self._ping_sent = None  # one of the last link's would time this one
            self.last_error = None
            self.state = "lagging"
            log.info("mirror %s: connected to %s (replica %s, checkpoint %d)", self.ident.name, link.peer,
                     welcome.replica_name, welcome.checkpoint)
            errors: list[BaseException] = []
            self._demote_asked = trio.Event()
            async with trio.open_nursery() as nursery:
                # Reduced, a step is packed while the one before it drains (one step queued at most).
                self._steps, self._steps_out = trio.open_memory_channel[list[Any]](1)
                for fn in (self._receiver, self._ship, self._keepalive, self._sender, self._demoter):
                    nursery.start_soon(self._guard, fn, link, nursery.cancel_scope, errors)
            if errors:
                raise errors[0]
        finally:
            self._link_down()
            with trio.CancelScope(shield=True):
                await link.close()

    async def _guard(self, fn: Callable[[Link], Any], link: Link, scope: trio.CancelScope,
                     errors: list[BaseException]) -> None:
        try:
            await fn(link)
        except (WireError, OSError) as e:
            errors.append(e)
            scope.cancel()
        except JournalClosed:
            if not self._closed:
                raise
            scope.cancel()  # retired meanwhile (its run task is being cancelled too)

    def _pair(self, welcome: Welcome) -> None:
        if self.pairing.split_brain is not None:
            self.pairing = replace(self.pairing, split_brain=None)
            self._save_pairing(self.pairing)
        self._verify_first = None
        if welcome.created:
            mark_allocated(self.image, self.ident.size, self.dirty)
            self.pairing = Pairing(welcome.replica_id, False, self.dirty.dirty_bytes)
            self._save_map()
            self._save_pairing(self.pairing)
        elif welcome.replica_id != self.pairing.replica_id or welcome.verify:
            self._verify_first = welcome.replica_id

    def _resume(self, welcome: Welcome) -> None:
        """Where the new stream starts: after the checkpoint the replica committed (its Welcome)."""
        j = self.journal
        w = int(getattr(welcome, "checkpoint", 0) or 0)
        with self._lock:
            if j.first_seq <= w < j.next_seq:
                rec = j.find(w)
                if rec is None or rec.kind != CHECKPOINT:
                    self._unknown_checkpoint_locked(w)
                else:
                    j.release(w)
                    self._pos = w + 1
                    self._released_pins_locked(w)
            elif w >= j.next_seq:
                self._unknown_checkpoint_locked(w)
            else:  # older than anything retained: what lies between is committed, or dirty (folded)
                self._pos = j.first_seq
            if w:
                self.committed = (w, int(getattr(welcome, "checkpoint_time_ns", 0) or 0))
            self._era_start = j.next_seq  # rule 2: the retained records go before any chunk
            self._pending.clear()
            self._wire_seq = self._inflight = 0

    def _unknown_checkpoint_locked(self, w: int) -> None:
        log.warning("mirror %s: the replica is at checkpoint %d, which this journal does not know: "
                    "every allocated region is sent again", self.ident.name, w)
        mark_allocated(self.image, self.ident.size, self.dirty)
        self.journal.reset(self.dirty.mark, self.dirty.save)
        self._valid.clear()
        self._valid_default = False
        self._pos = self.journal.first_seq

    async def _split_brain(self, message: str) -> None:
        self.state, self.last_error = "split_brain", message
        if self.pairing.split_brain != message:
            self.pairing = replace(self.pairing, split_brain=message)
            self._save_pairing(self.pairing)
        log.error("mirror %s -> %s:%s: %s", self.ident.name, self.config.host, self.config.port, message)
        await trio.sleep_forever()

    def _save_map(self) -> None:
        if not self.dirty.save(force=True):
            raise OSError(self.dirty.save_error)

    def _link_down(self) -> None:
        """The target rolls back to its last committed checkpoint: chunks shipped since then are
        dirty again, and every retained checkpoint that relied on them is no commit point any more."""
        if self._reducer is not None:
            self._reducer.stream.alive = False  # what it sent and the target did not commit is gone
        with self._lock:
            self._link = None
            pins = self._pins_open + [p for _cp, ps in self._pins_cut for p in ps]
            self._pins_open, self._pins_cut = [], deque()
            if pins:
                self._valid = dict.fromkeys(self._valid, False)
                self._valid_default = False
            self._pending.clear()
            self._inflight = self._applied_uncommitted = 0
        for first, last in pins:
            self.dirty.unpin(first, last, remark=True)
        for event, _box in self._hash_waiters.values():
            event.set()
        self._hash_waiters.clear()
        if self.state != "split_brain":
            self.state = "disconnected"
        self.dirty.save()

    # -- receiving (trio thread) -----------------------------------------------------------------
    async def _receiver(self, link: Link) -> None:
        sent = link.outbox.sent
        while True:
            with trio.move_on_after(self.config.timeout) as scope:
                events = await link.receive()
            if scope.cancelled_caught:
                # On a slow line a large frame takes longer than the timeout to cross, and the target
                # acknowledges it only once it is whole: the socket taking our data (more than the
                # keep-alives) means the target reads it (TCP acknowledges it), so that is life too.
                if link.outbox.sent - sent >= PROGRESS_BYTES:
                    sent = link.outbox.sent
                    continue
                raise PeerSilent(f"target {link.peer} went silent for {self.config.timeout:g}s")
            sent = link.outbox.sent
            self._last_rx = time.monotonic()
            if self._ping_sent is not None:  # a Ping goes out only after a silent second: this is its Ack
                self.rtt = self._last_rx - self._ping_sent
                self._ping_sent = None
            acked = -1
            for ev in events:
                if type(ev) is Ack:
                    acked = ev.seq
                elif isinstance(ev, HashReply | DedupReply):
                    waiter = self._hash_waiters.pop(ev.req, None)
                    if waiter is not None:
                        waiter[1].append(ev.digests if isinstance(ev, HashReply) else ev.entries)
                        waiter[0].set()
                elif isinstance(ev, Demote):
                    if self._demote_asked is not None:
                        self._demote_asked.set()
                elif isinstance(ev, Bye):
                    raise RemoteProtocolError(f"target {link.peer} closed the link")
            if acked >= 0:
                self._on_ack(acked)

    async def _demoter(self, link: Link) -> None:
        """A planned failover: refuse host writes, cut a checkpoint and wait until the replica has
        committed it (nothing unshipped), then tell the target, which promotes the replica."""
        assert self._demote_asked is not None
        await self._demote_asked.wait()
        log.warning("mirror %s: the target asks for a planned failover: host writes are refused from now on",
                    self.ident.name)
        self.fenced = True
        with trio.move_on_after(DEMOTE_DRAIN):
            while self._local:  # writes admitted before the fence: journaled before the cut
                await trio.sleep(0.01)
        if not await self.drain(DEMOTE_DRAIN):
            self.fenced = False
            log.error("mirror %s: could not ship everything within %gs: planned failover abandoned, host writes "
                      "accepted again", self.ident.name, DEMOTE_DRAIN)
            return
        self.demoted = self.committed[0]
        await self._send(link, [encode(Demoted(self.demoted))])
        log.warning("mirror %s: demoted at checkpoint %d: the replica becomes the primary", self.ident.name,
                    self.demoted)
        await trio.sleep_forever()  # until the target closes the link

    def _on_ack(self, seq: int) -> None:
        if seq > self._wire_seq:
            raise RemoteProtocolError(f"target acknowledged seq {seq}, but only {self._wire_seq} were sent")
        cp = cp_wire = 0
        with self._lock:
            pending = self._pending
            while pending and pending[0][0] <= seq:
                w, kind, jseq, nbytes = pending.popleft()
                self._inflight -= nbytes
                if kind == F_CP:
                    cp, cp_wire = jseq, w
                    self._applied_uncommitted = 0
                elif kind != F_CHUNK:
                    self._applied_uncommitted += nbytes
            red = self._reducer
            if red is not None:
                red.stream.acked = seq
                if cp:
                    red.stream.committed = cp_wire
            if cp:
                self.committed = (cp, self._cp_time.get(cp, 0))
                for k in [k for k in self._cp_time if k <= cp]:
                    del self._cp_time[k]
                for k in [k for k in self._valid if k <= cp]:
                    del self._valid[k]
                pins = self._released_pins_locked(cp)
            else:
                pins = []
        if cp:
            self.journal.release(cp)
            for first, last in pins:
                self.dirty.unpin(first, last)
            if not self.pairing.initial_sync_done and not self.dirty.count and not self.dirty.pinned_count:
                self.pairing = Pairing(self.pairing.replica_id, True, self.pairing.sync_total)
                self._save_pairing(self.pairing)
            if not self.dirty.count and not self.dirty.pinned_count:
                self._dirty_since = None
        if self._wake is not None:
            self._wake.set()  # the shipper may wait for room in the window

    def _released_pins_locked(self, cp: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while self._pins_cut and self._pins_cut[0][0] <= cp:
            out.extend(self._pins_cut.popleft()[1])
        return out

    async def _keepalive(self, link: Link) -> None:
        token = 0
        period, quiet = ping_period(self.config.keepalive, self.config.timeout)
        while True:
            await trio.sleep(period)
            if time.monotonic() - self._last_rx >= quiet:
                token += 1
                self._ping_sent = time.monotonic()
                await self._send(link, [encode_ping(token)])

    async def _send(self, link: Link, frames: list[Any]) -> None:
        async with self._send_lock:
            with link.outbox.lock:
                link.outbox.put_locked(frames)
            await link.drain()

    # -- shipping (trio thread) ------------------------------------------------------------------
    async def _wait(self, timeout: float) -> None:
        """Until poked (new records, marks, acks, a configuration) or ``timeout`` seconds. The
        event is renewed at the top of each shipper step, before it looks for work, so a poke
        between that look and this wait is not lost."""
        ev = self._wake
        if ev is None:
            return
        with trio.move_on_after(max(0.0, timeout)):
            await ev.wait()

    async def _gate(self) -> None:
        """Wait while paused, in a scheduled pause, or (ship-at) before the next instant."""
        while True:
            if self.config.paused:
                self.state = "paused"
                await self._wait(1.0)
                self._wake = trio.Event()
                continue
            if self._schedule is not None:
                now = dt.datetime.now().astimezone()
                w = self._window
                if w is None or (w.next_change is not None and now >= w.next_change):
                    w = self._window = self._schedule.window(now)
                    rate = self.config.rate if w.rate == "default" else w.rate
                    if not w.paused and rate != self._bucket.rate:
                        self._bucket.set_rate(rate, trio.current_time())
                if w.paused:
                    self.state = "scheduled"
                    left = (w.next_change - now).total_seconds() if w.next_change else 60.0
                    await self._wait(min(max(left, 0.01), 1.0))
                    self._wake = trio.Event()
                    continue
            if self._ship_at is not None and not self._ship_open:
                now = dt.datetime.now().astimezone()
                nxt = self._ship_next
                if nxt is None:
                    nxt = self._ship_next = self._ship_at.next_after(now)
                if now < nxt:
                    self.state = "scheduled"
                    await self._wait(min((nxt - now).total_seconds(), 1.0))
                    self._wake = trio.Event()
                    continue
                self._ship_next = None
                with self._lock:
                    self._ship_open = True
                    if self._uncut:
                        self._cut_locked()
                    self._ship_target = self.journal.next_seq - 1
                log.info("mirror %s: shipping up to checkpoint %d (--ship-at)", self.ident.name, self._ship_target)
            return

    async def _ship(self, link: Link) -> None:
        if self._verify_first is not None:
            await self._compare_first()
        while True:
            self._wake = trio.Event()
            await self._gate()
            if self._inflight >= self.config.window:
                await self._wait(1.0)
                continue
            step = self._plan()
            if step == "chunk":
                frames = self._read_chunk()
                if frames:
                    wire = await self._put(link, frames)
                    # The throttle covers catch-up too: wait what these bytes cost before the next.
                    delay = 0.0 if self._reducer is not None else self._bucket.reserve(wire, trio.current_time())
                    if delay > 0:
                        await trio.sleep(delay)
                    continue
            if await self._ship_records(link):
                continue
            if self._reducer is not None:
                self._reducer.stream.idle = True  # another stream's bulk transfer may go (reduce.py)
            self._update_state()
            # Nothing to send now: cut a checkpoint so what was shipped can commit, then wait.
            if self._want_cut():
                with self._lock:
                    self._cut_locked()
                continue
            await self._wait(0.2 if self._uncut or self.dirty.count else 1.0)

    def _want_cut(self) -> bool:
        """The shipper ran dry: would a checkpoint now let the replica commit something?"""
        if self.dirty.count or self._closed:
            return False  # not a valid commit point yet
        if self._uncut and time.monotonic() - self._last_cut >= min(1.0, self.config.checkpoint_interval):
            return True
        if self._pins_open:
            return True  # a catch-up is fully shipped: its closing checkpoint
        # Shipped records with no commit point among them (checkpoints from before a restart or a
        # link loss that relied on chunks): one cut now commits them all.
        return (self._pos >= self.journal.next_seq and self.journal.bytes > 0
                and not any(kind == F_CP for _w, kind, _j, _n in self._pending))

    def _plan(self) -> str:
        """Chunk or journal records next (rules 2 and 4)."""
        j = self.journal
        with self._lock:
            if not self._accepting and self._pos >= j.next_seq:
                # Everything journaled is shipped: accept again, folding the journal first if it
                # cannot drain (rule 4: nothing in it is a valid commit point).
                if j.bytes > self.config.buffer_size // 2:
                    self._fold_locked()
                self._accepting = True
                self._era_start = j.next_seq
                log.info("mirror %s: journaling again (%s bytes dirty to catch up)", self.ident.name,
                         self.dirty.dirty_bytes)
            if self.dirty.count and self._accepting and self._pos >= self._era_start:
                # Records and chunks take turns (records appended during a long catch-up keep moving).
                self._chunk_turn = not self._chunk_turn or self._pos >= j.next_seq
                if self._chunk_turn:
                    return "chunk"
        return "records"

    def _fold_locked(self) -> None:
        j = self.journal
        j.reset(self.dirty.mark, self.dirty.save)
        self._valid.clear()
        self._pos = j.first_seq
        self.folds += 1
        log.warning("mirror %s: the full source buffer was folded into the dirty map", self.ident.name)

    def _read_chunk(self) -> Frames:
        """Read the next dirty chunk not being written (rule 3) and frame it; [] if none now."""
        d = self.dirty
        frames = Frames()
        # Reduced: larger chunks (one dedup query and one pack each) amortise the round trip.
        size = self.config.chunk if self._reducer is None else max(self.config.chunk, 8 << 20)
        with self._lock:
            if self._link is None:
                return frames
            start = self._cursor
            r = d.next_set(start)
            if r is None and start:
                r = d.next_set(0)
            tried = 0
            while r is not None and tried < 64:
                first, last, offset, length = chunk(d, r, size, self.ident.size)
                end = offset + length
                if not any(o < end and offset < o + n for o, n in self._local):
                    break
                tried += 1
                r = d.next_set(last + 1)
            else:
                return frames
            self._cursor = last + 1
            parts = read_frames(self.image, offset, length)
            d.pin(first, last)
            self._pins_open.append((first, last))
            nbytes = 0
            for f_off, f_len, payload in parts:
                self._wire_seq += 1
                if payload is None:
                    frames.zero(self._wire_seq, f_off, f_len, False, True)
                    size = 32
                else:
                    frames.write(self._wire_seq, f_off, payload)
                    size = 32 + f_len
                    nbytes += f_len
                self._pending.append((self._wire_seq, F_CHUNK, 0, size))
                self._inflight += size
            self.chunk_bytes_sent += nbytes
            self.state = "catching_up"
        return frames

    async def _ship_records(self, link: Link) -> bool:
        """Send the next journal records (throttled); False if there were none to send."""
        j = self.journal
        pos = self._pos
        limit = None if self._ship_at is None else self._ship_target
        if pos >= j.next_seq or (limit is not None and pos > limit):
            if limit is not None and pos > limit and not self.dirty.count and not self.dirty.pinned_count \
                    and self.committed[0] >= limit:
                self._ship_open = False  # shipped and committed up to the instant's checkpoint
            return False
        recs = await trio.to_thread.run_sync(j.read, pos, READ_BYTES)
        if self._link is not link or self._pos != pos:
            return True  # the session changed meanwhile
        if limit is not None:
            recs = [r for r in recs if r.seq <= limit]
        if not recs:
            return False
        last_valid = max((r.seq for r in recs if r.kind == CHECKPOINT and self._valid.get(r.seq, self._valid_default)),
                         default=0)
        frames = Frames()
        wire = 0
        reduced = self._reducer is not None
        for r in recs:
            if r.kind == CHECKPOINT and r.seq != last_valid:
                self._pos = r.seq + 1  # not a commit point, or a later one follows in this batch
                continue
            if r.kind == WRITE:
                size = r.length + 32 * max(1, -(-r.length // MAX_PAYLOAD))
            else:
                size = 40
            # The throttle: wait *before* these bytes go (the limiter only says how long). Reduced,
            # the wire bytes are known only once packed: _put waits what they cost after.
            delay = 0.0 if reduced else self._bucket.reserve(size, trio.current_time())
            if delay > 0:
                if frames:
                    await self._put(link, frames)
                    frames, wire = Frames(), 0
                await trio.sleep(delay)
                if self._link is not link:
                    return True
            if r.kind == CHECKPOINT:
                self._wire_seq += 1
                frames.checkpoint(self._wire_seq, r.seq, r.time_ns)
                self._cp_time[r.seq] = r.time_ns
                self._pending.append((self._wire_seq, F_CP, r.seq, size))
            elif r.kind == WRITE:
                view = memoryview(r.data) if r.data is not None else memoryview(b"")
                for p in range(0, max(r.length, 1), MAX_PAYLOAD):
                    self._wire_seq += 1
                    part = view[p:p + MAX_PAYLOAD]
                    frames.write(self._wire_seq, r.offset + p, part, bool(r.flags & 1))
                    self._pending.append((self._wire_seq, F_WRITE, r.seq, 32 + len(part)))
                self.out_meter.add(r.length, time.monotonic())
            else:
                self._wire_seq += 1
                frames.zero(self._wire_seq, r.offset, r.length, False, bool(r.flags & 2))
                self._pending.append((self._wire_seq, F_ZERO, r.seq, size))
                self.out_meter.add(r.length, time.monotonic())
            self._inflight += size
            wire += size
            self._pos = r.seq + 1
            if wire >= (READ_BYTES if reduced else 1 << 20):
                await self._put(link, frames)
                frames, wire = Frames(), 0
        if frames:
            await self._put(link, frames)
        return True

    async def _put(self, link: Link, frames: Frames) -> int:
        """Send one step's frames (reduced if negotiated); the wire bytes they took. Reduced, the
        throttle waits here, before they go, what they cost (known only once packed)."""
        red = self._reducer
        if red is not None:
            red.stream.idle = False
        acct = Reduction()
        bufs = frames.plain(acct) if red is None else await red.encode(frames, acct)
        if self._link is not link:
            # The session ended while packing: nothing of this step goes (it is sent again).
            raise RemoteProtocolError("the link was lost while packing")
        if red is not None:
            delay = self._bucket.reserve(acct.wire, trio.current_time())
            if delay > 0:
                await trio.sleep(delay)
            if self._link is not link:
                raise RemoteProtocolError("the link was lost while throttled")
        with self._lock:
            self.reduction.add(acct)
            self.wire_meter.add(acct.wire, time.monotonic())
        if red is None:
            await self._send(link, bufs)
        else:
            started = time.monotonic()
            await self._steps.send(bufs)
            red.sent(time.monotonic() - started)  # how long the link kept us waiting
        return acct.wire

    async def _sender(self, link: Link) -> None:
        async for bufs in self._steps_out:
            await self._send(link, bufs)

    async def _dedup_query(self, prefixes: bytes) -> bytes:
        """Ask the target which blocks it holds (one round trip per shipper step, not per block)."""
        return await self._ask(lambda req: encode_dedup_query(req, prefixes), self.config.timeout, "dedup", -1)

    async def _ask(self, frame: Callable[[int], bytes], timeout: float, what: str, size: int) -> bytes:
        """Send a query numbered ``req`` and wait for its reply (of ``size`` bytes unless -1)."""
        link = self._link
        if link is None:
            raise RemoteProtocolError("the mirror is not connected")
        self._next_req += 1
        req = self._next_req
        event, box = trio.Event(), []
        self._hash_waiters[req] = (event, box)
        await self._send(link, [frame(req)])
        with trio.move_on_after(timeout) as scope:
            await event.wait()
        if scope.cancelled_caught or not box or (size >= 0 and len(box[0]) != size):
            self._hash_waiters.pop(req, None)
            raise PeerSilent(f"the target did not answer a {what} query")
        return box[0]

    def _update_state(self) -> None:
        if self._link is None or self.state in ("split_brain", "demoted"):
            return
        self.state = self._state_now()

    def _state_now(self) -> str:
        if self.demoted is not None:
            return "demoted"
        if self._link is None:
            return "split_brain" if self.state == "split_brain" else "disconnected"
        if self.config.paused:
            return "paused"
        if self._window is not None and self._window.paused:
            return "scheduled"
        if self.dirty.count or self.dirty.pinned_count:
            return "catching_up"
        if self.journal.bytes or self._uncut or self._held_bytes:
            if self._ship_at is not None and not self._ship_open:
                return "scheduled"
            return "lagging"
        return "in_sync"

    async def _compare_first(self) -> None:
        report = await compare(self.image, self.ident.size, self.dirty.region, self.query_hashes)
        for b in report.differing_blocks:
            self.dirty.mark_region(b)
        self._save_map()
        assert self._verify_first is not None
        self.pairing = Pairing(self._verify_first, False, self.dirty.dirty_bytes)
        self._save_pairing(self.pairing)
        self._verify_first = None
        with self._lock:
            self._valid = dict.fromkeys(self._valid, False)
            self._valid_default = False
        log.info("mirror %s: existing replica differs in %d blocks", self.ident.name, len(report.differing_blocks))

    # -- verify ----------------------------------------------------------------------------------
    async def query_hashes(self, leaf_size: int, level: int, indices: list[int]) -> bytes:
        return await self._ask(lambda req: encode(HashQuery(req, leaf_size, level, tuple(indices))),
                               max(60.0, self.config.timeout), "verify", 16 * len(indices))

    async def drain(self, timeout: float) -> bool:
        """Cut a checkpoint and wait until the replica has committed it (verify, a mode switch)."""
        with self._lock:
            cp = self._cut_locked() if not self._closed else 0
        self._poke()
        with trio.move_on_after(timeout):
            while self.committed[0] < cp or self.dirty.count or self.dirty.pinned_count:
                await trio.sleep(0.05)
            return True
        return False

    # -- retiring --------------------------------------------------------------------------------
    def close(self, fail_held: bool = True, fold: bool = True) -> None:
        """Stop (after the run task was cancelled). ``fold``: the successor does not read this journal
        (sync mode, or the mirror stops): what the replica has not committed goes into the dirty map."""
        with self._lock:
            self._closed = True
        self._link_down()
        if self.dirty.on_mark == self._poke:
            self.dirty.on_mark = None
        if self.al.before_evict == self._before_evict:
            self.al.before_evict = self.dirty.save
        if fold:
            with self._lock:
                self.journal.reset(self.dirty.mark, self.dirty.save)
        self.dirty.save()

    # -- status ----------------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        now_m, now = time.monotonic(), time.time()
        j = self.journal
        dirty = self.dirty.dirty_bytes + self.dirty.pinned_bytes
        journal_bytes = j.bytes
        # What the replica lacks: journal records it has not applied yet, and the dirty regions.
        buffer = max(0, journal_bytes - self._applied_uncommitted) + dirty
        oldest_ns = j.oldest_time_ns(j.first_seq) if journal_bytes else None
        oldest = oldest_ns / 1e9 if oldest_ns else None
        if self._dirty_since is not None and dirty and (oldest is None or self._dirty_since < oldest):
            oldest = self._dirty_since
        state = self._state_now() if self.state not in ("split_brain",) else self.state
        if self._link is None and state not in ("split_brain", "demoted"):
            state = "disconnected"
        lag = 0.0 if state == "in_sync" or oldest is None else max(0.0, now - oldest)
        with self._lock:
            rates = {"logical_in_10s": self.in_meter.rate(10, now_m), "logical_in_60s": self.in_meter.rate(60, now_m),
                     "logical_out_10s": self.out_meter.rate(10, now_m), "logical_out_60s": self.out_meter.rate(60, now_m),
                     "wire_10s": self.wire_meter.rate(10, now_m), "wire_60s": self.wire_meter.rate(60, now_m)}
        ship = max(rates["wire_10s"], rates["logical_out_10s"])
        with self._lock:
            recent_in = self.in_meter.rate(2, now_m)  # a burst that is over does not hide the catch-up
        gain = ship - recent_in
        eta = 0.0 if not buffer else (round(buffer / gain, 1) if gain > 0 and ship > 0 else None)
        w = self._window
        cp_id, cp_ns = self.committed
        p = self.pairing
        return {
            "mode": "async", "state": state, "target": f"{self.config.host}:{self.config.port}",
            "on_link_loss": "degrade", "buffer_bytes": buffer, "journal_bytes": journal_bytes,
            "journal_records": j.count, "dirty_bytes": dirty, "buffer_size": self.config.buffer_size,
            "accepting": self._accepting, "oldest_unshipped": oldest, "lag_seconds": round(lag, 3),
            "last_checkpoint": {"id": cp_id, "time": cp_ns / 1e9 if cp_ns else None},
            "checkpoint_interval": self.config.checkpoint_interval,
            "rates": {k: round(v, 1) for k, v in rates.items()}, "eta_seconds": eta,
            "throttle": {"rate": self._bucket.rate, "configured": self.config.rate, "paused": self.config.paused},
            "schedule": None if self._schedule is None else {
                "spec": self.config.schedule, "window": w.label if w else None,
                "paused": bool(w and w.paused), "next_change": w.next_change.isoformat() if w and w.next_change else None},
            "ship_at": None if self._ship_at is None else {
                "spec": self.config.ship_at, "open": self._ship_open,
                "next": self._ship_next.isoformat() if self._ship_next else None},
            "in_flight": len(self._pending), "sent_seq": self._wire_seq, "shipped_seq": self._pos - 1,
            "journal_next_seq": j.next_seq, "overflows": self.overflows, "overflow_bytes": self.overflow_bytes,
            "folds": self.folds, "chunk_bytes_sent": self.chunk_bytes_sent, "conflicts": self.conflicts,
            "initial_sync": {"done": p.initial_sync_done, "total_bytes": p.sync_total},
            "blocked": 0, "connects": self.connects, "al_hot": self.al.hot, "al_writes": self.al.writes,
            "replica": p.replica_id, "last_error": self.last_error, "save_error": self.dirty.save_error,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 2),
            "reduction": self.reduction_status(),
        }

    def reduction_snapshot(self) -> Reduction:
        with self._lock:
            return replace(self.reduction)

    def reduction_status(self) -> dict[str, Any]:
        """Bytes by fate since the daemon started (reduce.Reduction), what is negotiated, zstd's level."""
        with self._lock:
            d = self.reduction.as_dict()
        red = self._reducer
        d["caps"] = [] if red is None else (["zstd"] + (["dedup"] if red.dedup else []))
        d["level"] = None if red is None else red.level
        d["known_blocks"] = len(self._known)
        return d
