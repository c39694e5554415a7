"""`vdisk checkpoints`, `vdisk recover` and `vdisk failover`: point-in-time recovery and promotion
of a replica at the DR site, from the history `vdisk target --history` keeps (mirror/history.py).

All three work beside a running target: `checkpoints` and `recover` only read the replica and its
history (a recovery pins the checkpoint it reads, so retention keeps it); `failover` takes the
replica's lock, which the target holds only while a source mirrors into it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

from blockdev.volume import VolumeBusy, VolumeError, VolumeStore, write_json_atomic

from .units import format_size, parse_duration

log = logging.getLogger("vdisk.recover")
COPY_CHUNK = 4 << 20


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="seconds")


def resolve_at(spec: str, cps: list[Any], name: str) -> Any:
    """The checkpoint ``--at`` names: an id, ``latest``, an ISO 8601 local time or ``-10m`` (the
    newest checkpoint at or before that time)."""
    if not cps:
        raise VolumeError(f"replica {name!r} has no recoverable checkpoint (is its target running with --history, "
                          "and has an async source committed a checkpoint?)")
    text = spec.strip()
    if text == "latest":
        return cps[-1]
    if text.isdigit():
        want = int(text)
        for c in cps:
            if c.id == want:
                return c
        raise VolumeError(f"checkpoint {want} of {name!r} is not in its history "
                          f"(recoverable: {cps[0].id}..{cps[-1].id}; see `vdisk checkpoints {name}`)")
    if text.startswith("-"):
        try:
            when = time.time() - parse_duration(text[1:], "relative time")
        except ValueError as e:
            raise VolumeError(str(e)) from None
    else:
        try:
            t = dt.datetime.fromisoformat(text)
        except ValueError:
            raise VolumeError(f"invalid --at {spec!r}: use a checkpoint id, 'latest', an ISO 8601 time "
                              "(2026-12-06T01:30:00, local unless it has an offset) or a relative time like -10m") from None
        when = (t if t.tzinfo else t.astimezone()).timestamp()
    best = None
    for c in cps:
        if c.time_ns <= when * 1e9:
            best = c
    if best is None:
        raise VolumeError(f"no checkpoint of {name!r} at or before {_when(int(when * 1e9))}: the oldest kept is "
                          f"{cps[0].id} at {_when(cps[0].time_ns)}")
    return best


def _replica_meta(store: VolumeStore, name: str,
                  doing: str = "point-in-time recovery reads a replica's history") -> Any:
    meta = store.meta(name)
    if not isinstance(meta.extra.get("replica"), dict):
        raise VolumeError(f"volume {name!r} is not a replica ({doing})")
    return meta


# -- checkpoints ----------------------------------------------------------------------------------
def cmd_checkpoints(args: argparse.Namespace) -> int:
    from mirror.history import History

    from .cli import emit, store_of

    store = store_of(args)
    _replica_meta(store, args.name)
    cps = History(store.root, args.name).checkpoints()
    if args.json:
        emit(args, {"name": args.name, "checkpoints": [c.to_json() for c in cps]}, "")
        return 0
    if not cps:
        print(f"no checkpoints of {args.name} (run the target with --history to keep them)")
        return 0
    now = time.time()
    print(f"{'ID':>10}  {'TIME':<25}  {'AGE':>8}  {'BYTES':>9}")
    for c in cps:
        age = now - c.time_ns / 1e9
        shown = f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m" if age < 7200 else f"{age / 3600:.1f}h"
        print(f"{c.id:>10}  {_when(c.time_ns):<25}  {shown:>8}  {format_size(c.bytes):>9}"
              + ("  (latest: the replica)" if c is cps[-1] else ""))
    return 0


# -- recover --------------------------------------------------------------------------------------
def open_view(store: VolumeStore, name: str, at_spec: str) -> tuple[Any, Any]:
    """(HistoryView of the checkpoint ``at_spec`` names, that checkpoint)."""
    from blockdev.image.file import FileImage
    from mirror.history import History, HistoryView, NotRecoverable

    meta = _replica_meta(store, name)
    cp = resolve_at(at_spec, History(store.root, name).checkpoints(), name)
    image = FileImage(store.image_path(name), readonly=True, block=meta.block_size)
    try:
        view = HistoryView(image, store.root, name, meta.size, cp.id)
    except NotRecoverable as e:
        image.close()
        raise VolumeError(str(e)) from None
    except BaseException:
        image.close()
        raise
    return view, cp


def cmd_recover(args: argparse.Namespace) -> int:
    from .cli import LOG_DATES, LOG_FORMAT, UsageError, store_of

    if bool(args.nbd) == bool(args.to):
        raise UsageError("give --nbd tcp:HOST:PORT (an export) or --to FILE|VOLUME (a copy), one of them")
    if args.to and args.writable:
        raise UsageError("--writable is for an --nbd export (--to writes a copy, which is yours to change)")
    store = store_of(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=LOG_FORMAT.format("recover"), datefmt=LOG_DATES)
    if args.to:
        return _materialise(store, args)
    from .daemon import Listen

    listens = [Listen.parse(s) for s in args.nbd]
    view, cp = open_view(store, args.name, args.at)
    try:
        return _export(store, args, view, cp, listens)
    finally:
        view.close()


def _export(store: VolumeStore, args: argparse.Namespace, view: Any, cp: Any, listens: list[Any]) -> int:
    import trio

    from blockdev.layers import ReadOnlyLayer
    from blockdev.layers.cow import CowLayer
    from blockdev.nbd.server import Export, NBDServer

    from .daemon import NBDListeners

    backend = CowLayer(view, store.root) if args.writable else ReadOnlyLayer(view)
    mode = "writable, changes in a scratch overlay" if args.writable else "read-only"
    export = Export(args.name, backend, f"vdisk replica {args.name} at checkpoint {cp.id} ({mode})")

    async def main() -> None:
        listeners = NBDListeners(NBDServer(lambda n: export if n == args.name else None, lambda: [args.name]))
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    where = await listeners.start(nursery, listens)
                    print(f"recovering {args.name} at checkpoint {cp.id} ({_when(cp.time_ns)}), {mode}, on "
                          f"{', '.join(where)} (pid {os.getpid()})", flush=True)
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()
        finally:
            listeners.close()

    try:
        trio.run(main)
    finally:
        backend.close()  # the overlay, and the view below it
    return 0


def _materialise(store: VolumeStore, args: argparse.Namespace) -> int:
    """Copy the view into a new FILE (or an existing block device) or a new VOLUME of this store."""
    from .cli import emit

    target: str = args.to
    is_file = os.sep in target or target.startswith(".")
    if not is_file and store.exists(target):
        raise VolumeError(f"volume {target!r} exists: --to writes a new volume (pick another name or delete it)")
    if is_file:
        try:
            st = os.stat(target)
            if not stat.S_ISBLK(st.st_mode):
                raise VolumeError(f"{target} exists: --to writes a new file (or a block device)")
        except FileNotFoundError:
            pass
    view, cp = open_view(store, args.name, args.at)
    size = view.size()
    created_volume = False
    try:
        if is_file:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, size)
        else:
            store.create(target, size, block_size=store.meta(args.name).block_size)
            created_volume = True
            fd = os.open(store.image_path(target), os.O_WRONLY | os.O_CLOEXEC)
        try:
            _copy(view, fd, size, progress=sys.stderr.isatty())
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        if created_volume:
            store.delete(target)
        elif is_file and os.path.isfile(target):
            os.unlink(target)
        raise
    finally:
        view.close()
    what = target if is_file else f"volume {target}"
    emit(args, {"name": args.name, "checkpoint": cp.to_json(), "to": target, "bytes": size},
         f"recovered {args.name} at checkpoint {cp.id} ({_when(cp.time_ns)}) into {what}")
    return 0


def _copy(view: Any, fd: int, size: int, progress: bool) -> None:
    """Copy ``size`` bytes, leaving all-zero chunks as holes; a progress line on a terminal."""
    buf = bytearray(COPY_CHUNK)
    zero = bytes(COPY_CHUNK)
    start = last = time.monotonic()
    for off in range(0, size, COPY_CHUNK):
        n = min(COPY_CHUNK, size - off)
        mv = memoryview(buf)[:n]
        view.pread(mv, off)
        if mv != zero[:n]:
            done = 0
            while done < n:
                done += os.pwrite(fd, mv[done:], off + done)
        now = time.monotonic()
        if progress and (now - last > 0.2 or off + n == size):
            last = now
            rate = (off + n) / max(now - start, 1e-6)
            eta = (size - off - n) / rate if rate else 0
            print(f"\r{(off + n) * 100 // size:3d}%  {format_size(off + n)} of {format_size(size)}  "
                  f"{format_size(int(rate))}/s  ETA {eta:.0f}s ", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)


# -- failover -------------------------------------------------------------------------------------
def cmd_failover(args: argparse.Namespace) -> int:
    """Promote a replica to an ordinary writable volume, optionally rolled back to a checkpoint."""
    from mirror.history import History
    from mirror.undo import CHECKPOINT_SUFFIX, UNDO_SUFFIX, UndoLog, read_checkpoint

    from .cli import emit, store_of

    store = store_of(args)
    meta = _replica_meta(store, args.name, "failover promotes a replica")
    rep = meta.extra["replica"]
    planned = None
    try:
        lock = store.lock(args.name)
    except VolumeBusy:
        # A source is mirroring into it: it is reachable, so this is a planned failover. It fences
        # its host writes and ships everything first (no write is lost), then lets go.
        planned = _demote_source(store, args.name) if args.planned else None
        lock = None
    if lock is None and planned is not None:
        deadline = time.monotonic() + 10
        while lock is None:
            try:
                lock = store.lock(args.name)
            except VolumeBusy:
                if time.monotonic() > deadline:
                    raise VolumeError(f"replica {args.name!r} is still busy after its source was demoted") from None
                time.sleep(0.05)
    if lock is None:
        raise VolumeError(
            f"replica {args.name!r} is busy: a source is still mirroring into it. Planned failover: stop the "
            f"host's writes on the source, wait for `vdisk status {rep.get('source_name')}` to show in_sync, stop "
            "`vdisk serve` there, then run failover again. Disaster: the target lets go of the replica once the "
            "source has been silent for its --timeout")
    try:
        root = store.root
        hist = History(root, args.name)
        if hist.pinned() is not None:
            raise VolumeError(f"a `vdisk recover` of {args.name!r} is running (it reads the history a failover "
                              "removes): stop it first")
        image = store.open_image(args.name)
        try:
            # A unit the target was applying when the link died goes first (the committed checkpoint).
            undo = UndoLog(root / f"{args.name}{UNDO_SUFFIX}", meta.size)
            try:
                undo.recover(image, read_checkpoint(root, args.name))
            finally:
                undo.close()
            committed = read_checkpoint(root, args.name)
            at = committed
            if args.at is not None:
                cp = resolve_at(args.at, hist.checkpoints(), args.name)
                at = (cp.id, cp.time_ns)
                if cp.id != committed[0]:
                    _roll_back(store, args.name, meta.size, image, cp.id)
                    write_json_atomic(root / f"{args.name}{CHECKPOINT_SUFFIX}", {"id": at[0], "time_ns": at[1]})
            image.flush()
        finally:
            image.close()
        promoted = {"from_source_uuid": rep.get("source_uuid"), "source_name": rep.get("source_name"),
                             "source_addr": rep.get("source_addr"), "checkpoint": at[0],
                             "checkpoint_time_ns": at[1], "generation_before": meta.generation,
                             "planned": planned is not None,
                             "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        # A new generation: from here this copy and the old source diverge, and split brain checks
        # compare generations.
        store.update(args.name, promoted=promoted, generation=meta.generation + 1, replica=None)
        hist.remove()
        for suffix in (UNDO_SUFFIX, CHECKPOINT_SUFFIX):
            (root / f"{args.name}{suffix}").unlink(missing_ok=True)
    finally:
        lock.release()
    cptext = f"checkpoint {at[0]} ({_when(at[1])})" if at[0] else "its last applied state (no checkpoint)"
    emit(args, {"name": args.name, "checkpoint": at[0], "checkpoint_time_ns": at[1], "generation": meta.generation + 1},
         f"promoted replica {args.name} at {cptext}: it is an ordinary volume now (generation "
         f"{meta.generation + 1}); serve it with `vdisk serve {args.name}`")
    return 0


def _roll_back(store: VolumeStore, name: str, size: int, image: Any, at: int) -> None:
    """Write checkpoint ``at``'s content of every block saved after it into the replica. Idempotent:
    the history and the checkpoint record change only after this is durable, so a crash midway is
    undone by running failover again."""
    from blockdev.image.file import FileImage
    from mirror.history import BLOCK, CHUNK_SHIFT, HistoryView, NotRecoverable

    ro = FileImage(store.image_path(name), readonly=True)
    try:
        view = HistoryView(ro, store.root, name, size, at)
    except NotRecoverable as e:
        ro.close()
        raise VolumeError(str(e)) from None
    try:
        buf = bytearray(BLOCK)
        for chunk, segs in sorted(view.index.seg.items()):
            base = chunk << CHUNK_SHIFT
            i = 0
            while True:
                # runs of saved blocks in this chunk
                while i < len(segs) and segs[i] == 0:
                    i += 1
                if i >= len(segs):
                    break
                j = i
                while j < len(segs) and segs[j] != 0:
                    j += 1
                off, end = (base + i) * BLOCK, min((base + j) * BLOCK, size)
                for pos in range(off, end, COPY_CHUNK):
                    n = min(COPY_CHUNK, end - pos)
                    if len(buf) != n:
                        buf = bytearray(n)
                    view.pread(memoryview(buf), pos)
                    image.pwrite(memoryview(buf), pos)
                i = j
        image.flush()
    finally:
        view.close()


def register_target(control: Any, server: Any) -> None:
    """The target's control command ``demote`` {name}: a planned failover (TargetServer.demote)."""
    from .control import ControlError

    async def demote(req: dict[str, Any]) -> dict[str, Any]:
        name = req.get("name")
        if not isinstance(name, str):
            raise ControlError("demote needs a replica name")
        try:
            cp = await server.demote(name)
        except VolumeError as e:
            raise ControlError(str(e)) from None
        return {"demoted": name, "checkpoint": cp}

    control.register("demote", demote)


