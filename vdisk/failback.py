"""`vdisk failback NAME`: on the side to be overwritten, turn a volume back into the replica of its
counterpart, so that mirroring the counterpart into it reverses the direction without a full copy.

After a failover the DR copy is an ordinary volume that remembers where it came from (``promoted``:
the old source's uuid). On the old site, once it is back, `vdisk failback vol` demotes the old
source: it becomes a replica waiting for the volume promoted from it (``awaiting_failback``). When
that volume mirrors into this data directory's target (`vdisk mirror vol --to OLDSITE`), the target
recognises it (Hello cap ``origin:UUID``) and the pair is made; a replica with no seal is compared
first (Merkle trees, mirror/verify.py), so only the blocks that differ cross the WAN.

Split brain: if this side holds writes the other never received (its async journal or dirty map
is not empty: written after the split, or not shipped before it), those would be overwritten.
Failback refuses until the operator picks the survivor with ``--discard-local``; the blocks the
failback then overwrites here are kept as checkpoint 0 of the replica's history (the target must
run with ``--history``), so `vdisk recover NAME --at 0` brings the discarded side back.

The planned switch back is the same pair of commands with the roles exchanged: stop the host on
the current primary, wait for in_sync, `vdisk failover` on the other side, `vdisk failback` here.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
from collections.abc import Callable
from typing import Any

from blockdev.volume import VolumeBusy, VolumeError, VolumeStore

from .units import format_size


def local_only_bytes(store: VolumeStore, name: str, size: int) -> int:
    """Bytes of writes this volume holds that its mirror never delivered (journal + dirty map)."""
    from mirror.journal import Journal

    from .mirroring import JOURNAL_SUFFIX, recorded_dirty

    total = recorded_dirty(store.root, name, size).dirty_bytes
    jdir = store.root / f"{name}{JOURNAL_SUFFIX}"
    if jdir.is_dir():
        j = Journal.open(jdir)
        try:
            total += sum(n for _o, n in j.ranges(j.first_seq))
        finally:
            j.close()
    return total


def cmd_failback(args: argparse.Namespace) -> int:
    from .cli import emit, store_of
    from .mirroring import JOURNAL_SUFFIX, MIRROR_SIDECARS
    from .replicas import replica_section

    store = store_of(args)
    meta = store.meta(args.name)
    if replica_section(meta) is not None:
        raise VolumeError(f"volume {args.name!r} is already a replica: failback demotes the volume that a failover "
                          "replaced (run it on the old site)")
    mirror, promoted = meta.extra.get("mirror"), meta.extra.get("promoted")
    if not isinstance(mirror, dict) and not isinstance(promoted, dict):
        raise VolumeError(f"volume {args.name!r} is neither mirrored nor promoted by a failover: it has no "
                          "counterpart to fail back to")
    try:
        lock = store.lock(args.name)
    except VolumeBusy:
        raise VolumeError(f"volume {args.name!r} is served: stop `vdisk serve` (and unmount it) first, failback "
                          "overwrites it") from None
    try:
        # Demoted by a planned failover: its writes were fenced, then all shipped and committed.
        demoted = isinstance(mirror, dict) and isinstance(mirror.get("demoted"), dict)
        local = local_only_bytes(store, args.name, meta.size) if isinstance(mirror, dict) and not demoted else 0
        served = (isinstance(promoted, dict) and not isinstance(mirror, dict)
                  and meta.generation > int(promoted.get("generation_before", 0)) + 1)
        if served and not local and not args.discard_local:
            # Promoted, then served writable (its generation moved on): what it got has no journal
            # here to count, and the volume it came from does not have it.
            raise VolumeError(
                f"split brain: volume {args.name!r} was served writable after its failover (generation "
                f"{promoted.get('generation_before', 0) + 1} -> {meta.generation}); failback would overwrite what "
                f"was written then. Keep this side instead, or run `vdisk failback {args.name} --discard-local` (what "
                "is overwritten stays recoverable as checkpoint 0: run this side's target with --history)")
        if local and not args.discard_local:
            raise VolumeError(
                f"split brain: volume {args.name!r} holds {format_size(local)} of writes its replica never received "
                "(written after the split, or not shipped before it); failback would overwrite them. Keep this side "
                "instead (fail over the other way), or run `vdisk failback "
                f"{args.name} --discard-local` to overwrite it (what is overwritten stays recoverable as checkpoint "
                "0: run this side's target with --history)")
        rep: dict[str, Any] = {"source_uuid": None, "source_name": args.name, "awaiting_failback": True,
                               "demoted": {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                           "generation": meta.generation, "discarded_bytes": local}}
        if args.discard_local or local:
            rep["keep_discarded"] = True
        if isinstance(promoted, dict) and isinstance(promoted.get("from_source_uuid"), str):
            # Promoted from that volume, which may mirror here again without being promoted itself
            # (the promotion is given up): it takes this one over as well.
            rep["awaiting_uuid"] = promoted["from_source_uuid"]
        store.update(args.name, replica=rep, mirror=None, promoted=None)
        for suffix in MIRROR_SIDECARS:
            (store.root / f"{args.name}{suffix}").unlink(missing_ok=True)
        shutil.rmtree(store.root / f"{args.name}{JOURNAL_SUFFIX}", ignore_errors=True)
    finally:
        lock.release()
    kept = " (what it overwrites stays recoverable as checkpoint 0)" if rep.get("keep_discarded") else ""
    emit(args, {"name": args.name, "awaiting_failback": True, "discarded_bytes": local,
                "keep_discarded": bool(rep.get("keep_discarded"))},
         f"volume {args.name} is a replica now, waiting for the volume promoted from it: run `vdisk target` here "
         f"and, on the other site, `vdisk mirror {args.name} --to THIS_HOST:PORT --mode async`; only the blocks that "
         f"differ are sent{kept}")
    return 0


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("failback", cmd_failback,
             "on the side to be overwritten: make a volume the replica of its counterpart again (after a "
             "failover), so mirroring the counterpart into it sends only the blocks that differ")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--discard-local", action="store_true",
                    help="overwrite writes only this side has (split brain); they stay recoverable as checkpoint 0")
