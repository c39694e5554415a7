"""The replica site: receives a source's frames, applies them in order, acknowledges cumulatively.

Each source volume has one replica here, an ordinary vdisk volume keyed by the source's uuid (its
metadata has a ``replica`` section) and named after the source. While a source mirrors into it the
replica's serve lock is held, so nothing else can open it writable; DR hosts read it through the
read-only NBD export. Frames are checked (checksum, sequence, bounds) before anything is applied,
and FUA/flush fdatasync the replica before the ack that covers them.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from dataclasses import dataclass

import trio

from blockdev.backend import Backend
from blockdev.image.file import FileImage
from blockdev.layers import ReadOnlyLayer
from blockdev.volume import VolumeBusy, VolumeError, VolumeStore, validate_name

from .verify import MerkleTree, build_tree, tree_height
from .wire import Connection, PeerError, PeerSilent, RemoteProtocolError, Role, WireError
from .wire.codec import FrameReader, encode, encode_ack
from .wire.events import Bye, Flush, HashQuery, HashReply, Hello, Ping, Welcome, Write, Zero
from .wire.link import Link

log = logging.getLogger("vdisk.target")
RECV_BUFFER = 16 << 20


class Refused(Exception):
    """The target will not take this source (the message goes to the source)."""


@dataclass(frozen=True)
class TargetConfig:
    psk: bytes | None = None
    timeout: float = 30.0  # silence after which the source is declared gone


class TargetServer:
    """Accepts replication links; at most one source per replica at a time."""

    def __init__(self, store: VolumeStore, config: TargetConfig = TargetConfig()) -> None:
        self.store, self.config = store, config
        self.active: dict[str, str] = {}  # replica name -> source peer
        self.applied_bytes = 0
        self._ro: dict[str, FileImage] = {}
        self._sessions: dict[str, tuple[trio.CancelScope, trio.Event]] = {}  # source uuid -> its link's

    # -- listening -------------------------------------------------------------------------------
    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        addr = listeners[0].socket.getsockname()
        task_status.started(f"{addr[0]}:{addr[1]}")
        async with trio.open_nursery() as nursery:
            for lst in listeners:
                nursery.start_soon(self._accept_loop, lst, nursery)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                stream.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(self.handle, stream)

    # -- one source ------------------------------------------------------------------------------
    async def handle(self, stream: trio.SocketStream) -> None:
        # A large receive buffer: partial frames at its end are moved (copied) to its start, so the
        # bigger it is, the fewer megabyte writes get copied an extra time.
        link = Link(stream.socket, Connection(Role.TARGET, self.config.psk, reader=FrameReader(RECV_BUFFER)))
        name: str | None = None
        lock = image = None
        session: tuple[trio.CancelScope, trio.Event] | None = None
        session_uuid = ""
        try:
            with trio.move_on_after(self.config.timeout) as scope:
                events = await link.receive()
            if scope.cancelled_caught:
                raise PeerSilent(f"source {link.peer} did not complete the handshake")
            hello = events[0]
            assert isinstance(hello, Hello)
            await self._take_over(hello.volume_uuid, link.peer)
            session_uuid = hello.volume_uuid
            session = self._sessions[hello.volume_uuid] = (trio.CancelScope(), trio.Event())
            try:
                name, created = self._replica_for(hello)
                lock = self.store.lock(name)
            except VolumeBusy:
                raise Refused(f"replica {name!r} is busy: another source is mirroring into it") from None
            except VolumeError as e:
                raise Refused(str(e)) from None
            lock.describe({"pid": os.getpid(), "replica_of": hello.volume_uuid, "source": link.peer})
            image = self.store.open_image(name)
            meta = self.store.update(name, replica={
                "source_uuid": hello.volume_uuid, "source_name": hello.name, "generation": hello.generation,
                "last_connected": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
            link.conn.accept(Welcome(meta.uuid, name, created, hello.generation))
            await link.send_control()
            self.active[name] = link.peer
            log.info("source %s mirrors %s (%s) into replica %s", link.peer, hello.name, hello.volume_uuid, name)
            with session[0]:
                await self._apply(link, image, hello.size)
        except Refused as e:
            log.warning("refused source %s: %s", link.peer, e)
            await link.close(message=str(e))
            return
        except PeerError as e:
            log.warning("source %s: %s", link.peer, e)
        except WireError as e:
            log.warning("source %s: %s", link.peer, e)
            link.conn.fail(str(e), "protocol")  # no-op if the connection already queued its reason
        except OSError as e:  # the replica's disk failed: tell the source, which degrades
            log.error("replica %s: %s", name, e)
            link.conn.fail(f"target I/O error on replica {name}: {e.strerror or e}", "io")
        finally:
            if name is not None and self.active.get(name) == link.peer:
                del self.active[name]
            if image is not None:
                image.close()
            if lock is not None:
                lock.release()
            if session is not None:
                session[1].set()
                if self._sessions.get(session_uuid) is session:
                    del self._sessions[session_uuid]
        with trio.CancelScope(shield=True):
            await link.close()

    async def _take_over(self, uuid: str, peer: str) -> None:
        """A source that reconnects (authenticated) replaces its previous link: after a partition
        the old one may look alive here until it times out, and would keep the replica locked."""
        old = self._sessions.get(uuid)
        if old is None:
            return
        log.warning("source %s reconnects for %s: dropping its previous link", peer, uuid)
        old[0].cancel()
        with trio.move_on_after(5):
            await old[1].wait()

    def _replica_for(self, hello: Hello) -> tuple[str, bool]:
        """(name, created): the replica of this source uuid, created (sparse) if there is none."""
        for n in self.store.names():
            try:
                rep = self.store.meta(n).extra.get("replica")
            except VolumeError:
                continue
            if isinstance(rep, dict) and rep.get("source_uuid") == hello.volume_uuid:
                size = self.store.meta(n).size
                if size != hello.size:
                    raise Refused(f"size mismatch: source volume is {hello.size} bytes, replica {n} is {size}")
                return n, False
        try:
            name = validate_name(hello.name)
        except VolumeError:
            name = f"replica-{hello.volume_uuid[:8]}"
        if self.store.exists(name):
            name = f"{name}-{hello.volume_uuid[:8]}"
        self.store.create(name, hello.size, block_size=hello.block_size,
                          extra={"replica": {"source_uuid": hello.volume_uuid, "source_name": hello.name}})
        return name, True

    async def _apply(self, link: Link, image: FileImage, size: int) -> None:
        """Apply every complete frame of each receive, fdatasync once if any asked, ack once."""
        tree: MerkleTree | None = None
        applied = 0
        outbox = link.outbox
        while True:
            with trio.move_on_after(self.config.timeout) as scope:
                events = await link.receive()
            if scope.cancelled_caught:
                raise PeerSilent(f"source {link.peer} went silent for {self.config.timeout:g}s")
            sync = reply = False
            last = applied
            for ev in events:
                t = type(ev)
                if t is Write:
                    n = len(ev.data)
                    if ev.offset + n > size:
                        raise RemoteProtocolError(f"write of {n} bytes at {ev.offset} is beyond the replica's end")
                    image.pwrite(ev.data, ev.offset)
                    self.applied_bytes += n
                    sync = sync or ev.fua
                    last = ev.seq
                elif t is Zero:
                    if ev.offset + ev.length > size:
                        raise RemoteProtocolError(f"zero of {ev.length} bytes at {ev.offset} is beyond the replica's end")
                    image.write_zeroes(ev.length, ev.offset, may_trim=ev.trim)
                    sync = sync or ev.fua
                    last = ev.seq
                elif t is Flush:
                    sync, last = True, ev.seq
                elif t is Ping:
                    reply = True
                elif t is HashQuery:
                    if sync:
                        image.flush()
                        sync = False
                    tree = await self._hash_reply(link, image, size, ev, tree, last)
                    applied = last
                elif t is Bye:
                    return
            if sync:
                image.flush()
            if last != applied or reply:
                applied = last
                with outbox.lock:
                    outbox.put_locked([encode_ack(applied)])
                await link.drain()

    async def _hash_reply(self, link: Link, image: FileImage, size: int, q: HashQuery,
                          tree: MerkleTree | None, applied: int) -> MerkleTree:
        if q.leaf_size < 4096 or q.leaf_size & (q.leaf_size - 1) or q.leaf_size > 64 << 20:
            raise RemoteProtocolError(f"bad verify leaf size {q.leaf_size}")
        top = tree_height(size, q.leaf_size)
        if q.level > top:
            raise RemoteProtocolError(f"verify level {q.level} above the root ({top})")
        if tree is None or q.level == top or len(tree.levels) != top + 1:
            # A root query starts a new verify: hash the replica as it is now (writes before it applied).
            tree = await trio.to_thread.run_sync(build_tree, image, size, q.leaf_size)
        with link.outbox.lock:
            link.outbox.put_locked([encode_ack(applied), encode(HashReply(q.req, tree.nodes(q.level, q.indices)))])
        await link.drain()
        return tree

    # -- read-only export (for NBD) --------------------------------------------------------------
    def export_backend(self, name: str) -> Backend | None:
        """A replica for a DR reader: always read-only, whether or not a source is mirroring into it."""
        if name not in self.replica_names():
            return None
        img = self._ro.get(name)
        if img is None:
            img = self._ro[name] = FileImage(self.store.image_path(name), readonly=True,
                                             block=self.store.meta(name).block_size)
        return ReadOnlyLayer(img)

    def replica_names(self) -> list[str]:
        out = []
        for n in self.store.names():
            try:
                if "replica" in self.store.meta(n).extra:
                    out.append(n)
            except VolumeError:
                continue
        return out

    def close(self) -> None:
        for img in self._ro.values():
            img.close()
        self._ro.clear()
