"""A replica (a volume whose metadata has a ``replica`` section, written by `vdisk target`) is
read-only to every vdisk command until it is promoted: only its target writes it, so that the
mirror's record of what the replica holds stays true. Promotion belongs to the failover work; until
then `serve`/`mount` need ``--read-only`` and `delete` is refused.
"""
from __future__ import annotations

from typing import Any

from blockdev.volume import VolumeError, VolumeMeta


def replica_section(meta: VolumeMeta) -> dict[str, Any] | None:
    """The ``replica`` section of a volume's metadata, or None for an ordinary volume."""
    rep = meta.extra.get("replica")
    return rep if isinstance(rep, dict) else None


def describe(meta: VolumeMeta, rep: dict[str, Any]) -> str:
    """'a replica of volume X (uuid U) mirrored from HOST:PORT'."""
    where = f" mirrored from {rep['source_addr']}" if rep.get("source_addr") else ""
    return f"a replica of volume {rep.get('source_name')!r} (uuid {rep.get('source_uuid')}){where}"


def refuse_writable(meta: VolumeMeta) -> None:
    """VolumeError if ``meta`` is a replica: opening it writable would change it behind its mirror;
    or if a planned failover demoted it (its replica is the primary now)."""
    mirror = meta.extra.get("mirror")
    if isinstance(mirror, dict) and isinstance(mirror.get("demoted"), dict):
        raise VolumeError(
            f"volume {meta.name!r} was demoted by a planned failover at {mirror['demoted'].get('at')}: its replica is "
            f"the primary now. Serve it --read-only, or run `vdisk failback {meta.name}` to make it that volume's replica")
    rep = replica_section(meta)
    if rep is not None:
        raise VolumeError(
            f"volume {meta.name!r} is {describe(meta, rep)}: it is read-only until promoted; read it "
            f"with `vdisk serve {meta.name} --read-only` or `vdisk mount {meta.name} DIR --read-only`")


def refuse_delete(meta: VolumeMeta) -> None:
    """VolumeError if ``meta`` is a replica (its source would mirror into nothing it knows)."""
    rep = replica_section(meta)
    if rep is not None:
        raise VolumeError(f"volume {meta.name!r} is {describe(meta, rep)}: it cannot be deleted until promoted "
                          "(read it with --read-only)")


def refuse_mirror(meta: VolumeMeta) -> None:
    """VolumeError if ``meta`` is a replica: its target owns its metadata (seals, pairing) and
    rewrites it while mirroring into it, so a mirror configured on it would race with the target
    and could never be served writable anyway."""
    rep = replica_section(meta)
    if rep is not None:
        raise VolumeError(f"volume {meta.name!r} is {describe(meta, rep)}: it cannot be mirrored until promoted "
                          "(mirror its source instead)")
