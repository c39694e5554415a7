"""`vdisk` command line: parse, call, print. Errors are one line on stderr and a non-zero exit."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from blockdev.volume import VolumeError, VolumeStore

from .control import ControlError
from .units import format_size, parse_duration, parse_size

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A bad argument found after parsing; exits 2 like argparse's own errors."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vdisk: error: ...`` and exit 2, without the usage block
    (which buries the message; `vdisk COMMAND --help` has it). Subparsers inherit the class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


VERBOSE_HELP = "log connections, state changes and progress (default: warnings and errors only)"


class DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help shows its default: options whose help does not say it get
    "(default: VALUE)", or "(default: off)" for a flag and "(default: none)" when unset."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required and action.option_strings and "required" not in text:
            return f"{text} (required)".strip()
        if (not action.option_strings or "default" in text or action.default is argparse.SUPPRESS
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        if action.nargs == 0:
            shown = "on" if action.default else "off"
        elif action.default is None:
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})".strip()


# Daemon log lines: local time with its UTC offset (the two ends of a mirror may be in different zones).
LOG_FORMAT = "%(asctime)s vdisk {}: %(levelname)s %(message)s"
LOG_DATES = "%Y-%m-%dT%H:%M:%S%z"


def size_arg(text: str) -> int:
    """argparse type for every size flag (vdisk.units.parse_size: exact, human units)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def duration_arg(text: str) -> float:
    """argparse type for every duration flag: 30s, 2m, 500ms, or seconds; positive and finite."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def count_arg(text: str) -> int:
    """argparse type for a count flag (--max-connections): a plain integer of at least 1."""
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be at least 1")
    return n


def metrics_arg(text: str):  # type: ignore[no-untyped-def]
    """argparse type for --metrics tcp:HOST:PORT (vdisk.metrics.parse_metrics)."""
    try:
        from .metrics import parse_metrics
    except ImportError as e:
        raise argparse.ArgumentTypeError(f"needs the prometheus-client package ({e})") from None
    try:
        return parse_metrics(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def store_of(args: argparse.Namespace) -> VolumeStore:
    return VolumeStore(args.data_dir)


def emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if getattr(args, "json", False) else text)


def volume_record(store: VolumeStore, name: str) -> dict[str, Any]:
    meta = store.meta(name)
    holder = store.holder(name)
    img = store.image_path(name)
    try:
        allocated = img.stat().st_blocks * 512
    except OSError:
        allocated = None
    rec = meta.to_json()
    rec.update({"allocated": allocated, "image": str(img), "served_by": holder.get("pid") if holder else None,
                "mounted_on": mounted_on(store, name)})
    return rec


def mounted_on(store: VolumeStore, name: str) -> str | None:
    """The directory `vdisk mount` put the volume on (its record), or None."""
    from .mount import load_record

    try:
        rec = load_record(store, name)
    except VolumeError:
        return None
    return rec.dir if rec is not None else None


def refuse_mounted(store: VolumeStore, name: str, doing: str) -> None:
    """VolumeError if `vdisk mount` holds the volume: it is in use through the host's filesystem."""
    where = mounted_on(store, name)
    if where is not None:
        raise VolumeError(f"volume {name!r} is mounted on {where}: run `vdisk umount {where}` before {doing} it")


def mirror_column(rec: dict[str, Any]) -> str:
    """`vdisk list`'s MIRROR: 'sync HOST:PORT', 'async HOST:PORT', 'replica of SOURCE' or '-'."""
    m, r = rec.get("mirror"), rec.get("replica")
    if isinstance(m, dict) and m.get("to"):
        return f"{m.get('mode', 'sync')} {m['to']}" + (" (split brain)" if m.get("split_brain") else "")
    return f"replica of {r.get('source_name')}" if isinstance(r, dict) else "-"


