"""`vdisk mount NAME DIR` and `vdisk umount DIR`: a volume as a real disk on the host.

    vdisk serve NAME --fuse DATA_DIR/.NAME.fuse   (detached daemon, log in DATA_DIR/NAME.mount.log)
      -> losetup --direct-io=on DATA_DIR/.NAME.fuse/NAME   -> /dev/loopN
      -> mkfs.TYPE /dev/loopN  (with --mkfs)  -> mount /dev/loopN DIR

Each step is recorded in DATA_DIR/NAME.mount.json as soon as it is done, so `vdisk umount` can undo
exactly what exists, in reverse order, also after `vdisk mount` itself failed half-way or the daemon
was killed with -9 (its FUSE mount is then dead: I/O fails with ENOTCONN instead of hanging, and a lazy
`fusermount3 -u -z` removes it). Every step of umount is idempotent: re-running it finishes the job.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from blockdev.fuse.mounts import is_mountpoint, mount_source
from blockdev.volume import VolumeError, VolumeStore, validate_name, write_json_atomic

from .replicas import refuse_writable

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
# mkfs flags that mean "no questions": the loop device is ours and was just attached.
MKFS_FORCE = {"ext2": ["-F", "-q"], "ext3": ["-F", "-q"], "ext4": ["-F", "-q"], "xfs": ["-f", "-q"],
              "btrfs": ["-f", "-q"]}


class MountError(VolumeError):
    """A mount or umount step failed; the message says which and what is left."""


@dataclass(frozen=True)
class MountRecord:
    """What `vdisk mount` set up for one volume; fields fill in as steps complete."""

    name: str
    dir: str
    fuse_dir: str
    log: str
    pid: int | None = None
    pid_start: str | None = None  # /proc/PID/stat start time: guards against pid reuse
    loop: str | None = None
    fstype: str | None = None
    mounted: bool = False
    nbd: list[str] = field(default_factory=list)
    read_only: bool = False  # the whole stack: `serve --read-only`, `losetup -r`, `mount -o ro`

    @property
    def fuse_file(self) -> str:
        return os.path.join(self.fuse_dir, self.name)


def record_path(store: VolumeStore, name: str) -> Path:
    return store.root / f"{validate_name(name)}.mount.json"


def save_record(store: VolumeStore, rec: MountRecord) -> MountRecord:
    write_json_atomic(record_path(store, rec.name), asdict(rec))
    return rec


def load_record(store: VolumeStore, name: str) -> MountRecord | None:
    try:
        with open(record_path(store, name)) as f:
            return MountRecord(**json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise MountError(f"{record_path(store, name)}: corrupt mount record ({e})") from None


def all_records(store: VolumeStore) -> list[MountRecord]:
    out = []
    for p in sorted(store.root.glob("*.mount.json")) if store.root.is_dir() else []:
        rec = load_record(store, p.name[: -len(".mount.json")])
        if rec is not None:
            out.append(rec)
    return out


# -- small system helpers -------------------------------------------------------------------------
def run(cmd: list[str], what: str) -> str:
    """Run a system tool; MountError with its stderr on failure."""
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    except FileNotFoundError:
        raise MountError(f"{what}: {cmd[0]} is not installed") from None
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise MountError(f"{what} failed ({' '.join(cmd)}): {msg[-1] if msg else f'exit {p.returncode}'}")
    return p.stdout.strip()


def process_start(pid: int) -> str | None:
    """The start time of a live (not zombie) process, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def daemon_alive(rec: MountRecord) -> bool:
    return rec.pid is not None and rec.pid_start is not None and process_start(rec.pid) == rec.pid_start


def loop_backing(loop: str) -> str | None:
    try:
        with open(f"/sys/block/{os.path.basename(loop)}/loop/backing_file") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            tail = [ln.rstrip() for ln in f.readlines()[-lines:] if ln.strip()]
    except FileNotFoundError:
        return ""
    return "; ".join(tail)