def _demote_source(store: VolumeStore, name: str) -> int | None:
    """Planned failover: the target running on this data directory asks the source mirroring into
    ``name`` to fence its writes and ship everything. The checkpoint, or None if no target runs."""
    from mirror.target import LOCK_FILE

    from .control import ControlError, call, control_address

    try:
        pid = int((store.root / LOCK_FILE).read_text().strip() or "0")
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        reply = call(control_address(store.root, pid), "demote", timeout=120.0, name=name)
    except ControlError as e:
        raise VolumeError(f"planned failover of {name!r}: {e}") from None
    except OSError:
        return None  # no target answers there (a stale lock file)
    return int(reply.get("checkpoint", 0))


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register `checkpoints`, `recover` and `failover` (called by vdisk.cli.build_parser)."""
    from .cli import VERBOSE_HELP

    sp = add("checkpoints", cmd_checkpoints, "list a replica's recoverable checkpoints (id, time, bytes)")
    sp.add_argument("name", metavar="NAME")
    sp = add("recover", cmd_recover,
             "point-in-time recovery: export a replica as of a checkpoint over NBD (until SIGINT/SIGTERM), "
             "or copy it out with --to; mirroring into the replica continues meanwhile")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--at", required=True, metavar="TIME|CHECKPOINT",
                    help="a checkpoint id, 'latest', an ISO 8601 local time (2026-12-06T01:30:00) or a relative "
                         "time (-10m): the newest checkpoint at or before it")
    sp.add_argument("--nbd", action="append", metavar="unix:PATH|tcp:HOST:PORT", help="NBD listener (repeatable)")
    sp.add_argument("--writable", action="store_true",
                    help="accept writes into a scratch overlay (discarded at exit; the replica is never written)")
    sp.add_argument("--to", metavar="FILE|VOLUME",
                    help="copy the checkpoint into a new file (a path), a block device, or a new volume (a name)")
    sp.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sp = add("failover", cmd_failover,
             "promote a replica (optionally rolled back to a checkpoint) to an ordinary writable volume")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--at", metavar="TIME|CHECKPOINT", help="roll back to this checkpoint first (default: the latest)")
    sp.add_argument("--no-demote", dest="planned", action="store_false",
                    help="while an async source still mirrors into the replica, refuse instead of demoting it "
                         "(default: a reachable source is demoted first: it refuses host writes and ships "
                         "everything, then the replica is promoted)")
