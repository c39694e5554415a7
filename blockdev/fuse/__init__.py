"""FUSE export: each served volume as the regular file ``MOUNTPOINT/NAME`` (pyfuse3 on trio).

``serve_fuse`` is a trio task: it mounts, reports readiness through ``task_status.started``, serves
until cancelled and always unmounts on the way out (cancellation, error or signal in the daemon).
pyfuse3 keeps one session per process, so a process has at most one FUSE mountpoint.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pyfuse3
import trio

from ..nbd.server import WorkerPool
from .adapter import Adapter, AdapterError, Support, check_support
from .files import WORKERS, Exports, VolumeFiles
from .loop import SessionLoop
from .mounts import is_mountpoint

__all__ = ["FuseExport", "FuseMountError", "VolumeFiles", "serve_fuse"]

log = logging.getLogger("blockdev.fuse")
# pyfuse3's session is process-global; this guard turns a second mount into a clear error.
_one_session = threading.Lock()
# Enough tasks that a request waiting (a sync replica's Completion) does not stall the rest.
MAX_TASKS = 8  # pyfuse3's loop (the fallback)
LOOP_TASKS = 4  # ours: big writes no longer hold a task, only a buffer


class FuseExport:
    """What ``serve_fuse`` reports when ready: where it is mounted and how its loop runs."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.loop: SessionLoop | None = None
        self.support: Support | None = None

    async def drain(self) -> None:
        """Stop taking requests and wait for the replies of those taken (our loop only: pyfuse3's
        own loop, the fallback, is simply cancelled)."""
        if self.loop is not None:
            await self.loop.drain()

    def statistics(self) -> dict[str, object]:
        loop = self.loop
        return {"mountpoint": str(self.mountpoint), "adapter": loop is not None,
                "lseek": bool(loop is not None and self.support is not None and self.support.lseek),
                "requests": loop.requests if loop else 0, "waits": loop.waits if loop else 0}


class FuseMountError(OSError):
    """The FUSE export could not be mounted; the message is for the user."""


def check_mountpoint(mountpoint: Path) -> None:
    """A clear error for the usual mistakes, before libfuse reports only 'mount failed'."""
    if is_mountpoint(mountpoint):  # before any stat: stat on our own mount would deadlock
        raise FuseMountError(errno.EBUSY, f"{mountpoint} is already a mountpoint (a dead FUSE mount left by "
                             f"a killed server goes with `fusermount3 -u -z {mountpoint}` or `vdisk umount`)")
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        raise FuseMountError(errno.ENOENT, f"FUSE mountpoint {mountpoint} does not exist") from None
    if not os.path.isdir(mountpoint):
        raise FuseMountError(errno.ENOTDIR, f"FUSE mountpoint {mountpoint} is not a directory")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise FuseMountError(errno.ENODEV, "/dev/fuse is missing or not accessible")


def mount_options() -> set[str]:
    options = set(pyfuse3.default_options) | {"fsname=vdisk", "subtype=vdisk"}
    if os.getuid() == 0:
        options.add("allow_other")  # so a loop device or another user's tools can open the file
    return options


def supported() -> Support:
    """The adapter's view of pyfuse3/libfuse, or FuseMountError naming what is unsupported."""
    try:
        return check_support()
    except AdapterError as e:
        raise FuseMountError(errno.ENOTSUP, f"cannot serve FUSE: {e}") from None


async def serve_fuse(mountpoint: str | os.PathLike[str], exports: Exports, *, degraded_ok: bool = False,
                     task_status: trio.TaskStatus[FuseExport] = trio.TASK_STATUS_IGNORED) -> None:
    """Mount ``exports()`` at ``mountpoint`` and serve it until cancelled; unmount on exit.

    Refused (FuseMountError) unless pyfuse3/libfuse are versions the adapter supports: another version
    would silently lose punch-hole, zero-range, SEEK_DATA and speed. ``degraded_ok`` serves anyway
    through pyfuse3's own loop and handlers (tests of that fallback).
    """
    path = Path(mountpoint).absolute()
    check_mountpoint(path)
    support: Support | None = None
    try:
        support = supported()
    except FuseMountError:
        if not degraded_ok:
            raise
    if not _one_session.acquire(blocking=False):
        raise FuseMountError(errno.EBUSY, "this process already serves a FUSE mountpoint")
    try:
        workers = WorkerPool(WORKERS)
        files = VolumeFiles(exports, workers)
        try:
            pyfuse3.init(files, str(path), mount_options())
        except RuntimeError as e:
            workers.close()
            raise FuseMountError(errno.EIO, f"cannot mount FUSE at {path}: {e}") from None
        adapter: Adapter | None = None
        loop: SessionLoop | None = None
        export = FuseExport(path)
        try:
            try:
                adapter = Adapter(files, support)
                adapter.install()
                loop = SessionLoop(adapter, tasks=LOOP_TASKS)
                files.pin = loop.pin
                export.loop = loop
                export.support = adapter.support
                if not adapter.support.lseek:
                    log.warning("libfuse %s is older than 3.8: SEEK_DATA/SEEK_HOLE are not offered on %s "
                                "(the kernel reports the whole file as data)", adapter.support.libfuse, path)
            except AdapterError as e:
                if not degraded_ok:
                    raise FuseMountError(errno.ENOTSUP, f"cannot serve FUSE at {path}: {e}") from None
                # Still a correct export through pyfuse3's own loop and handlers, without
                # fallocate/lseek and slower.
                log.warning("FUSE adapter not installed (%s): no punch-hole/zero-range, slower", e)
            task_status.started(export)
            if loop is not None:
                await loop.run()
            else:
                await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)
        finally:
            # Workers may still reply to requests and use pinned buffers: stop them before the
            # session (and with it the reply channel) goes away.
            workers.close()
            if loop is not None:
                loop.spares.free_all()
            if adapter is not None:
                adapter.uninstall()
            # Unmount even on cancellation: a mountpoint without a server hangs or fails its users.
            pyfuse3.close(unmount=True)
    finally:
        _one_session.release()