# -- mount ----------------------------------------------------------------------------------------
def spawn_daemon(store: VolumeStore, rec: MountRecord) -> subprocess.Popen[bytes]:
    """`vdisk serve NAME --fuse FUSE_DIR` as a detached process running this same code."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "vdisk.cli", "--data-dir", str(store.root), "serve", rec.name,
           "--fuse", rec.fuse_dir, "-v"] + (["--read-only"] if rec.read_only else [])
    for spec in rec.nbd:
        cmd += ["--nbd", spec]
    with open(rec.log, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True, close_fds=True)


def wait_ready(proc: subprocess.Popen[bytes], rec: MountRecord, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MountError(f"the vdisk daemon exited ({proc.returncode}): {log_tail(rec.log, 2)}")
        if is_mountpoint(rec.fuse_dir) and os.path.exists(rec.fuse_file):
            return
        time.sleep(0.02)
    raise MountError(f"the vdisk daemon was not ready after {timeout:.0f}s (log: {rec.log})")


def existing_filesystem(image: str | Path) -> str | None:
    """The type of a filesystem (or partition table) already on ``image``, or None. ``blkid -p``
    probes the image file itself (no loop device, no cache); without blkid, the magic numbers of the
    filesystems --mkfs makes."""
    if shutil.which("blkid"):
        p = subprocess.run(["blkid", "-p", "-o", "export", str(image)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60, check=False)
        if p.returncode == 0:
            found = dict(ln.split("=", 1) for ln in p.stdout.splitlines() if "=" in ln)
            return found.get("TYPE") or found.get("PTTYPE") or "unknown"
        if p.returncode == 2:  # nothing found
            return None
    magics = ((0x438, b"\x53\xef", "ext2/3/4"), (0, b"XFSB", "xfs"), (0x10040, b"_BHRfS_M", "btrfs"))
    with open(image, "rb") as f:
        for off, magic, kind in magics:
            f.seek(off)
            if f.read(len(magic)) == magic:
                return kind
    return None


def check_can_mount(store: VolumeStore, name: str, target: str, fstype: str | None, read_only: bool = False,
                    force: bool = False) -> None:
    """Every refusal that needs no undo, before anything is started."""
    meta = store.meta(name)
    if read_only and fstype is not None:
        raise MountError("--mkfs writes the volume: it cannot be combined with --read-only")
    if not read_only:
        refuse_writable(meta)
    rec = load_record(store, name)
    if rec is not None:
        state = "" if daemon_alive(rec) else " (its daemon is gone: run `vdisk umount` to clean up)"
        raise MountError(f"volume {name!r} is already mounted on {rec.dir}{state}")
    if not os.path.exists(target):
        raise MountError(f"mount point {target} does not exist")
    if not os.path.isdir(target):
        raise MountError(f"mount point {target} is not a directory")
    if is_mountpoint(target):
        raise MountError(f"{target} is already a mountpoint")
    for other in all_records(store):
        if other.dir == target:
            raise MountError(f"{target} is already used by volume {other.name!r}")
    holder = store.holder(name)
    if holder is not None:
        who = f" by pid {holder['pid']}" if holder.get("pid") else ""
        raise MountError(f"volume {name!r} is busy: it is being served{who}")
    if fstype is not None and shutil.which(f"mkfs.{fstype}") is None:
        raise MountError(f"--mkfs {fstype}: mkfs.{fstype} is not installed")
    if fstype is not None and not force:
        found = existing_filesystem(store.image_path(name))
        if found is not None:
            raise MountError(f"volume {name!r} already has a filesystem ({found}): --mkfs would erase it; "
                             f"add --force to format it anyway, or mount it without --mkfs")
    if os.geteuid() != 0:
        raise MountError("vdisk mount needs root (losetup and mount)")


def mount_volume(store: VolumeStore, name: str, target: str, fstype: str | None = None,
                 nbd: list[str] | None = None, direct_io: bool = True, read_only: bool = False,
                 force: bool = False) -> MountRecord:
    """Serve, attach, optionally format, and mount; on any failure undo what was done."""
    target = os.path.realpath(target)
    check_can_mount(store, name, target, fstype, read_only, force)
    rec = MountRecord(name=name, dir=target, fuse_dir=str(store.root / f".{name}.fuse"),
                      log=str(store.root / f"{name}.mount.log"), fstype=fstype, nbd=list(nbd or []),
                      read_only=read_only)
    os.makedirs(rec.fuse_dir, exist_ok=True)
    rec = save_record(store, rec)
    try:
        proc = spawn_daemon(store, rec)
        rec = save_record(store, replace(rec, pid=proc.pid, pid_start=process_start(proc.pid)))
        wait_ready(proc, rec)
        cmd = (["losetup", "--find", "--show"] + (["--direct-io=on"] if direct_io else [])
               + (["--read-only"] if read_only else []) + [rec.fuse_file])
        rec = save_record(store, replace(rec, loop=run(cmd, "attaching a loop device")))
        if fstype is not None:
            run([f"mkfs.{fstype}", *MKFS_FORCE.get(fstype, []), rec.loop or ""], f"mkfs.{fstype}")
        options = ["-o", read_only_options(rec.loop or "")] if read_only else []
        run(["mount", *options, rec.loop or "", target], f"mounting {rec.loop} on {target}"
            + ("" if fstype else " (no filesystem yet? use --mkfs ext4)"))
        return save_record(store, replace(rec, mounted=True))
    except BaseException as e:
        try:
            umount_record(store, rec)
        except MountError as undo:
            raise MountError(f"{e}; and undoing it failed: {undo}") from None
        raise


def read_only_options(device: str) -> str:
    """Mount options that really write nothing: a journaling filesystem replays its journal on a
    plain ``-o ro`` mount (a write, refused by the read-only loop device), unless told not to."""
    try:
        fstype = run(["blkid", "-o", "value", "-s", "TYPE", device], "probing the filesystem type")
    except MountError:
        fstype = ""  # no filesystem found: let mount say so
    return {"ext3": "ro,noload", "ext4": "ro,noload", "xfs": "ro,norecovery"}.get(fstype, "ro")


# -- umount ---------------------------------------------------------------------------------------
def find_record(store: VolumeStore, target: str) -> MountRecord:
    """The record for a mount directory or a volume name."""
    path = os.path.realpath(target)
    for rec in all_records(store):
        if rec.dir == path:
            return rec
    if os.sep not in target:
        try:
            rec = load_record(store, target)
        except VolumeError:
            rec = None
        if rec is not None:
            return rec
    raise MountError(f"{target} is not a vdisk mount (no record in {store.root})")


def stop_daemon(rec: MountRecord, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM (the daemon flushes and unmounts its FUSE), then SIGKILL if it does not go."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not daemon_alive(rec):
            return
        assert rec.pid is not None
        try:
            os.kill(rec.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while daemon_alive(rec) and time.monotonic() < deadline:
            time.sleep(0.02)
    if daemon_alive(rec):
        raise MountError(f"the vdisk daemon (pid {rec.pid}) does not exit")


def loop_busy(loop: str) -> bool:
    """True while something (a filesystem, even a lazily detached one) holds the loop device."""
    try:
        os.close(os.open(loop, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as e:
        return e.errno == errno.EBUSY
    return False


def umount_record(store: VolumeStore, rec: MountRecord, lazy: bool = False, force: bool = False) -> None:
    """Undo ``rec`` in reverse order; each step checks the system, not only the record."""
    if force:
        # A wedged daemon would make the filesystem umount wait forever; killing it aborts its FUSE
        # connection, so every pending and later request fails at once instead.
        stop_daemon(rec, timeout=0.5)
    if rec.loop and mount_source(rec.dir) == rec.loop:
        run(["umount", *(["-l"] if lazy or force else []), rec.dir], f"unmounting {rec.dir}"
            + ("" if lazy or force else " (close files using it, or use --lazy)"))
    if rec.mounted:
        rec = save_record(store, replace(rec, mounted=False))
    if rec.loop and loop_backing(rec.loop) == rec.fuse_file:
        if loop_busy(rec.loop) and not force:
            # Stopping the daemon now would lose what the still-open files write: keep serving.
            raise MountError(f"{rec.dir} is detached, but files opened on it keep {rec.loop} busy; the volume "
                             f"stays served until they are closed: then run `vdisk umount {rec.name}` again")
        run(["losetup", "-d", rec.loop], f"detaching {rec.loop}")
    stop_daemon(rec)
    if is_mountpoint(rec.fuse_dir):  # left by a daemon killed with -9
        run(["fusermount3", "-u", "-z", rec.fuse_dir], f"removing the dead FUSE mount {rec.fuse_dir}")
    try:
        os.rmdir(rec.fuse_dir)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EBUSY):
            raise
    record_path(store, rec.name).unlink(missing_ok=True)


# -- CLI ------------------------------------------------------------------------------------------
def cmd_mount(args: argparse.Namespace) -> int:
    store = VolumeStore(args.data_dir)
    rec = mount_volume(store, args.name, args.dir, fstype=args.mkfs, nbd=args.nbd or [],
                       direct_io=not args.no_direct_io, read_only=args.read_only, force=args.force)
    _emit(args, asdict(rec), f"mounted {rec.name} on {rec.dir} ({rec.loop}, FUSE file {rec.fuse_file}, "
          f"daemon pid {rec.pid})")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    store = VolumeStore(args.data_dir)
    rec = find_record(store, args.target)
    umount_record(store, rec, lazy=args.lazy, force=args.force)
    _emit(args, {"unmounted": rec.name, "dir": rec.dir}, f"unmounted {rec.name} from {rec.dir}")
    return 0


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    from .cli import emit

    emit(args, obj, text)


def add_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register `mount` and `umount` (called by vdisk.cli.build_parser)."""
    sp = add("mount", cmd_mount, "serve a volume over FUSE and mount it on the host through a loop device")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("dir", metavar="DIR", help="an existing empty directory")
    sp.add_argument("--mkfs", metavar="TYPE", help="make a filesystem first (e.g. ext4); erases the volume")
    sp.add_argument("--force", action="store_true",
                    help="with --mkfs: format even if the volume already has a filesystem (default: refuse)")
    sp.add_argument("--nbd", action="append", metavar="unix:PATH|tcp:HOST:PORT",
                    help="also serve the volume over NBD while mounted")
    sp.add_argument("--no-direct-io", action="store_true", help="attach the loop device without direct I/O")
    sp.add_argument("--read-only", action="store_true",
                    help="serve, attach and mount read-only (no journal replay); the only way to mount a replica")
    sp = add("umount", cmd_umount, "unmount what `vdisk mount` set up and stop its daemon")
    sp.add_argument("target", metavar="DIR|NAME")
    sp.add_argument("--lazy", action="store_true", help="detach the filesystem even if files are open")
    sp.add_argument("--force", action="store_true",
                    help="kill a wedged daemon first (pending writes fail), then unmount lazily")
