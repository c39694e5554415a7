"""The messages of the replication protocol.

Handshake and control messages are frozen dataclasses carried as JSON (rare, can afford richness).
Data-path messages (Write, Zero, Flush, Ack, Ping) are slotted frozen dataclasses decoded straight
from binary headers; ``Write.data`` is a zero-copy view into the receive buffer, valid until the next
``receive``/``buffer`` call of the reader that produced it.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    mode: str = "sync"
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
    """Source -> target: the source's proof of the key (empty without a key)."""

    proof: bytes


@dataclass(frozen=True)
class Welcome:
    """Target -> source: the replica is open and locked for this source; data frames may flow."""

    replica_id: str
    replica_name: str
    created: bool
    generation: int


@dataclass(frozen=True)
class ErrorMsg:
    """Either side: a fatal error with a message for the user; the sender closes the link."""

    message: str
    code: str = "error"


@dataclass(frozen=True, slots=True)
class Write:
    seq: int
    offset: int
    data: memoryview
    fua: bool = False


@dataclass(frozen=True, slots=True)
class Zero:
    """Make a range read back as zeroes; ``trim`` allows punching a hole."""

    seq: int
    offset: int
    length: int
    fua: bool = False
    trim: bool = False


@dataclass(frozen=True, slots=True)
class Flush:
    """Make everything up to ``seq`` durable on the replica before acknowledging it."""

    seq: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Cumulative: every data frame with a sequence number <= ``seq`` is applied (durable if asked)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Keep-alive; answered with an Ack of the last applied seq."""

    token: int


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


Event = Hello | Challenge | Auth | Welcome | ErrorMsg | Write | Zero | Flush | Ack | Ping | HashQuery | HashReply | Bye
DATA_EVENTS = (Write, Zero, Flush)
