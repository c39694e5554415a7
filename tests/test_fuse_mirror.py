"""The FUSE front end under a real sync mirror: every FUSE write, punch and zero reaches the replica."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


def test_fuse_writes_punches_and_zeroes_reach_a_sync_replica_byte_exact(procs: Procs, tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    procs.run("--data-dir", src, "create", "vol", "--size", "64M")
    _, port = procs.target("dst")
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    procs.start("--data-dir", src, "serve", "vol", "--fuse", str(mnt), "-v", log="serve.log", ready=r"serving ")
    procs.run("--data-dir", src, "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "sync", "--timeout", "3")
    procs.wait_state("src", "vol", "in_sync")

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