# -- commands -------------------------------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    meta = store_of(args).create(args.name, args.size, block_size=args.block_size)
    emit(args, meta.to_json(), f"created volume {meta.name}: {format_size(meta.size)} ({meta.size} bytes), uuid {meta.uuid}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = store_of(args)
    recs = []
    for name in store.names():
        try:
            recs.append(volume_record(store, name))
        except VolumeError as e:
            recs.append({"name": name, "error": str(e)})
    if args.json:
        emit(args, recs, "")
        return 0
    if not recs:
        print(f"no volumes in {store.root}")
        return 0
    rows = []
    for r in recs:
        if "error" in r:
            rows.append((r["name"], r["error"]))
            continue
        served = f"pid {r['served_by']}" if r["served_by"] else "-"
        alloc = format_size(r["allocated"]) if r["allocated"] is not None else "?"
        rows.append((r["name"], format_size(r["size"]), alloc, served, mirror_column(r), r["mounted_on"] or "-",
                     r["uuid"]))
    widths = [max([len(h)] + [len(row[i]) for row in rows if len(row) > 2]) for i, h in enumerate(LIST_HEADER)]
    for row in [LIST_HEADER, *rows]:
        if len(row) == 2:
            print(f"{row[0]:<{widths[0]}}  {row[1]}")
            continue
        cells = [f"{c:>{w}}" if i in (1, 2) else f"{c:<{w}}" for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
    return 0


LIST_HEADER = ("NAME", "SIZE", "ALLOCATED", "SERVED", "MIRROR", "MOUNTED", "UUID")


def cmd_info(args: argparse.Namespace) -> int:
    """Human units in text (exact bytes next to the size); --json keeps every number exact."""
    from .mirror_cli import describe

    rec = volume_record(store_of(args), args.name)
    m, rep = rec.get("mirror"), rec.get("replica")
    rows = [("name", rec["name"]), ("uuid", rec["uuid"]), ("size", f"{format_size(rec['size'])} ({rec['size']} bytes)"),
            ("block size", format_size(rec["block_size"])),
            ("allocated", "?" if rec["allocated"] is None else format_size(rec["allocated"])),
            ("image", rec["image"]), ("created", rec["created"]), ("generation", rec["generation"]),
            ("served by", f"pid {rec['served_by']}" if rec["served_by"] else "-"),
            ("mounted on", rec["mounted_on"] or "-"),
            ("mirror", f"{m['to']} ({describe(m)})" if isinstance(m, dict) and m.get("to") else "-")]
    if isinstance(rep, dict):
        from .replicas import describe as describe_replica

        rows.append(("replica", describe_replica(store_of(args).meta(args.name), rep).removeprefix("a replica ")))
    emit(args, rec, "\n".join(f"{k + ':':<12} {v}" for k, v in rows))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from .mirroring import MIRROR_SIDECARS
    from .replicas import refuse_delete

    store = store_of(args)
    refuse_delete(store.meta(args.name))
    refuse_mounted(store, args.name, "deleting")
    store.delete(args.name, sidecars=MIRROR_SIDECARS)
    emit(args, {"deleted": args.name}, f"deleted volume {args.name}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from .daemon import Daemon, Listen, ServeConfig

    store = store_of(args)
    for name in args.names:
        # `vdisk mount` serves the volume itself (with --fuse on its own directory): only that is allowed.
        if mounted_on(store, name) is not None and not (args.fuse and _is_mount_daemon(store, name, args.fuse)):
            refuse_mounted(store, name, "serving")
    specs = args.nbd or []
    listens = tuple(Listen.parse(s) for s in specs)
    if not listens and args.fuse is None:
        default = store.root / f"{args.names[0]}.nbd.sock"
        listens = (Listen.parse(f"unix:{default}"),)
    config = ServeConfig(data_dir=store.root, names=tuple(args.names), nbd=listens,
                         fuse=Path(args.fuse) if args.fuse else None, read_only=args.read_only,
                         max_connections=args.max_connections, metrics=args.metrics)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=LOG_FORMAT.format("serve"), datefmt=LOG_DATES)
    if args.tls:
        from .tls import nbd_context

        config = replace(config, tls=nbd_context(store.root))

    # Worker threads finishing big writes need the GIL back to report; the default 5 ms switch
    # interval lets a busy event loop keep them waiting. 0.5 ms: 1 MiB seq write 0.87x -> 0.95x of
    # nbdkit (median of 3 interleaved bench_nbd runs each, docs/BENCHMARKS.md); 4K unchanged.
    sys.setswitchinterval(0.0005)

    async def main() -> None:
        daemon = Daemon(config)
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(daemon.run)
            where = ", ".join(addrs) + (f", fuse:{config.fuse}" if config.fuse else "")
            if daemon.metrics_address:
                where += f", metrics {daemon.metrics_address}"
            print(f"serving {', '.join(config.names)} on {where} (pid {__import__('os').getpid()})", flush=True)

    trio.run(main)
    return 0


def _is_mount_daemon(store: VolumeStore, name: str, fuse: str) -> bool:
    from .mount import load_record

    rec = load_record(store, name)
    return rec is not None and Path(fuse).resolve() == Path(rec.fuse_dir).resolve()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                        help="volume directory (default: $VDISK_HOME or ~/.local/share/vdisk)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output (default: text)")
    p = Parser(prog="vdisk", description="Userspace virtual disk with built-in mirroring.",
                                parents=[common])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        sp.set_defaults(func=fn)
        return sp

    sp = add("create", cmd_create, "create a volume (a sparse raw image)")
    sp.add_argument("name")
    sp.add_argument("--size", type=size_arg, required=True, help="e.g. 10G, 512M, 1.5G (a multiple of 512 bytes)")
    sp.add_argument("--block-size", type=size_arg, default=4096, help="preferred I/O size (default 4K)")

    add("list", cmd_list, "list volumes")
    sp = add("info", cmd_info, "show a volume's metadata")
    sp.add_argument("name")
    sp = add("delete", cmd_delete, "delete a volume (refused while it is served)")
    sp.add_argument("name")

    sp = add("serve", cmd_serve, "serve volumes over NBD (and FUSE) until SIGINT/SIGTERM")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("--nbd", action="append", metavar="unix:PATH|tcp:HOST:PORT",
                    help="NBD listener (repeatable; default unix:DATA_DIR/NAME.nbd.sock)")
    sp.add_argument("--fuse", metavar="MOUNTPOINT", help="also export each volume as MOUNTPOINT/NAME")
    sp.add_argument("--read-only", action="store_true", help="refuse writes (EPERM); the only way to serve a replica")
    sp.add_argument("--max-connections", type=count_arg, default=1000, metavar="N",
                    help="open NBD connections per listener; more are refused (default 1000)")
    sp.add_argument("--metrics", type=metrics_arg, metavar="tcp:HOST:PORT",
                    help="serve Prometheus metrics over HTTP at /metrics (default: off; port 0: any free port)")
    sp.add_argument("--tls", action="store_true",
                    help="NBD clients must use TLS (STARTTLS; the site's key from `vdisk keys init`, see README)")
    sp.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)

    add("demo", cmd_demo, "create, serve, write and read a volume in a temporary directory")
    from .mirror_cli import register as register_mirror  # here: it imports this module

    register_mirror(add)  # target, mirror, status, verify
    for extend in EXTENSIONS:
        extend(add)
    return p


