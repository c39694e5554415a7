"""`vdisk target`, `vdisk mirror`, `vdisk status`, `vdisk verify`: thin commands over mirror/ and the
daemon's control socket. Registered into cli.py through ``EXTENSIONS``."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockdev.volume import VolumeStore

from .cli import (
    LOG_DATES,
    LOG_FORMAT,
    VERBOSE_HELP,
    count_arg,
    duration_arg,
    emit,
    metrics_arg,
    size_arg,
    store_of,
)
from .control import ControlError, call
from .mirroring import (
    JOURNAL_SUFFIX,
    MIRROR_SIDECARS,
    MODES,
    POLICIES,
    check_section,
    merge_section,
    parse_hostport,
    read_psk,
)
from .units import format_rate, format_size

CONFIG_KEYS = ("to", "mode", "on_link_loss", "psk_file", "block_timeout", "timeout",
               "rate", "schedule", "ship_at", "buffer_size", "checkpoint_interval", "rpo", "stall",
               "tls", "insecure", "target_fingerprint", "trust_on_first_use")


def fingerprint_arg(text: str) -> str:
    if text.strip().lower() == "none":
        return ""
    from mirror.keys import parse_fingerprint

    try:
        return parse_fingerprint(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _daemon(store: VolumeStore, name: str) -> str | None:
    """The control address of the daemon serving ``name``, or None."""
    store.meta(name)
    holder = store.holder(name)
    return holder.get("control") if holder else None


def cmd_target(args: argparse.Namespace) -> int:
    import trio

    from blockdev.nbd.server import Export, NBDServer
    from mirror.target import TargetConfig, TargetServer

    from .daemon import Listen, NBDListeners

    store = store_of(args)
    store.root.mkdir(parents=True, exist_ok=True)
    host, port = parse_hostport(args.listen, listen=True)
    # TargetServer.serve refuses a keyless listener beyond loopback (unless --insecure) and a second
    # target on this data directory, before it listens.
    from .tls import target_tls

    psk = read_psk(args.psk_file)
    tls = target_tls(args, store.root, host, psk is not None)
    server = TargetServer(store, TargetConfig(psk=psk, timeout=args.timeout, insecure=args.insecure, tls=tls,
                                              history=args.history, history_size=args.history_size))
    listens = [Listen.parse(s) for s in args.nbd or []]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=LOG_FORMAT.format("target"),
                        datefmt=LOG_DATES)
    from .control import ControlServer, control_address
    from .target_status import TargetWatch
    from .target_status import register as register_status

    control, watch = ControlServer("target"), TargetWatch(server)
    register_status(control, store, server, watch)
    from .recovery import register_target

    register_target(control, server)  # "demote": a planned failover asks the source to hand over

    def lookup(name: str) -> Export | None:
        backend = server.export_backend(name)
        return None if backend is None else Export(name, backend, f"vdisk replica {name} (read-only)")

    async def main() -> None:
        nbd_tls = None
        if args.nbd_tls:
            from .tls import nbd_context

            nbd_tls = nbd_context(store.root)
        listeners = NBDListeners(NBDServer(lookup, server.replica_names, tls=nbd_tls))
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    metrics = []  # first: a busy metrics port fails before any source is accepted
                    if args.metrics is not None:
                        from .metrics import TargetCollector, registry_of, serve_metrics

                        metrics.append("metrics " + await nursery.start(serve_metrics, args.metrics,
                                                                        registry_of(TargetCollector(server))))
                    addr = await nursery.start(server.serve, host, port)
                    # After serve took the data directory's lock (which names our pid, and so the address).
                    await nursery.start(control.serve, control_address(store.root, os.getpid()))
                    nursery.start_soon(watch.run)
                    tcp = f"tcp:{addr}" + (f" (TLS, {tls.keys.fingerprint})" if tls else "")
                    where = [tcp] + ["nbd " + a for a in await listeners.start(nursery, listens)] + metrics
                    print(f"target listening on {', '.join(where)}, replicas in {store.root} (pid {os.getpid()})",
                          flush=True)
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()
        finally:
            listeners.close()
            server.close()

    trio.run(main)
    return 0


def cmd_mirror(args: argparse.Namespace) -> int:
    from .replicas import refuse_mirror

    store = store_of(args)
    refuse_mirror(store.meta(args.name))  # --stop too: it rewrites the metadata the target owns
    control = _daemon(store, args.name)
    if args.stop:
        if not isinstance(store.meta(args.name).extra.get("mirror"), dict):
            raise ValueError(f"volume {args.name!r} is not mirrored: nothing to stop")
        if control:
            call(control, "mirror", name=args.name, stop=True)
        else:
            store.update(args.name, mirror=None)
            for suffix in MIRROR_SIDECARS:
                (store.root / f"{args.name}{suffix}").unlink(missing_ok=True)
            import shutil

            shutil.rmtree(store.root / f"{args.name}{JOURNAL_SUFFIX}", ignore_errors=True)
        emit(args, {"stopped": args.name}, f"mirror of {args.name} stopped")
        return 0
    # Only what was given changes: the rest of the stored configuration stays.
    # "" (from --schedule none / --ship-at none) removes a setting: None in the merge.
    given: dict[str, Any] = {k: getattr(args, k) or None for k in CONFIG_KEYS if getattr(args, k, None) is not None}
    if args.psk_file:
        given["psk_file"] = str(Path(args.psk_file).resolve())
    if args.discard_replica:
        given["discard_replica"] = True
    old = store.meta(args.name).extra.get("mirror")
    old = old if isinstance(old, dict) else {}
    if not old.get("to") and not args.to:
        raise ValueError(f"volume {args.name!r} is not mirrored: give --to HOST:PORT")
    if not given:
        raise ValueError("nothing to change: give --to HOST:PORT, --mode, --rate... (or --stop)")
    section = merge_section(old, given)  # a new --to keeps the other settings, not the pairing
    check_section(section, store.root)  # fail here, not in the daemon's log (creates keys if TLS needs them)
    if control:
        reply = call(control, "mirror", name=args.name, set=given)
        where = "applied in the running daemon"
    else:
        store.update(args.name, mirror=section)
        reply, where = {}, "saved; it starts with `vdisk serve`"
    if not (args.wait and args.json):  # --wait --json prints the final state instead
        emit(args, {"name": args.name, "mirror": section, **reply},
             f"mirror {args.name} -> {section['to']} ({describe(section)})"
             f"{', discarding what differs on the replica' if args.discard_replica else ''} {where}")
    if args.wait:
        if not control:
            raise ControlError(f"volume {args.name!r} is not served: the mirror runs inside `vdisk serve`, "
                               "so there is nothing to wait for (configuration saved)")
        sys.stdout.flush()
        final, error = _wait_in_sync(control, args)
        if args.json:
            emit(args, {"name": args.name, "in_sync": error is None, "error": error, "mirror": final}, "")
        if error is not None:
            raise ControlError(error)
    return 0


def describe(section: dict[str, Any]) -> str:
    """A configuration in words: 'async, rate 2.0 Mbit/s, schedule ..., buffer 10G'."""
    mode = section.get("mode", "sync")
    alerts = "".join(f", {k} {section[k]:g}s" if isinstance(section[k], float) else f", {k} {section[k]}"
                     for k in ("rpo", "stall") if section.get(k) is not None)
    from .tls import describe_tls

    alerts += describe_tls(section)
    if mode == "sync":
        return f"sync, on link loss: {section.get('on_link_loss', 'degrade')}{alerts}"
    from .units import parse_rate

    parts = ["async", f"rate {format_rate(parse_rate(str(section['rate'])) if section.get('rate') else None)}"]
    for key, label in (("schedule", "schedule"), ("ship_at", "ship at"), ("buffer_size", "buffer"),
                       ("checkpoint_interval", "checkpoint every")):
        if section.get(key) is not None:
            v = section[key]
            parts.append(f"{label} {v:g}s" if isinstance(v, float) else f"{label} {v}")
    if section.get("paused"):
        parts.append("paused")
    return ", ".join(parts) + alerts


def _set_live(args: argparse.Namespace, cmd: str, change: dict[str, Any], **req: Any) -> int:
    """throttle / pause / resume: through the daemon if one serves the volume, else stored for the next start."""
    store = store_of(args)
    old = store.meta(args.name).extra.get("mirror")
    if not isinstance(old, dict) or not old.get("to"):
        raise ValueError(f"volume {args.name!r} is not mirrored")
    if old.get("mode", "sync") != "async":
        raise ValueError(f"the mirror of {args.name} is sync: {cmd} applies to async mirrors "
                         f"(`vdisk mirror {args.name} --mode async`)")
    section = merge_section(old, change)
    check_section(section)
    control = _daemon(store, args.name)
    if control:
        reply = call(control, cmd, name=args.name, **req)
        where = "applied"
    else:
        store.update(args.name, mirror=section)
        reply, where = {}, "saved; it applies with `vdisk serve`"
    emit(args, {"name": args.name, "mirror": section, **reply}, f"mirror {args.name}: {describe(section)} ({where})")
    return 0


def cmd_throttle(args: argparse.Namespace) -> int:
    return _set_live(args, "throttle", {"rate": args.rate}, rate=args.rate)


def cmd_pause(args: argparse.Namespace) -> int:
    return _set_live(args, "pause", {"paused": True})


def cmd_resume(args: argparse.Namespace) -> int:
    return _set_live(args, "resume", {"paused": False})


def to_arg(text: str) -> str:
    """--to HOST:PORT: a host is required (``:7800`` would silently mean this machine)."""
    try:
        parse_hostport(text, need_host=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def rate_arg(text: str) -> str:
    """--rate: checked here (one-line error naming the value), stored as written."""
    from .units import parse_rate

    try:
        parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


NONE_WORDS = ("none", "off")


def schedule_arg(text: str) -> str:
    """--schedule SPEC (checked, normalised), or none/off: no schedule ("")."""
    from mirror.schedule import Schedule

    if text.strip().lower() in NONE_WORDS:
        return ""
    try:
        return Schedule.parse(text).text
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def ship_at_arg(text: str) -> str:
    from mirror.schedule import ShipAt

    if text.strip().lower() in NONE_WORDS:
        return ""
    try:
        return ShipAt.parse(text).text
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def buffer_arg(text: str) -> str:
    from .units import parse_size

    try:
        parse_size(text, minimum=1 << 20)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def _mirror_status(control: str, name: str) -> dict[str, Any]:
    vols = call(control, "status", name=name)["volumes"]
    return (vols[0].get("mirror") if vols else None) or {}


def _wait_in_sync(control: str, args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """Until the replica is in sync: (the final status, None), or (it, why not) at once on an error
    no retry ends (a wrong key, a mismatch, a refusal, a split brain), a lost daemon or the timeout.
    A rich progress bar (bytes, percent, rate, ETA in binary units) on a terminal."""
    deadline = time.monotonic() + args.wait_timeout
    bar = task = None
    st: dict[str, Any] = {}
    if sys.stdout.isatty() and not args.json:
        from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TimeRemainingColumn

        bar = Progress("[progress.description]{task.description}", BarColumn(), TaskProgressColumn(),
                       DownloadColumn(binary_units=True), _rate_column(), TimeRemainingColumn())
        bar.start()
        task = bar.add_task(f"sync {args.name}", total=None)
    peak = 0
    try:
        while time.monotonic() < deadline:
            try:
                st = _mirror_status(control, args.name)
            except ControlError as e:
                return st, f"the daemon serving {args.name} stopped answering: {e}"
            why = _permanent(st)
            if why is not None:
                return st, f"the mirror of {args.name} cannot sync: {why}"
            if bar is not None and task is not None:
                total, done = _progress(st, peak)
                peak = max(peak, total or 0)
                bar.update(task, total=total or None, completed=done,
                           description=f"{args.name}: {st.get('state')}")
            if _done(st):
                return st, None
            time.sleep(0.2)
    finally:
        if bar is not None:
            bar.stop()
    return st, f"the mirror of {args.name} is not in sync after {args.wait_timeout:g}s (state {st.get('state')})"


def _rate_column() -> Any:
    """rich's TransferSpeedColumn counts in kB/MB: ours says MiB/s, as every other vdisk rate."""
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class BinaryRate(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{format_size(speed)}/s", style="progress.data.speed")

    return BinaryRate()


def _progress(st: dict[str, Any], peak: int) -> tuple[int, int]:
    """(total, done) bytes of what is being sent now: the initial sync, a resync, or the async catch-up."""
    init = st.get("initial_sync") or {}
    if init and not init.get("done") and init.get("total_bytes"):
        return init["total_bytes"], init.get("copied_bytes", 0)
    resync = st.get("resync")
    if resync:
        return resync["total_bytes"], resync["done_bytes"]
    pending = int(st.get("buffer_bytes", st.get("dirty_bytes", 0)) or 0)
    total = max(peak, pending)
    return total, total - pending


def _permanent(st: dict[str, Any]) -> str | None:
    """The error if it is one no waiting ends, else None."""
    from .events import PERMANENT

    reason = (st.get("link") or {}).get("reason") or ""
    if st.get("state") == "split_brain" or any(reason.startswith(p) for p in PERMANENT):
        return str(st.get("last_error") or reason)
    return None


def _done(st: dict[str, Any]) -> bool:
    return st.get("state") == "in_sync"


def offline_status(store: VolumeStore, name: str) -> dict[str, Any] | None:
    """What the metadata and dirty map say about a mirror of a volume nobody serves."""
    section = store.meta(name).extra.get("mirror")
    if not isinstance(section, dict):
        return None
    from .mirroring import recorded_dirty  # the map and the activity log: what the daemon will resync

    meta = store.meta(name)
    dirty = recorded_dirty(store.root, name, meta.size)
    split = section.get("split_brain") if isinstance(section.get("split_brain"), str) else None
    out = {"mode": section.get("mode", "sync"), "state": "split_brain" if split else "disconnected",
           "target": section.get("to"), "last_error": split or "not served",
           "on_link_loss": section.get("on_link_loss", "degrade"), "dirty_bytes": dirty.dirty_bytes,
           "initial_sync": {"done": bool(section.get("initial_sync_done")),
                            "total_bytes": section.get("sync_total", 0)}}
    if out["mode"] == "async":
        # Read-only: the journal is not opened (that would cut a torn tail); its files' sizes bound it.
        jdir = store.root / f"{name}{JOURNAL_SUFFIX}"
        journal = sum(p.stat().st_size for p in jdir.glob("*.seg")) if jdir.is_dir() else 0
        out.update(journal_bytes=journal, buffer_bytes=journal + dirty.dirty_bytes, lag_seconds=None,
                   eta_seconds=None, paused=bool(section.get("paused")))
    return out


def cmd_status(args: argparse.Namespace) -> int:
    from .status import CHECK_WORDS, UNKNOWN, check, render, snapshot

    if args.watch:
        from .tui import pause_basic, watch_command

        store = store_of(args)
        return watch_command(args, collect=lambda: snapshot(store, args.names),
                             toggle_pause=lambda name, pause: pause_basic(store, name, pause))
    store = store_of(args)
    if args.check:
        try:
            snap = snapshot(store, args.names)
        except Exception as e:  # noqa: BLE001 - a monitoring plugin answers UNKNOWN, whatever failed
            print(f"VDISK UNKNOWN - {e}")
            return UNKNOWN
        code, reason = check(snap, args.rpo, args.stall)
        print(f"VDISK {CHECK_WORDS[code]} - {reason}")
        return code
    snap = snapshot(store, args.names)
    obj: dict[str, Any] = snap
    if len(args.names) == 1:  # `status NAME --json`: the volume's keys at the top too (mirror, served)
        obj = {**(snap["volumes"] or snap["replicas"])[0], **snap}
    emit(args, obj, render(snap))
    return 0


def async_line(name: str, m: dict[str, Any]) -> str:
    """vol1  async  lagging  buffer 246.7 MiB  lag 3.1 s  wire 230 KiB/s  eff 3.4 MiB/s (14.8x)  ETA 21 s"""
    rates = m.get("rates") or {}
    eta = m.get("eta_seconds")
    parts = [name, "async", str(m.get("state")), f"buffer {format_size(m.get('buffer_bytes', 0))}",
             "lag ?" if m.get("lag_seconds") is None else f"lag {m['lag_seconds']:.1f} s"]
    if rates:
        wire, eff = rates.get("wire_10s", 0), rates.get("logical_out_10s", 0)
        ratio = f" ({eff / wire:.1f}x)" if wire and eff > 1.05 * wire else ""  # what compression/dedup saved
        parts += [f"wire {format_size(wire)}/s", f"eff {format_size(eff)}/s{ratio}"]
    if m.get("buffer_bytes"):
        parts.append("ETA " + ("-" if eta is None else f"{eta:.0f} s"))
    thr = m.get("throttle") or {}
    if thr.get("rate"):
        parts.append(f"throttle {format_rate(thr['rate'])}")
    sched = m.get("schedule") or {}
    if sched.get("window"):
        parts.append(f"window {sched['window']}")
    if m.get("last_error") and m.get("state") == "split_brain":  # disconnected: status.line says why
        parts.append(f"({m['last_error']})")
    return "  ".join(parts)


def cmd_verify(args: argparse.Namespace) -> int:
    store = store_of(args)
    control = _daemon(store, args.name)
    if control is None:
        raise ControlError(f"volume {args.name!r} is not served: verify runs inside `vdisk serve`")
    if sys.stdout.isatty() and not args.json:
        rep = _verify_with_progress(control, args)
    else:
        rep = call(control, "verify", timeout=3600, name=args.name, repair=args.repair)["verify"]
    emit(args, rep, verify_text(args.name, rep, args.repair))
    return 1 if rep["ranges"] and not rep["repaired"] else 0


def _verify_with_progress(control: str, args: argparse.Namespace) -> dict[str, Any]:
    """The verify call on a thread; meanwhile a rich bar of the daemon's progress (its status'
    ``verify``: phase, bytes hashed of the volume, rate and ETA in binary units)."""
    import threading

    from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TimeRemainingColumn

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["rep"] = call(control, "verify", timeout=3600, name=args.name, repair=args.repair)["verify"]
        except ControlError as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    with Progress("[progress.description]{task.description}", BarColumn(), TaskProgressColumn(),
                  DownloadColumn(binary_units=True), _rate_column(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(f"verify {args.name}", total=None)
        while t.is_alive():
            try:
                v = (_mirror_status(control, args.name) or {}).get("verify")
            except ControlError:
                v = None
            if v:
                bar.update(task, total=v.get("total_bytes") or None, completed=v.get("done_bytes", 0),
                           description=f"verify {args.name}: {v.get('phase')}")
            t.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["rep"]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def verify_text(name: str, rep: dict[str, Any], repair: bool) -> str:
    """'vol1: 1 differing range, 64.0 KiB (12 digests exchanged)', each range, and what a repair did:
    the bytes actually resent (zeroed ranges travel as zero frames, not data), or that it is unfinished."""
    ranges = rep["ranges"]
    head = (f"{name}: no differences ({plural(rep['digests_exchanged'], 'digest')} exchanged)" if not ranges else
            f"{name}: {plural(len(ranges), 'differing range')}, {format_size(rep['differing_bytes'])} "
            f"({plural(rep['digests_exchanged'], 'digest')} exchanged)")
    lines = [head] + [f"  differs at {off}+{n} ({format_size(n)})" for off, n in ranges[:50]]
    if len(ranges) > 50:
        lines.append(f"  ... and {plural(len(ranges) - 50, 'more range')}")
    if ranges and not repair:
        lines.append(f"  not repaired: run `vdisk verify {name} --repair` to resend them")
    elif ranges:
        resent = rep.get("resent_bytes", 0)
        sent = f"{format_size(resent)} of data resent" if resent else "no data resent (the ranges are zeroes here)"
        lines.append(f"  repaired: {sent}, acknowledged by the replica" if rep["repaired"] else
                     f"  not repaired: {sent} so far, but the replica did not confirm it in time; "
                     f"run `vdisk verify {name}` again")
    return "\n".join(lines)


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("target", cmd_target, "receive mirrors: store replicas in --data-dir, export them read-only")
    sp.add_argument("--listen", required=True, metavar="HOST:PORT", help="where sources connect (port 0: any free port)")
    sp.add_argument("--psk-file", help="pre-shared key file (sources must use the same key)")
    sp.add_argument("--insecure", action="store_true",
                    help="a plain link beyond loopback (sources must say --insecure too), allowed without "
                         "--psk-file (any host could write replicas)")
    sp.add_argument("--tls", action="store_true",
                    help="TLS on loopback too (beyond loopback it is the default); keys in DATA_DIR/keys")
    sp.add_argument("--trust-on-first-use", action="store_true",
                    help="TLS: while no source is trusted (DATA_DIR/keys/trusted), trust and record the first one")
    sp.add_argument("--nbd", action="append", metavar="unix:PATH|tcp:HOST:PORT", help="read-only NBD export of replicas")
    sp.add_argument("--nbd-tls", action="store_true",
                    help="NBD clients of the export must use TLS (STARTTLS), with this site's key")
    sp.add_argument("--history", type=duration_arg, metavar="DURATION",
                    help="keep each replica's checkpoints this long for point-in-time recovery, e.g. 1h "
                         "(`vdisk checkpoints`, `vdisk recover`; default: none kept)")
    sp.add_argument("--history-size", type=size_arg, metavar="SIZE",
                    help="keep at most this much checkpoint history per replica, e.g. 20G (oldest go first)")
    sp.add_argument("--timeout", type=duration_arg, default=30.0,
                    help="source silence before dropping it (default 30s; e.g. 2m, 500ms)")
    sp.add_argument("--metrics", type=metrics_arg, metavar="tcp:HOST:PORT",
                    help="serve Prometheus metrics over HTTP at /metrics (default: off; port 0: any free port)")
    sp.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)

    sp = add("mirror", cmd_mirror, "mirror a volume to a target (or --stop); picked up live by `vdisk serve`")
    sp.add_argument("name")
    sp.add_argument("--to", metavar="HOST:PORT", type=to_arg,
                    help="the target (default: the stored one; needed the first time)")
    sp.add_argument("--mode", choices=MODES,
                    help="sync: the host's write waits for the replica; async: journaled and shipped "
                         "(default sync; changing it on a running mirror switches live)")
    sp.add_argument("--on-link-loss", choices=POLICIES, help="sync: degrade (default) or block")
    sp.add_argument("--block-timeout", type=duration_arg,
                    help="with block: how long a write waits for the replica before EIO (default 30s)")
    sp.add_argument("--timeout", type=duration_arg,
                    help="target silence before link loss (default 10s)")
    sp.add_argument("--rate", type=rate_arg, help="async: throttle, e.g. 2Mbit, 512kbit, 10MB/s, 10MiB/s, unlimited "
                    "(default: the stored rate; unlimited at first)")
    sp.add_argument("--schedule", type=schedule_arg, metavar="SPEC",
                    help='async: e.g. "mon-fri 08:00-18:00 rate=1Mbit; * 18:00-08:00 rate=unlimited" (see README); '
                         'none removes it (default: the stored one; none at first)')
    sp.add_argument("--ship-at", type=ship_at_arg, metavar="HH:MM",
                    help="async: accumulate, then ship up to a checkpoint cut at this local time (e.g. 02:00); "
                         "none removes it (default: the stored one; none at first: ship continuously)")
    sp.add_argument("--buffer-size", type=buffer_arg,
                    help="async: source journal size before writes are tracked in the dirty map (default 10G)")
    sp.add_argument("--checkpoint-interval", type=duration_arg,
                    help="async: a consistent checkpoint every ... (default 5s; also at every host flush)")
    sp.add_argument("--rpo", type=duration_arg,
                    help="recovery point objective: lag past it raises an alert (status, events, log); "
                         "default none; changing it never reconnects")
    sp.add_argument("--stall", type=duration_arg,
                    help="no progress while data is pending for this long raises an alert (default 2m)")
    sp.add_argument("--psk-file", help="pre-shared key file (default: the stored one; none at first)")
    sp.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                    help="TLS on loopback too (beyond loopback it is the default)")
    sp.add_argument("--insecure", action=argparse.BooleanOptionalAction, default=None,
                    help="a plain link beyond loopback (the target must say --insecure too)")
    sp.add_argument("--target-fingerprint", type=fingerprint_arg, metavar="SHA256:...",
                    help="TLS: the target's fingerprint (`vdisk keys show` there); none removes it")
    sp.add_argument("--trust-on-first-use", action=argparse.BooleanOptionalAction, default=None,
                    help="TLS: trust and record (DATA_DIR/keys/trusted) the target's fingerprint at the first "
                         "connection; later a different one is refused")
    sp.add_argument("--stop", action="store_true", help="stop mirroring and forget the pairing")
    sp.add_argument("--discard-replica", action="store_true",
                    help="after a split brain: overwrite what differs on the replica (found by Merkle compare); "
                         "without --to, keeps the stored configuration")
    sp.add_argument("--wait", action="store_true", help="wait until the replica is in sync (progress bar on a tty)")
    sp.add_argument("--wait-timeout", type=duration_arg, default=3600.0, help="with --wait (default 1h)")

    sp = add("status", cmd_status, "every volume's mirror state, one line each (or the NAMEs given); "
                                   "the replicas too on a target's data directory")
    sp.add_argument("names", nargs="*", metavar="NAME")
    sp.add_argument("--check", action="store_true",
                    help="monitoring plugin: exit 0 OK, 1 WARNING (stalled), 2 CRITICAL (disconnected, split "
                         "brain, lag past the RPO), 3 UNKNOWN (a daemon does not answer), with a one-line reason")
    sp.add_argument("--rpo", type=duration_arg,
                    help="with --check: lag allowed (default: each mirror's own --rpo, else none)")
    sp.add_argument("--stall", type=duration_arg, default=120.0,
                    help="with --check: no progress while data is pending for this long warns (default 2m)")
    sp.add_argument("--watch", action="store_true",
                    help="live dashboard (q quits, arrows select, p pauses/resumes); plain lines when not a terminal")
    sp.add_argument("--interval", type=duration_arg, default=1.0, help="with --watch: refresh every ... (default 1s)")
    sp.add_argument("--count", type=count_arg, metavar="N",
                    help="with --watch, not on a terminal: print N times, then exit (default: until interrupted)")
    sp = add("throttle", cmd_throttle, "change an async mirror's rate live")
    sp.add_argument("name")
    sp.add_argument("--rate", type=rate_arg, required=True, help="e.g. 2Mbit, 512kbit, 10MB/s, 10MiB/s, unlimited")
    sp = add("pause", cmd_pause, "stop shipping an async mirror (writes are still journaled)")
    sp.add_argument("name")
    sp = add("resume", cmd_resume, "resume shipping a paused async mirror")
    sp.add_argument("name")
    sp = add("verify", cmd_verify, "compare a volume with its replica by Merkle tree (and --repair)")
    sp.add_argument("name")
    sp.add_argument("--repair", action="store_true", help="resend the differing blocks")

