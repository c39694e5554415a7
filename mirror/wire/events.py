"""The messages of the replication protocol.

Handshake and control messages are frozen dataclasses carried as JSON (rare, can afford richness).
Data-path messages (Write, Zero, Flush, Checkpoint, Ack, Ping) are immutable named tuples (cheap to build, one
per frame) decoded straight from binary headers; ``Write.data`` is a zero-copy view into the receive buffer, valid until the next
``receive``/``buffer`` call of the reader that produced it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class Hello:
    """Source -> target: who I am and which volume I mirror."""

    version: int
    volume_uuid: str
    name: str
    size: int
    block_size: int
    generation: int
    nonce: bytes
    mode: str = "sync"  # one of MODES; the target refuses any other
    caps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Challenge:
    """Target -> source: the target's nonce and its proof of the key (empty without a key)."""

    version: int
    nonce: bytes
    proof: bytes
    auth: bool


@dataclass(frozen=True)
class Auth:
    """Source -> target: the source's proof of the key (empty without a key). Over TLS also its
    certificate (DER) and its signature over the channel binding and both nonces (connection.py)."""

    proof: bytes
    cert: bytes = b""
    sig: bytes = b""


@dataclass(frozen=True)
class Welcome:
    """Target -> source: the replica is open and locked for this source; data frames may flow."""

    replica_id: str
    replica_name: str
    created: bool
    generation: int
    verify: bool = False  # Merkle-compare before trusting the pairing (the replica may have changed)
    # Async mirrors: the last checkpoint this replica committed (0: none, or written by a sync session
    # since) and its time; the source resumes shipping after it. Optional: older targets omit them.
    checkpoint: int = 0
    checkpoint_time_ns: int = 0
    # The capabilities of the Hello's that the target takes (mirror/reduce.py); older targets omit it:
    # nothing is negotiated and the source sends plain frames.
    caps: tuple[str, ...] = ()
    # The target keeps checkpoint history for sync sessions too: a sync source may send Checkpoint
    # frames (ids after ``checkpoint``) when the replica is consistent. Optional: default False.
    sync_checkpoints: bool = False


@dataclass(frozen=True)
class ErrorMsg:
    """Either side: a fatal error with a message for the user; the sender closes the link."""

    message: str
    code: str = "error"


# Data-path events are immutable named tuples: building one costs ≈ 0.3 µs, a frozen slotted
# dataclass ≈ 2.4 µs, and the target builds one per frame. Equality also compares the type, so
# Ack(5) != Flush(5).


def _typed_eq(self: tuple, other: object) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other)  # type: ignore[arg-type]


def _typed_ne(self: tuple, other: object) -> bool:
    return not _typed_eq(self, other)


class Write(NamedTuple):
    seq: int
    offset: int
    data: memoryview
    fua: bool = False


class Zero(NamedTuple):
    """Make a range read back as zeroes; ``trim`` allows punching a hole."""

    seq: int
    offset: int
    length: int
    fua: bool = False
    trim: bool = False


class Flush(NamedTuple):
    """Make everything up to ``seq`` durable on the replica before acknowledging it."""

    seq: int


class Checkpoint(NamedTuple):
    """Async: every data frame before this one forms checkpoint ``cp_id`` of the source (cut at
    ``time_ns``); an Ack covering it means the replica committed it (durable)."""

    seq: int
    cp_id: int
    time_ns: int


class Ack(NamedTuple):
    """Cumulative: every data frame with a sequence number <= ``seq`` is applied (durable if asked)."""

    seq: int


class Ping(NamedTuple):
    """Keep-alive; answered with an Ack of the last applied seq."""

    token: int


class Pack(NamedTuple):
    """WAN reduction: a chunk of the session's zstd stream holding ``inner_size`` bytes of inner
    frames (Write, Zero, Checkpoint, RWrite); ``reset``: a new zstd frame starts here."""

    inner_size: int
    data: memoryview
    reset: bool = False


class RWrite(NamedTuple):
    """Inside a Pack only: one reduced write of the source (segments of data, zero, skip or a
    reference to a block the target holds); ``payload`` is decoded by mirror/reduce.py."""

    seq: int
    offset: int
    payload: memoryview
    fua: bool = False


class DedupQuery(NamedTuple):
    """Source -> target: which of these blocks do you hold? 16-byte BLAKE3 prefixes."""

    req: int
    prefixes: bytes


class DedupReply(NamedTuple):
    """Target -> source: one 25-byte entry per prefix asked (found, source volume uuid, offset)."""

    req: int
    entries: bytes


for _cls in (Write, Zero, Flush, Checkpoint, Ack, Ping, Pack, RWrite, DedupQuery, DedupReply):
    _cls.__eq__ = _typed_eq  # type: ignore[method-assign,assignment]
    _cls.__ne__ = _typed_ne  # type: ignore[method-assign,assignment]
    _cls.__hash__ = tuple.__hash__  # type: ignore[method-assign,assignment]


@dataclass(frozen=True)
class HashQuery:
    """Source -> target: the Merkle-tree node digests at ``level`` for ``indices`` (verify)."""

    req: int
    leaf_size: int
    level: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class HashReply:
    """Target -> source: 16-byte xxh3-128 digests, one per requested index, in order."""

    req: int
    digests: bytes


@dataclass(frozen=True)
class Bye:
    """Either side: a clean close (no error)."""


@dataclass(frozen=True)
class Demote:
    """Target -> async source (planned failover): fence host writes, ship and commit everything,
    then answer Demoted; the replica is about to be promoted."""

    reason: str = ""


@dataclass(frozen=True)
class Demoted:
    """Async source -> target: host writes are refused from now on and the replica has committed
    everything up to checkpoint ``checkpoint``."""

    checkpoint: int = 0


Event = (Hello | Challenge | Auth | Welcome | ErrorMsg | Write | Zero | Flush | Checkpoint | Ack | Ping | HashQuery
         | HashReply | Bye | Pack | RWrite | DedupQuery | DedupReply | Demote | Demoted)
DATA_EVENTS = (Write, Zero, Flush, Checkpoint, RWrite)
MODES = ("sync", "async")
