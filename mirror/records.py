"""What the sync replicator is configured with, remembers, and reports: plain records, no logic."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SyncConfig:
    """How to reach the replica and what to do without it. Timeouts in seconds."""

    host: str
    port: int
    on_link_loss: str = "degrade"  # or "block"
    psk: bytes | None = None
    block_timeout: float = 30.0
    timeout: float = 10.0      # silence after which the target is declared gone
    keepalive: float = 1.0
    backoff_min: float = 0.2
    backoff_max: float = 5.0
    resync_chunk: int = 1 << 20
    resync_window: int = 16 << 20  # resync bytes in flight before waiting for acks
    tls: Any = None  # mirror.secure.SourceTls: encrypt the link (None: plain)


@dataclass(frozen=True)
class VolumeIdentity:
    uuid: str
    name: str
    size: int
    block_size: int
    generation: int
    # The uuid of the volume this one was promoted from (failover): its old site's copy, demoted by
    # `vdisk failback`, takes this volume as its source (sent as Hello cap ``origin:UUID``).
    origin: str = ""

    def caps(self) -> tuple[str, ...]:
        return (f"{ORIGIN_CAP}{self.origin}",) if self.origin else ()


ORIGIN_CAP = "origin:"


@dataclass(frozen=True)
class MirrorStats:
    """A snapshot for `vdisk status` (served over the control socket)."""

    mode: str
    state: str
    target: str
    on_link_loss: str
    dirty_bytes: int
    in_flight: int
    acked_seq: int
    sent_seq: int
    resync_bytes_sent: int
    resync_regions_sent: int
    conflicts: int
    initial_sync: dict[str, Any]
    blocked: int
    connects: int
    al_hot: int
    al_writes: int
    replica: str | None
    last_error: str | None
    save_error: str | None = None  # why the dirty map could not be saved (it is kept in memory)
    rtt_ms: float | None = None  # the last keep-alive's round trip (None before the first)


@dataclass
class Pairing:
    """What the source remembers about its replica (persisted in the volume's ``mirror`` section)."""

    replica_id: str | None = None
    initial_sync_done: bool = False
    sync_total: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # The operator chose to overwrite a split-brain replica: asked in every Hello until a Merkle
    # compare has marked what differs (a new Pairing then drops it).
    discard_replica: bool = False
    # The target refused this pair as split brain (its message): kept so that status says so even
    # while no daemon runs; dropped once a Welcome pairs them again.
    split_brain: str | None = None
