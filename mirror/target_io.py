"""Replica I/O off the target's trio thread: batches of frames applied by a worker thread, and Merkle
hashing for verify by another, so one replica's slow disk (an fdatasync, a large read) stalls only
the link that uses it, never the other sources of the same target.

Ordering (per replica): the frame loop hands one receive's data frames to ``apply_batch`` and waits
for it before it receives again, so frames apply in sequence order and ``Write.data`` (a view into
the receive buffer) stays valid while the worker reads it. The ack for a batch is queued only after
the batch is applied, and fdatasync'd if any frame of it was FUA or a flush.

Verify (``Hasher``): a HashQuery is answered by a worker thread while the frame loop keeps applying
and acknowledging writes. A root query starts a new tree; it is built from the replica as it is
after every data frame that preceded the query on the wire (they are applied before the query is
handed over), and may also see frames applied while it hashes. The source hashes its own live image
the same way, so a region written during a verify may be reported as differing (``--repair`` resends
it, which is harmless); a region that differed before the query and is not written meanwhile is
always found.
"""
from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

from .undo import UndoLog
from .verify import FANOUT, Abandoned, MerkleTree, build_tree, check_leaf
from .wire import RemoteProtocolError
from .wire.codec import encode_hash_reply
from .wire.events import Flush, HashQuery, Write, Zero

INLINE_BYTES = 256 << 10  # a batch with no fdatasync and fewer bytes is applied on the trio thread
MAX_QUERIES = 16  # verify queries queued per session (a source asks one at a time)


class ReplicaImage(Protocol):
    """What the target needs of a replica (FileImage; tests wrap it to inject faults)."""

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool = False) -> object: ...
    def write_zeroes(self, length: int, offset: int, fua: bool = False, may_trim: bool = True,
                     fast: bool = False) -> object: ...
    def flush(self) -> object: ...
    def pread(self, buf: memoryview, offset: int) -> None: ...
    def extents(self, length: int, offset: int) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...


Batch = list[Write | Zero | Flush]


def check_batch(batch: Batch, size: int) -> tuple[bool, int, bool]:
    """(needs fdatasync, bytes written, needs a thread); RemoteProtocolError for a frame beyond the
    replica's end. A zero or trim always takes a thread: fallocate may wait on the disk like a sync."""
    sync = zero = False
    nbytes = 0
    for ev in batch:
        t = type(ev)
        if t is Write:
            n = len(ev.data)  # type: ignore[union-attr]
            if ev.offset + n > size:  # type: ignore[union-attr]
                raise RemoteProtocolError(f"write of {n} bytes at {ev.offset} is beyond the replica's end")  # type: ignore[union-attr]
            nbytes += n
            sync = sync or ev.fua  # type: ignore[union-attr]
        elif t is Zero:
            if ev.offset + ev.length > size:  # type: ignore[union-attr]
                raise RemoteProtocolError(f"zero of {ev.length} bytes at {ev.offset} is beyond the replica's end")  # type: ignore[union-attr]
            zero = True
            sync = sync or ev.fua  # type: ignore[union-attr]
        else:
            sync = True
    return sync, nbytes, sync or zero or nbytes >= INLINE_BYTES


def batch_ranges(batch: Sequence[Write | Zero | Flush]) -> list[tuple[int, int]]:
    """(offset, length) of every data frame of a batch (what an undo log must save first)."""
    out = []
    for ev in batch:
        t = type(ev)
        if t is Write:
            out.append((ev.offset, len(ev.data)))  # type: ignore[union-attr]
        elif t is Zero:
            out.append((ev.offset, ev.length))  # type: ignore[union-attr]
    return out


def apply_batch(image: ReplicaImage, batch: Sequence[Write | Zero | Flush], sync: bool,
                undo: UndoLog | None = None, save: list[tuple[int, int]] | None = None) -> None:
    """Apply frames in order, then fdatasync once if asked (any thread). ``save``: block runs whose
    old content goes to the undo log (durably) before any frame of the batch is written."""
    if undo is not None and save:
        undo.save(image, save)  # type: ignore[arg-type]
    for ev in batch:
        t = type(ev)
        if t is Write:
            image.pwrite(ev.data, ev.offset)  # type: ignore[union-attr]
        elif t is Zero and ev.length:  # type: ignore[union-attr]
            image.write_zeroes(ev.length, ev.offset, may_trim=ev.trim)  # type: ignore[union-attr]
    if sync:
        image.flush()


def check_query(q: HashQuery, size: int) -> None:
    """RemoteProtocolError unless the query names nodes that exist in the tree of this replica."""
    try:
        check_leaf(size, q.leaf_size)
    except ValueError as e:
        raise RemoteProtocolError(str(e)) from None
    count, level = (size + q.leaf_size - 1) // q.leaf_size, 0
    while level < q.level and count > 1:
        count, level = (count + FANOUT - 1) // FANOUT, level + 1
    if level != q.level:
        raise RemoteProtocolError(f"verify level {q.level} above the root ({level})")
    if q.indices and max(q.indices) >= count:
        raise RemoteProtocolError(f"verify index {max(q.indices)} beyond level {q.level} ({count} nodes)")


class Hasher:
    """One session's verify queries, answered in order by a worker thread (see the module doc)."""

    def __init__(self, image: ReplicaImage, size: int, limiter: trio.CapacityLimiter,
                 send: Callable[[list[bytes]], Awaitable[None]]) -> None:
        self._image, self._size, self._limiter, self._send_frames = image, size, limiter, send
        self._send, self._recv = trio.open_memory_channel[HashQuery](MAX_QUERIES)
        self.stop = threading.Event()  # set when the session ends: a running hash gives up within a chunk
        self._tree: MerkleTree | None = None
        self._leaf = 0

    def submit(self, q: HashQuery) -> None:
        """Queue a checked query (frame loop); a peer flooding queries is a protocol error."""
        try:
            self._send.send_nowait(q)
        except trio.WouldBlock:
            raise RemoteProtocolError(f"more than {MAX_QUERIES} verify queries in flight") from None

    async def run(self) -> None:
        try:
            async for q in self._recv:
                tree = self._tree
                if tree is None or q.leaf_size != self._leaf or q.level == tree.top:
                    # A root query starts a new verify: hash the replica as it is now.
                    self._tree = None
                    tree = await trio.to_thread.run_sync(build_tree, self._image, self._size, q.leaf_size,
                                                         self.stop, limiter=self._limiter)
                    self._tree, self._leaf = tree, q.leaf_size
                await self._send_frames([encode_hash_reply(q.req, tree.nodes(q.level, q.indices))])
        except Abandoned:
            return
