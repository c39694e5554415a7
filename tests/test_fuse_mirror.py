"""The FUSE front end under a real sync mirror: every FUSE write, punch and zero reaches the replica."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockdev.image.file import fallocate
from tests.fusekit import VERIFY, fio, require_fuse_host, sweep
from tests.mirror_procs import Procs

MiB = 1 << 20
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO_RANGE = 0x10 | 0x01


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    require_fuse_host()
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()  # SIGTERM: the daemon unmounts its FUSE export
        assert not sweep(tmp_path, tmp_path / "src"), "leaked mounts or daemons"


def fuse_mirrored(procs: Procs, tmp_path: Path, timeout: str = "3") -> tuple[Any, Any, Path]:
    """vol (64 MiB) served over FUSE at tmp_path/fuse and in sync with a target: (target, serve, mountpoint)."""
    src = str(tmp_path / "src")
    procs.run("--data-dir", src, "create", "vol", "--size", "64M")
    target, port = procs.target("dst")
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    daemon, _ = procs.start("--data-dir", src, "serve", "vol", "--fuse", str(mnt), "-v", log="serve.log",
                            ready=r"serving ")
    procs.run("--data-dir", src, "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "sync", "--timeout", timeout)
    procs.wait_state("src", "vol", "in_sync")
    return target, daemon, mnt


def test_fuse_writes_punches_and_zeroes_reach_a_sync_replica_byte_exact(procs: Procs, tmp_path: Path) -> None:
    _, _, mnt = fuse_mirrored(procs, tmp_path)

    file = mnt / "vol"
    # Big writes go through the pinned zero-copy path while the mirror holds their payloads.
    fio("--name=mirrored", f"--filename={file}", "--ioengine=libaio", "--iodepth=8", "--rw=randwrite",
        "--bsrange=4k-1m", "--size=48M", *VERIFY)
    fd = os.open(file, os.O_RDWR)
    try:
        fallocate(fd, PUNCH, 8 * MiB, 2 * MiB)
        fallocate(fd, ZERO_RANGE, 20 * MiB + 4096, 3 * 4096)
        os.pwrite(fd, b"tail" * 1024, 63 * MiB)
        os.fsync(fd)
        assert os.pread(fd, 2 * MiB, 8 * MiB) == bytes(2 * MiB)
    finally:
        os.close(fd)

    procs.wait_state("src", "vol", "in_sync")
    source = (tmp_path / "src" / "vol.img").read_bytes()
    replica = (tmp_path / "dst" / "vol.img").read_bytes()
    assert source[63 * MiB:63 * MiB + 4096] == b"tail" * 1024
    assert source == replica


def test_shutdown_drains_a_fuse_write_waiting_for_the_replica(procs: Procs, tmp_path: Path) -> None:
    # SIGTERM while a big FUSE write (on a worker thread) waits for the replica's ack: the daemon
    # stops reading /dev/fuse, but lets that write finish through the still-running mirror before
    # it stops the mirror. So the write completes mirrored (nothing left to resync), rather than
    # being cut off (reply lost at unmount) or degraded by the mirror stopping under it.
    import mmap
    import signal
    import threading

    from vdisk.mirroring import recorded_dirty

    target, daemon, mnt = fuse_mirrored(procs, tmp_path, timeout="20")
    data = os.urandom(MiB)  # >= 128 KiB: written in place by a worker thread
    result: list[object] = []

    def write() -> None:
        buf = mmap.mmap(-1, MiB)  # page-aligned: one FUSE request, not two (max_pages)
        buf[:] = data
        fd = os.open(mnt / "vol", os.O_WRONLY)
        try:
            result.append(os.pwrite(fd, buf, 5 * MiB))
        except OSError as e:
            result.append(e)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # unmounted under us

    os.kill(target.pid, signal.SIGSTOP)  # the replica holds its ack back
    t = threading.Thread(target=write)
    try:
        t.start()
        deadline = time.monotonic() + 20
        while procs.status("src", "vol")["in_flight"] == 0:  # the daemon has it, waiting for the ack
            assert time.monotonic() < deadline, "the write never reached the mirror"
            time.sleep(0.02)
        os.kill(daemon.pid, signal.SIGTERM)
    finally:
        os.kill(target.pid, signal.SIGCONT)  # the ack comes, during the shutdown
    assert daemon.wait(30) == 0
    t.join(30)
    assert result == [MiB], result  # replied to, not cut off by the unmount
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log
    assert (tmp_path / "src" / "vol.img").read_bytes()[5 * MiB:6 * MiB] == data
    assert (tmp_path / "dst" / "vol.img").read_bytes()[5 * MiB:6 * MiB] == data
    assert not set(recorded_dirty(tmp_path / "src", "vol", 64 * MiB))  # mirrored: nothing to resend
