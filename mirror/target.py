"""The replica site: receives a source's frames, applies them in order, acknowledges cumulatively.

Each source volume has one replica here, an ordinary vdisk volume keyed by the source's uuid (its
metadata has a ``replica`` section) and named after the source. While a source mirrors into it the
replica's serve lock is held, so nothing else can open it writable; DR hosts read it through the
read-only NBD export. Frames are checked (checksum, sequence, bounds) before anything is applied,
and FUA/flush fdatasync the replica before the ack that covers them.

Nothing a peer sends ends the target: every connection runs behind ``_guarded`` (a peer's error ends
that link with its reason logged and sent back; our own bug is logged with its traceback as that
link's internal error). Before the peer has authenticated it costs a few KiB (a 4 KiB buffer, frames
of at most 64 KiB), at most ``max_handshakes`` of them exist at once, and each has
``handshake_timeout`` seconds. Replica I/O and verify hashing run on worker threads (target_io.py).
"""
from __future__ import annotations

import datetime as dt
import errno
import fcntl
import ipaddress
import json
import logging
import os
import socket
import sqlite3
import time
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from blockdev.backend import Backend
from blockdev.image.file import FileImage
from blockdev.layers import ReadOnlyLayer
from blockdev.nbd.limits import RateLimited, raise_fd_limit
from blockdev.volume import (
    NAME_RE,
    VolumeBusy,
    VolumeError,
    VolumeStore,
    is_valid_name,
    validate_name,
    write_json_atomic,
)

from . import seal as seals
from .content_index import INDEX_FILE, ContentIndex
from .history import History
from .records import ORIGIN_CAP
from .reduce import CAP_DEDUP, CAP_ZSTD, S_REF, StaleReference, Unpacker, decode_rwrite, has_refs, resolve
from .secure import secure_target
from .target_io import Batch, Hasher, ReplicaImage, apply_batch, batch_ranges, check_batch, check_query
from .undo import CHECKPOINT_SUFFIX, UNDO_SUFFIX, CommittedView, UndoLog, read_checkpoint
from .wire import Connection, PeerClosed, PeerError, PeerSilent, RemoteProtocolError, Role, WireError
from .wire.codec import FrameReader, encode, encode_ack, encode_dedup_reply
from .wire.events import (
    Bye,
    Checkpoint,
    DedupQuery,
    Demote,
    Demoted,
    Flush,
    HashQuery,
    Hello,
    Pack,
    Ping,
    RWrite,
    Welcome,
    Write,
    Zero,
)
from .wire.link import Link

log = logging.getLogger("vdisk.target")
RECV_BUFFER = 16 << 20  # after the handshake
HANDSHAKE_BUFFER = 4 << 10  # before it: grows only as far as one pre-auth frame (PRE_AUTH_PAYLOAD)
LOCK_FILE = ".vdisk-target.lock"


def replica_names(store: VolumeStore) -> list[str]:
    """The volumes of ``store`` that are replicas (their metadata has a ``replica`` section)."""
    out = []
    for n in store.names():
        try:
            if "replica" in store.meta(n).extra:
                out.append(n)
        except VolumeError:
            continue
    return out