# Other modules add their subcommands here (each a function taking `add`).
EXTENSIONS: list[Callable[[Callable[..., argparse.ArgumentParser]], None]] = []
from .failback import add_commands as _failback_commands  # after EXTENSIONS: these modules import this one
from .mount import add_commands as _mount_commands
from .recovery import add_commands as _recovery_commands
from .tls import add_commands as _tls_commands

EXTENSIONS += [_mount_commands, _tls_commands, _recovery_commands, _failback_commands]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_relative_at(sys.argv[1:] if argv is None else argv))
    if not hasattr(args, "data_dir"):
        args.data_dir = None
    if not hasattr(args, "json"):
        args.json = False
    try:
        try:
            return args.func(args)
        except BaseExceptionGroup as group:  # trio nurseries wrap a failing start-up: show the cause
            leaves = _leaves(group)
            raise leaves[0] if len(leaves) == 1 else group from None
    except (VolumeError, ControlError, ValueError) as e:
        print(f"vdisk: error: {e}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"vdisk: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"vdisk: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1


def _join_relative_at(argv: list[str]) -> list[str]:
    """``--at -10m`` (a relative time) would read as an option to argparse: pass it as ``--at=-10m``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--at" and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"--at={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


if __name__ == "__main__":
    sys.exit(main())