class Refused(Exception):
    """The target will not take this source (the message goes to the source, with ``code``)."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TargetConfig:
    """How the target treats its peers. Timeouts in seconds."""

    psk: bytes | None = None
    timeout: float = 30.0  # silence after which the source is declared gone
    handshake_timeout: float = 10.0  # from accept to authenticated Hello
    max_handshakes: int = 64  # unauthenticated connections at once; more are closed at accept
    insecure: bool = False  # allow listening beyond loopback without a pre-shared key
    io_threads: int = 64  # replica batches applied at once (each replica has at most one)
    hash_threads: int = 2  # verify trees built at once (CPU and disk bound)
    tls: Any = None  # mirror.secure.TargetTls: every source link is TLS (None: plain only)
    # Checkpoint history kept per replica (history.py): a window in seconds and/or a size in bytes.
    # Neither: no history (each committed unit's undo log is emptied).
    history: float | None = None
    history_size: int | None = None

    @property
    def keeps_history(self) -> bool:
        return self.history is not None or self.history_size is not None


class DataDirLock:
    """An exclusive ``flock`` on DATA_DIR/.vdisk-target.lock: one target per data directory. The
    kernel drops it with the process (kill -9 included); the file names the holder's pid."""

    def __init__(self, root: Path) -> None:
        path = root / LOCK_FILE
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise VolumeError(f"another vdisk target (pid {holder}) is using {root}") from None
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address ('' and 0.0.0.0 are not)."""
    try:
        infos = socket.getaddrinfo(host or None, None, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def check_exposure(host: str, config: TargetConfig) -> None:
    """Refuse to listen beyond loopback without a way to authenticate sources (anyone could create
    or take over replicas) unless ``insecure``; warn once on loopback (any local user can still
    mirror into it). Over TLS, trusted source fingerprints or trust on first use count as a way."""
    if config.psk is not None or (config.tls is not None and config.tls.can_authenticate()):
        return
    if not is_loopback(host):
        if not config.insecure:
            raise VolumeError(f"refusing to listen on {host or '*'} without --psk-file or a trusted source: any "
                              "host could write replicas (`vdisk keys trust SOURCE-FINGERPRINT`, --psk-file, "
                              "--trust-on-first-use, or --insecure on a trusted network)")
        log.warning("no --psk-file and listening on %s: any host that reaches it can write replicas", host or "*")
    else:
        log.warning("no --psk-file: any local process can mirror into this target")


class TargetServer:
    """Accepts replication links; at most one source per replica at a time. Nothing a peer sends
    ends the server: each link runs behind ``_guarded``, and a peer's error ends that link only."""

    def __init__(self, store: VolumeStore, config: TargetConfig = TargetConfig()) -> None:
        self.store, self.config = store, config
        self.active: dict[str, str] = {}  # replica name -> source peer
        # replica name -> {"since": unix time the link came up (or went down), "mode": sync|async|None}
        self.links: dict[str, dict[str, object]] = {}
        self.applied_bytes = 0
        self.handshaking = 0  # connections not yet authenticated
        self._ro: dict[str, FileImage] = {}
        self.checkpoints: dict[str, tuple[int, int]] = {}  # replica -> (checkpoint id, time_ns) committed
        self._sessions: dict[str, tuple[trio.CancelScope, trio.Event]] = {}  # source uuid -> its link's
        self._undo: dict[str, UndoLog] = {}  # replica -> its undo log (kept: the export reads through it)
        self._discarding: set[str] = set()  # demoted replicas whose first failback unit is not committed yet
        # replica -> (send frames on its link, its mode): a planned failover asks the source to demote
        self._links_send: dict[str, tuple[Callable[[list[bytes]], Awaitable[None]], str]] = {}
        self._demoted: dict[str, int] = {}  # replica -> checkpoint its source demoted itself at
        self._session_ends: dict[str, trio.Event] = {}
        self._modes: dict[str, str] = {}  # replica -> the mode of its current (or last) session
        self._io_limiter = trio.CapacityLimiter(config.io_threads)
        self._hash_limiter = trio.CapacityLimiter(config.hash_threads)
        self._refusals = RateLimited(log)
        self._accept_errors = RateLimited(log)
        self.index: ContentIndex | None = None  # the content index (dedup), opened by serve()
        self.reduction = {"packs": 0, "inner_bytes": 0, "ref_bytes": 0, "stale_refs": 0, "dedup_queries": 0}

    def statistics(self) -> dict[str, object]:
        return {"handshaking": self.handshaking, "active": len(self.active), "applied_bytes": self.applied_bytes,
                "reduction": dict(self.reduction)}

    def open_index(self) -> None:
        """The content index of this data directory; without it the target offers no dedup."""
        if self.index is None:
            try:
                self.index = ContentIndex(self.store.root / INDEX_FILE)
            except (OSError, sqlite3.Error) as e:  # dedup is an optimisation
                log.error("content index unavailable, dedup is off: %s", e)

    # -- listening -------------------------------------------------------------------------------
    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        check_exposure(host, self.config)
        self.store.root.mkdir(parents=True, exist_ok=True)
        lock = DataDirLock(self.store.root)
        raise_fd_limit()  # every source link (and handshake) is a descriptor, as for `vdisk serve`
        try:
            self.open_index()  # first: a rollback below takes the blocks it restores out of the index
            self.recover_replicas()  # before anything (the NBD export, a source) reads a replica
            try:
                listeners = await trio.open_tcp_listeners(port, host=host)
            except OSError as e:
                raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
            addr = listeners[0].socket.getsockname()
            task_status.started(f"{addr[0]}:{addr[1]}")
            async with trio.open_nursery() as nursery:
                for lst in listeners:
                    nursery.start_soon(self._accept_loop, lst, nursery)
        finally:
            if self.index is not None:  # every session has ended (they run in the nursery above)
                self.index.close()
                self.index = None
            lock.release()

    def undo_for(self, name: str) -> UndoLog:
        undo = self._undo.get(name)
        if undo is None:
            undo = self._undo[name] = UndoLog(self.store.root / f"{name}{UNDO_SUFFIX}", self.store.meta(name).size)
            if self.config.keeps_history:
                undo.archive = History(self.store.root, name).archive
        return undo

    def prune_history(self, name: str) -> None:
        """Retention (worker thread): the oldest units past the window or size go, pins respected."""
        if self.config.keeps_history:
            n = History(self.store.root, name).prune(self.config.history, self.config.history_size)
            if n:
                log.info("replica %s: %d old checkpoint(s) left the history", name, n)

    def recover_replicas(self) -> None:
        """After a crash: roll every replica back to its last committed checkpoint (a unit that was
        being applied when the target died), so a DR reader never sees a torn checkpoint."""
        for name in self._recorded_names():
            if not (self.store.root / f"{name}{UNDO_SUFFIX}").exists() or self._cp_mode(name) == "sync":
                continue  # (a sync session's open unit is never rolled back: its writes were acknowledged)
            try:
                lock = self.store.lock(name)
            except VolumeError as e:
                log.error("replica %s: cannot roll back its unfinished checkpoint: %s", name, e)
                continue
            try:
                image = self.store.open_image(name)
                try:
                    undo = self.undo_for(name)
                    if undo.recover(image, self.read_checkpoint(name)):
                        self._forget_restored(name, undo)
                finally:
                    image.close()
            except (OSError, VolumeError) as e:
                log.error("replica %s: cannot roll back its unfinished checkpoint: %s", name, e)
            finally:
                self.undo_for(name).close()
                lock.release()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:  # EMFILE, ENFILE, ENOBUFS...: wait a little rather than spin or die
                    self._accept_errors(logging.ERROR, "accept failed: %s", e.strerror or e)
                    await trio.sleep(0.1)
                    continue
                if self.handshaking >= self.config.max_handshakes:
                    self._refusals(logging.WARNING, "refused a connection: %d connections are still in their "
                                   "handshake (at most %d)", self.handshaking, self.config.max_handshakes)
                    stream.socket.close()
                    continue
                self.handshaking += 1
                nursery.start_soon(self._guarded, stream)

    async def _guarded(self, stream: trio.SocketStream) -> None:
        """The boundary of one link: an exception here is our bug, logged as that link's internal
        error with its traceback, and never ends the daemon (Cancelled and KeyboardInterrupt pass)."""
        counted = [True]  # handle() clears it once the peer has authenticated
        try:
            await self.handle(stream, counted)
        except* Exception:  # Cancelled and KeyboardInterrupt (also inside groups) propagate
            log.exception("internal error on the link from %s (the link is closed)", _peer(stream))
        finally:
            if counted[0]:
                self.handshaking -= 1
            try:
                stream.socket.close()  # no-op if handle() closed it
            except OSError:
                pass

    # -- one source ------------------------------------------------------------------------------
    async def handle(self, stream: trio.SocketStream, counted: list[bool] | None = None) -> None:
        try:
            stream.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # already reset by the peer
            return
        # A small buffer until the peer has authenticated (an idle connection costs kilobytes, not
        # the 16 MiB a source gets after the Welcome).
        link = Link(stream.socket, Connection(Role.TARGET, self.config.psk, reader=FrameReader(HANDSHAKE_BUFFER)))
        try:
            await self._handle(link, counted)
        finally:
            with trio.CancelScope(shield=True):
                await link.close()  # always: the Link's socket object shares the stream's descriptor

    async def _handle(self, link: Link, counted: list[bool] | None) -> None:
        name: str | None = None
        hello: Hello | None = None
        lock = image = None
        undo: UndoLog | None = None
        session: tuple[trio.CancelScope, trio.Event] | None = None
        session_uuid = ""
        try:
            await secure_target(link, self.config.tls, self.config.handshake_timeout)
            with trio.move_on_after(self.config.handshake_timeout) as scope:
                events = await link.receive()
            if scope.cancelled_caught:
                # Logged as "source ADDR: ...": the address is not repeated in the message.
                raise PeerSilent(f"did not complete the handshake in {self.config.handshake_timeout:g}s")
            if counted is not None and counted[0]:
                counted[0] = False
                self.handshaking -= 1
            hello = events[0]
            if not isinstance(hello, Hello) or any(isinstance(e, Bye) for e in events):
                log.info("source %s closed the link during the handshake", link.peer)
                return
            session_uuid = hello.volume_uuid
            session = (trio.CancelScope(), trio.Event())
            await self._take_over(session_uuid, link.peer, session)
            try:
                name, created = self._replica_for(hello)
                lock = self.store.lock(name)
            except VolumeBusy:
                raise Refused(f"replica {name!r} is busy: another source is mirroring into it") from None
            except VolumeError as e:
                raise Refused(str(e)) from None
            lock.describe({"pid": os.getpid(), "replica_of": hello.volume_uuid, "source": link.peer})
            # Was the replica written behind the mirror's back since the last session? (seal.py)
            try:
                verdict = seals.admit(self.store, name, hello.name, created=created,
                                      discard=seals.DISCARD_REPLICA in hello.caps)
                if verdict.note:
                    log.warning("replica %s: %s", name, verdict.note)
                # A replica that cannot be opened (its image no longer matches its metadata) is
                # that source's refusal, with the reason, not an internal error of the link.
                image = seals.SealedImage(self.store.open_image(name), self.store, name, hello.name)
            except VolumeError as e:
                raise Refused(str(e)) from None
            # A unit left half applied (a lost link, a crash) is rolled back first. Async sources
            # resume after the checkpoint the replica committed, their units applied under the undo
            # log; a sync session writes the replica directly, so from here it is at no checkpoint.
            undo = self.undo_for(name)
            committed = self.read_checkpoint(name)
            sync_history = hello.mode == "sync" and self.config.keeps_history
            if self._cp_mode(name) == "sync":
                # A sync session with history left its unit open: acknowledged writes, never rolled
                # back. Another sync session goes on with it; anything else starts over.
                if not sync_history:
                    await trio.to_thread.run_sync(History(self.store.root, name).clear,
                                                  "an async or history-less session after a sync one",
                                                  limiter=self._io_limiter)
                    await trio.to_thread.run_sync(undo.discard, limiter=self._io_limiter)
                    self._cp_path(name).unlink(missing_ok=True)
                    committed = (0, 0)
            else:
                await trio.to_thread.run_sync(undo.recover, image, committed, limiter=self._io_limiter)
            keep = bool((self.store.meta(name).extra.get("replica") or {}).get("keep_discarded"))
            if keep and (hello.mode == "sync" or not self.config.keeps_history):
                raise Refused(f"replica {name!r} keeps what a failback overwrites as checkpoint 0 of its history: "
                              "mirror into it in async mode, into a target run with --history")
            if (hello.mode == "sync" and not sync_history) or not self.config.keeps_history:
                # Written without undo from here (sync), or not kept (no --history): the kept
                # units would no longer lead to the replica.
                await trio.to_thread.run_sync(History(self.store.root, name).clear,
                                              f"a {hello.mode} session without history" if hello.mode == "sync"
                                              else "the target runs without --history", limiter=self._io_limiter)
            if sync_history:
                cp = committed
                if cp[0]:  # from here the unit is a sync one: kept open, never rolled back
                    await trio.to_thread.run_sync(self._record_cp, name, cp, "sync", limiter=self._io_limiter)
                await trio.to_thread.run_sync(undo.resume, cp, limiter=self._io_limiter)
            elif hello.mode == "sync":
                cp = (0, 0)
                undo.discard()
                undo = None  # nothing to roll back at the end of this session
                self._cp_path(name).unlink(missing_ok=True)
            else:
                cp = committed
                if keep:  # a failback into a demoted volume: its first unit is checkpoint 0
                    self._discarding.add(name)
                    await trio.to_thread.run_sync(undo.begin, (0, time.time_ns()), True, limiter=self._io_limiter)
                else:
                    await trio.to_thread.run_sync(undo.begin, cp, limiter=self._io_limiter)
            self.checkpoints[name] = cp
            meta = seals.open_session(self.store, name, {
                "source_uuid": hello.volume_uuid, "source_name": hello.name, "source_addr": link.peer,
                "generation": hello.generation, "last_connected": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
            caps = self._caps(hello)
            if self.index is not None and CAP_DEDUP not in caps:  # this session will not keep it true
                await trio.to_thread.run_sync(self.index.drop, _vol(hello.volume_uuid), limiter=self._io_limiter)
            link.conn.accept(Welcome(meta.uuid, name, created, hello.generation, verdict.verify, cp[0], cp[1],
                                     caps, sync_history))
            self._modes[name] = hello.mode
            link.conn.reader.reserve(RECV_BUFFER)
            await link.send_control()
            self.active[name] = link.peer
            self.links[name] = {"since": time.time(), "mode": hello.mode}
            log.info("source %s mirrors %r (%s) into replica %s (%s)", link.peer, hello.name, hello.volume_uuid,
                     name, hello.mode if hello.mode == "sync" else f"async, at checkpoint {cp[0]}")
            self._session_ends[name] = session[1]
            with session[0]:
                await self._session(link, image, hello.size, name, undo,
                                    _vol(hello.volume_uuid) if CAP_DEDUP in caps else None, hello.mode)
        except (Refused, seals.SplitBrain) as e:
            log.warning("refused source %s: %s", link.peer, e)
            link.conn.fail(str(e), e.code)
            return
        except PeerError as e:
            log.warning("source %s: %s", link.peer, e)
        except PeerClosed:  # a source stopping (or its host gone): "disconnected" below says it
            pass
        except WireError as e:
            log.warning("source %s: %s", link.peer, e)
            # no-op if the connection already queued its reason
            link.conn.fail(str(e), getattr(e, "code", "protocol"))
        except OSError as e:  # the replica's disk failed: tell the source, which degrades
            log.error("replica %s: %s", name, e, exc_info=log.isEnabledFor(logging.DEBUG))
            link.conn.fail(f"target I/O error on replica {name}: {e.strerror or e}", "io")
        finally:
            if name is not None and self.active.get(name) == link.peer:
                del self.active[name]
                self.links[name] = {"since": time.time(), "mode": None}
                log.info("replica %s: source %s disconnected", name, link.peer)
            if image is not None:
                with trio.CancelScope(shield=True):  # before the lock goes: nobody else can write yet
                    if undo is not None and hello is not None and hello.mode == "sync":
                        undo.close()  # a sync unit stays open: its writes were acknowledged
                    elif undo is not None:
                        await self._roll_back(undo, image)
                    await self._seal(image)
                image.close()
            if lock is not None:
                lock.release()
            if session is not None:
                session[1].set()
                if self._sessions.get(session_uuid) is session:
                    del self._sessions[session_uuid]

    def _forget_restored(self, name: str, undo: UndoLog) -> None:
        """A rollback put old content back: the content index must not name those blocks for what
        the rolled-back unit wrote (the hash check would catch it, at the cost of a reconnect)."""
        if self.index is None or not undo.restored:
            return
        try:
            rep = self.store.meta(name).extra.get("replica")
            vol = _vol(rep["source_uuid"])  # type: ignore[index]
        except (VolumeError, KeyError, TypeError, ValueError):
            return
        try:
            for off, n in undo.restored:
                self.index.forget(vol, off, n)
        except sqlite3.Error as e:  # the index is a hint: a stale entry is caught by the hash check
            log.warning("replica %s: content index not updated after a rollback: %s", name, e)

    async def _roll_back(self, undo: UndoLog, image: seals.SealedImage) -> None:
        """The link ended mid-unit: the replica goes back to its last committed checkpoint now (a
        DR host may mount it), not only at the next connect."""
        try:
            n = await trio.to_thread.run_sync(undo.rollback, image, limiter=self._io_limiter)
            if n:
                log.info("replica %s: the link ended before checkpoint %d's successor committed: rolled "
                         "back %d bytes", image.name, undo.base[0], n)
                await trio.to_thread.run_sync(self._forget_restored, image.name, undo, limiter=self._io_limiter)
        except OSError as e:
            log.error("replica %s: cannot roll back the unfinished checkpoint (done at the next connect "
                      "or start): %s", image.name, e)
            return
        undo.close()

    async def _seal(self, image: seals.SealedImage) -> None:
        """The session is over: record the image as the target leaves it (or a split brain, if
        someone else wrote it meanwhile). If that fails, session_open stays and the next connect
        compares."""
        try:
            reason = await trio.to_thread.run_sync(lambda: image.seal(session_open=False), limiter=self._io_limiter)
        except (OSError, VolumeError) as e:
            log.error("replica %s: cannot record its seal (the next session starts with a compare): %s",
                      image.name, e)
            return
        if reason is not None and not image.reported:
            log.error("%s", seals.message(image.name, image.source_name, reason))

    async def _take_over(self, uuid: str, peer: str, session: tuple[trio.CancelScope, trio.Event]) -> None:
        """A source that reconnects (authenticated) replaces its previous link: after a partition
        the old one may look alive here until it times out, and would keep the replica locked.
        ``session`` is registered at once, before waiting: of connections of one source racing
        each other, the newest wins and is the one a later reconnect can replace (registering
        after the wait let a loser unregister the winner, whose replica then stayed "busy")."""
        old = self._sessions.get(uuid)
        self._sessions[uuid] = session
        if old is not None:
            log.warning("source %s reconnects for %s: dropping its previous link", peer, uuid)
            old[0].cancel()
            with trio.move_on_after(5):
                await old[1].wait()
        if self._sessions.get(uuid) is not session:
            raise Refused("a newer connection of this source replaced this one", "busy")

    def _caps(self, hello: Hello) -> tuple[str, ...]:
        """What this target takes of the source's offer (dedup references travel inside packs)."""
        if hello.mode != "async" or CAP_ZSTD not in hello.caps:
            return ()
        return (CAP_ZSTD,) + ((CAP_DEDUP,) if self.index is not None and CAP_DEDUP in hello.caps else ())

    def _reader(self) -> Callable[[bytes, int, int], bytes | None]:
        """Reads ``length`` bytes at ``offset`` of the replica of source volume ``vol`` (any thread;
        None if there is no such replica or the range is beyond it)."""
        names: dict[bytes, str | None] = {}

        def read(vol: bytes, offset: int, length: int) -> bytes | None:
            if vol not in names:
                names[vol] = None
                for n in self._recorded_names():
                    try:
                        rep = self.store.meta(n).extra.get("replica")
                    except VolumeError:
                        continue
                    if isinstance(rep, dict) and rep.get("source_uuid") == str(_uuid_of(vol)):
                        names[vol] = n
                        break
            name = names[vol]
            if name is None:
                return None
            try:
                fd = os.open(self.store.image_path(name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        return read

    def _replica_for(self, hello: Hello) -> tuple[str, bool]:
        """(name, created): the replica of this source uuid, created (sparse) if there is none. A
        replica whose image is gone is still that source's (admit says split brain): a new one
        beside it would be synced in full while the old record stays behind."""
        for n in self._recorded_names():
            try:
                rep = self.store.meta(n).extra.get("replica")
            except VolumeError:
                continue
            if isinstance(rep, dict) and rep.get("source_uuid") == hello.volume_uuid:
                size = self.store.meta(n).size
                if size != hello.size:
                    raise Refused(f"size mismatch: source volume is {hello.size} bytes, replica {n} is {size}")
                return n, False
        self._refuse_promoted(hello)
        adopted = self._adopt(hello)
        if adopted is not None:
            return adopted, False
        try:
            name = validate_name(hello.name)
            if not NAME_RE.fullmatch(name):  # ``$`` in a pattern also matches before a final newline
                raise VolumeError(f"invalid volume name {name!r}")
        except VolumeError:
            name = f"replica-{hello.volume_uuid[:8]}"  # the uuid's form is checked by the codec
        if self.store.exists(name):
            name = f"{name}-{hello.volume_uuid[:8]}"
        self.store.create(name, hello.size, block_size=hello.block_size,
                          extra={"replica": {"source_uuid": hello.volume_uuid, "source_name": hello.name}})
        return name, True

    def _refuse_promoted(self, hello: Hello) -> None:
        """The source's replica here was promoted by a failover: the two copies have diverged (a
        new generation). Mirroring on would start a second replica; the operator fails back instead."""
        for n in self._recorded_names():
            try:
                promoted = self.store.meta(n).extra.get("promoted")
            except VolumeError:
                continue
            if isinstance(promoted, dict) and promoted.get("from_source_uuid") == hello.volume_uuid:
                raise Refused(f"split brain: replica {n!r} of this volume was promoted by a failover at "
                              f"{promoted.get('at')}: it is the primary now. Run `vdisk failback {hello.name}` on "
                              "the source's site to make it the replica of the promoted volume", seals.SPLIT_BRAIN)

    def _adopt(self, hello: Hello) -> str | None:
        """A failback: the source was promoted from volume ORIGIN (its Hello cap), and `vdisk
        failback` demoted ORIGIN here to wait for it. The pair is made: ORIGIN becomes its replica
        (no seal yet, so the source compares Merkle trees and sends only what differs)."""
        origin = next((c[len(ORIGIN_CAP):] for c in hello.caps if c.startswith(ORIGIN_CAP)), "")
        for n in self._recorded_names():
            try:
                meta = self.store.meta(n)
            except VolumeError:
                continue
            rep = meta.extra.get("replica")
            if not isinstance(rep, dict) or not rep.get("awaiting_failback"):
                continue
            if not ((origin and meta.uuid == origin) or rep.get("awaiting_uuid") == hello.volume_uuid):
                continue
            if meta.size != hello.size:
                raise Refused(f"size mismatch: source volume is {hello.size} bytes, demoted volume {n} is {meta.size}")
            rep = {k: v for k, v in rep.items() if k not in ("awaiting_failback", "awaiting_uuid")}
            rep.update(source_uuid=hello.volume_uuid, source_name=hello.name)
            self.store.update(n, replica=rep)
            log.warning("replica %s: the volume promoted from it (%s, %s) takes it over (failback)", n, hello.name,
                        hello.volume_uuid)
            return n
        return None

    def _recorded_names(self) -> list[str]:
        """Volumes with metadata here, whether or not their image exists (store.names needs both)."""
        root = self.store.root
        return [p.name[:-5] for p in sorted(root.glob("*.json")) if is_valid_name(p.name[:-5])] if root.is_dir() else []

    def _cp_path(self, name: str) -> Path:
        return self.store.root / f"{name}{CHECKPOINT_SUFFIX}"

    def _record_cp(self, name: str, cp: tuple[int, int], mode: str) -> None:
        write_json_atomic(self._cp_path(name), {"id": cp[0], "time_ns": cp[1], "mode": mode})

    def _cp_mode(self, name: str) -> str:
        """Which kind of session committed the replica's last checkpoint ("async" if unrecorded)."""
        try:
            mode = json.loads(self._cp_path(name).read_text()).get("mode", "async")
        except (OSError, ValueError, AttributeError):
            return "async"
        return mode if mode in ("sync", "async") else "async"

    def read_checkpoint(self, name: str) -> tuple[int, int]:
        """(id, time_ns) of the last checkpoint committed on ``name``; (0, 0) if none or unreadable."""
        return read_checkpoint(self.store.root, name)

    async def _session(self, link: Link, image: ReplicaImage, size: int, name: str = "",
                       undo: UndoLog | None = None, dedup: bytes | None = None, mode: str = "sync") -> None:
        """The frame loop and this session's hasher; when the loop ends the hasher stops too (a hash
        still running in its thread gives up within one chunk), so nothing outlives the link."""
        send_lock = trio.StrictFIFOLock()  # two tasks send on one socket: one waits for it at a time

        async def send(frames: list[bytes]) -> None:
            with link.outbox.lock:
                link.outbox.put_locked(frames)
            async with send_lock:
                await link.drain()

        hasher = Hasher(image, size, self._hash_limiter, send)
        if name:
            self._links_send[name] = (send, mode)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hasher.run)
                if isinstance(image, seals.SealedImage):
                    nursery.start_soon(image.keep_sealed, self._io_limiter)
                try:
                    await self._apply(link, image, size, hasher, send, name, undo, dedup)
                finally:
                    hasher.stop.set()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # one failing task: raise its own error, for handle()
            raise _single(group) from None
        finally:
            if self._links_send.get(name, (None,))[0] is send:
                del self._links_send[name]

    async def demote(self, name: str, timeout: float = 90.0) -> int:
        """Planned failover: ask the async source mirroring into ``name`` to fence its host writes and
        ship everything; once it says so, its session ends. The checkpoint the replica is at."""
        entry = self._links_send.get(name)
        if entry is None:
            raise VolumeError(f"no source is mirroring into {name!r} now")
        send, mode = entry
        if mode != "async":
            raise VolumeError(f"the source of {name!r} mirrors in sync mode: stop its host writes and `vdisk serve` "
                              "there, then fail over (a sync replica has every acknowledged write)")
        self._demoted.pop(name, None)
        ended = self._session_ends.get(name)
        await send([encode(Demote("planned failover"))])
        with trio.move_on_after(timeout):
            if ended is not None:
                await ended.wait()
        if name not in self._demoted:
            raise VolumeError(f"the source of {name!r} did not finish shipping within {timeout:g}s (or the link "
                              "ended): it keeps its role; try again, or fail over without it")
        return self._demoted.pop(name)

    async def _apply(self, link: Link, image: ReplicaImage, size: int, hasher: Hasher,
                     send: Callable[[list[bytes]], Awaitable[None]], name: str = "",
                     undo: UndoLog | None = None, dedup: bytes | None = None) -> None:
        """Apply every complete frame of each receive (off the trio thread unless the batch is small
        and needs no fdatasync), then ack once; a HashQuery goes to the hasher once the frames before
        it are applied and acknowledged. A Pack's inner frames are applied like frames off the wire;
        a reduced write's references are read (and checked) once everything before it is applied."""
        applied = 0
        unpacker = Unpacker()
        reader = self._reader() if dedup is not None else None
        stats = self.reduction

        async def commit(batch: Batch, before_ack: Callable[[], Awaitable[None]] | None = None) -> int:
            return await self._commit(image, size, batch, applied, send, undo, before_ack, dedup)

        buffered = 0
        while True:
            with trio.move_on_after(self.config.timeout) as scope:
                events = await link.receive()
            if scope.cancelled_caught:
                # A large frame crossing a slow line for longer than the timeout is not silence.
                if link.conn.reader.buffered >= buffered + (64 << 10):
                    buffered = link.conn.reader.buffered
                    continue
                raise PeerSilent(f"went silent for {self.config.timeout:g}s")
            buffered = 0
            batch: Batch = []
            reply = False
            i = 0
            while i < len(events):
                ev = events[i]
                i += 1
                t = type(ev)
                if t is Write or t is Zero or t is Flush:
                    batch.append(ev)  # type: ignore[arg-type]
                elif t is Checkpoint:
                    # Everything before it applied and fdatasync'd (a Flush at its seq), the commit
                    # recorded durably, then the ack that covers it.
                    batch.append(Flush(ev.seq))  # type: ignore[union-attr]
                    applied = await commit(batch, lambda cp=ev: self._commit_checkpoint(name, cp, undo))  # type: ignore[misc]
                    batch = []
                elif t is Pack:
                    inner = link.conn.check_inner(unpacker.unpack(ev))  # type: ignore[arg-type]
                    stats["packs"] += 1
                    stats["inner_bytes"] += ev.inner_size  # type: ignore[union-attr]
                    events[i:i] = inner
                elif t is RWrite:
                    segs = decode_rwrite(ev, size)  # type: ignore[arg-type]
                    if has_refs(segs):
                        if reader is None:
                            raise RemoteProtocolError("bad frame: a dedup reference, but dedup was not negotiated")
                        applied = await commit(batch)  # what the references may read is applied first
                        batch = []
                        try:
                            batch = await trio.to_thread.run_sync(resolve, ev.seq, ev.fua, segs, reader,  # type: ignore[union-attr]
                                                                  limiter=self._io_limiter)
                        except StaleReference:
                            stats["stale_refs"] += 1
                            if self.index is not None:
                                for kind, _off, n, ref in segs:
                                    if kind == S_REF:
                                        await trio.to_thread.run_sync(self.index.forget, ref[0], ref[1], n)
                            raise
                        stats["ref_bytes"] += sum(s[2] for s in segs if s[0] == S_REF)
                    else:
                        out = resolve(ev.seq, ev.fua, segs)  # type: ignore[union-attr]
                        # Entirely coalesced: nothing to apply, but its seq is acknowledged.
                        batch.extend(out or [Write(ev.seq, ev.offset, memoryview(b""))])  # type: ignore[union-attr]
                elif t is DedupQuery:
                    index = self.index
                    if dedup is None or index is None:
                        raise RemoteProtocolError("bad frame: a dedup query, but dedup was not negotiated")
                    stats["dedup_queries"] += 1
                    entries = await trio.to_thread.run_sync(index.lookup, ev.prefixes, limiter=self._io_limiter)  # type: ignore[union-attr]
                    await send([encode_dedup_reply(ev.req, entries)])  # type: ignore[union-attr]
                elif t is Ping:
                    reply = True
                elif t is HashQuery:
                    check_query(ev, size)  # type: ignore[arg-type]
                    applied = await commit(batch)
                    batch = []
                    hasher.submit(ev)  # type: ignore[arg-type]
                elif t is Bye:
                    await commit(batch)
                    return
                elif t is Demoted:  # the source fenced its writes and everything is committed
                    await commit(batch)
                    self._demoted[name] = ev.checkpoint  # type: ignore[union-attr]
                    log.warning("replica %s: its source %s demoted itself at checkpoint %d (planned failover)",
                                name, link.peer, ev.checkpoint)  # type: ignore[union-attr]
                    return
            last = await commit(batch)
            if last == applied and reply:
                await send([encode_ack(applied)])
            applied = last

    async def _commit_checkpoint(self, name: str, cp: Checkpoint, undo: UndoLog | None = None) -> None:
        """The unit's frames are applied and fdatasync'd: record the checkpoint, then empty the undo
        log (in that order: a crash in between leaves a stale log, which is dropped, not rolled back)."""
        if not name:
            return

        def commit() -> None:
            self._record_cp(name, (cp.cp_id, cp.time_ns), self._modes.get(name, "async"))
            if undo is not None:
                undo.commit((cp.cp_id, cp.time_ns))
                if name in self._discarding:  # the overwritten blocks are kept: a normal replica from here
                    self._discarding.discard(name)
                    rep = dict(self.store.meta(name).extra.get("replica") or {})
                    rep.pop("keep_discarded", None)
                    self.store.update(name, replica=rep)
                self.prune_history(name)

        await trio.to_thread.run_sync(commit, limiter=self._io_limiter)
        self.checkpoints[name] = (cp.cp_id, cp.time_ns)

    async def _commit(self, image: ReplicaImage, size: int, batch: Batch, applied: int,
                      send: Callable[[list[bytes]], Awaitable[None]], undo: UndoLog | None = None,
                      before_ack: Callable[[], Awaitable[None]] | None = None, dedup: bytes | None = None) -> int:
        """Apply a run of data frames (their old content saved first, in an async session), then ack
        the last; the new applied seq. A dedup session indexes what it wrote (same worker thread)."""
        if not batch:
            return applied
        sync, nbytes, threaded = check_batch(batch, size)
        save = undo.uncovered(batch_ranges(batch)) if undo is not None and undo.active else None
        index = self.index
        if dedup is not None and index is not None:
            def apply_and_index() -> None:
                apply_batch(image, batch, sync, undo, save)
                index.update(dedup, batch)

            await trio.to_thread.run_sync(apply_and_index, limiter=self._io_limiter)
        elif threaded or save:
            # The receive buffer the Writes point into is not touched until this returns: the frame
            # loop receives again only after it.
            await trio.to_thread.run_sync(apply_batch, image, batch, sync, undo, save, limiter=self._io_limiter)
        else:  # page-cache pwrites of a few KiB: a thread hop would cost more than the writes
            apply_batch(image, batch, False)
        self.applied_bytes += nbytes
        if before_ack is not None:
            await before_ack()
        last = batch[-1].seq
        await send([encode_ack(last)])
        return last

    # -- read-only export (for NBD) --------------------------------------------------------------
    def export_backend(self, name: str) -> Backend | None:
        """A replica for a DR reader: always read-only, whether or not a source is mirroring into it."""
        if name not in self.replica_names():
            return None
        img = self._ro.get(name)
        if img is None:
            img = self._ro[name] = FileImage(self.store.image_path(name), readonly=True,
                                             block=self.store.meta(name).block_size)
        # As of the last committed checkpoint: a unit being applied is read from its undo log.
        return ReadOnlyLayer(CommittedView(img, self.undo_for(name)))

    def replica_names(self) -> list[str]:
        return replica_names(self.store)

    def close(self) -> None:
        for img in self._ro.values():
            img.close()
        self._ro.clear()
        for undo in self._undo.values():
            undo.close()
        if self.index is not None:
            self.index.close()
            self.index = None


def _vol(volume_uuid: str) -> bytes:
    return uuid_mod.UUID(volume_uuid).bytes


def _uuid_of(vol: bytes) -> uuid_mod.UUID:
    return uuid_mod.UUID(bytes=vol)


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, TypeError, ValueError):
        return "?"


def _single(group: BaseExceptionGroup) -> BaseException:
    """The first real error inside (nested) groups; Cancelled is dropped beside one (trio delivers it
    again at the next checkpoint). The group itself if it holds nothing else."""
    stack: list[BaseException] = [group]
    while stack:
        e = stack.pop(0)
        if isinstance(e, BaseExceptionGroup):
            stack[:0] = e.exceptions
        elif not isinstance(e, trio.Cancelled):
            return e
    return group
