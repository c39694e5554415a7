"""FUSE and NBD on one daemon: coherence, concurrent writers, fio with verify (file and loop device)."""
from __future__ import annotations

import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.fusekit import VERIFY, fio, require_fuse_host, served, sweep, vdisk

SIZE = 64 << 20
HALF = SIZE // 2


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A volume served with --fuse and --nbd; yields (FUSE file, NBD socket)."""
    require_fuse_host()
    home = tmp_path / "home"
    vdisk(home, "create", "vol", "--size", str(SIZE))
    sock = tmp_path / "vol.sock"
    try:
        with served(home, "vol", tmp_path / "fuse", sock):
            yield tmp_path / "fuse" / "vol", sock
    finally:
        assert not sweep(tmp_path, home), "leaked mounts, loop devices or daemons"


def connect(sock: Path) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_unix(str(sock))
    return h


def test_fuse_and_nbd_see_each_others_writes_at_once(daemon: tuple[Path, Path]) -> None:
    file, sock = daemon
    h = connect(sock)
    fd = os.open(file, os.O_RDWR)
    try:
        for i in range(50):
            off = i * 12_345
            os.pwrite(fd, f"fuse{i:04}".encode(), off)
            assert h.pread(8, off) == f"fuse{i:04}".encode()
            h.pwrite(f"nbd.{i:04}".encode(), off)
            assert os.pread(fd, 8, off) == f"nbd.{i:04}".encode()
    finally:
        os.close(fd)
        h.shutdown()


def test_concurrent_fuse_and_nbd_writers_to_distinct_regions_are_byte_exact(daemon: tuple[Path, Path]) -> None:
    file, sock = daemon
    model = bytearray(SIZE)
    errors: list[BaseException] = []
    quarter = SIZE // 4

    def writes(seed: int, base: int) -> Iterator[tuple[int, bytes]]:
        rng = random.Random(seed)
        for _ in range(250):
            n = rng.choice([512, 4096, 4096 + 17, 65536, 1 << 20])
            off = base + rng.randrange(quarter - n)
            yield off, rng.randbytes(n)

    def fuse_writer(seed: int, base: int) -> None:
        try:
            fd = os.open(file, os.O_RDWR)
            for off, data in writes(seed, base):
                os.pwrite(fd, data, off)
                model[off:off + len(data)] = data
            os.close(fd)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    def nbd_writer(seed: int, base: int) -> None:
        try:
            h = connect(sock)
            for off, data in writes(seed, base):
                h.pwrite(data, off)
                model[off:off + len(data)] = data
            h.flush()
            h.shutdown()
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=fuse_writer, args=(1, 0)),
               threading.Thread(target=fuse_writer, args=(2, quarter)),
               threading.Thread(target=nbd_writer, args=(3, 2 * quarter)),
               threading.Thread(target=nbd_writer, args=(4, 3 * quarter))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with open(file, "rb", buffering=0) as f:
        via_fuse = f.read()
    h = connect(sock)
    via_nbd = b"".join(h.pread(1 << 20, off) for off in range(0, SIZE, 1 << 20))
    h.shutdown()
    assert via_fuse == bytes(model)
    assert via_nbd == bytes(model)


def test_fio_psync_with_verify_on_the_fuse_file(daemon: tuple[Path, Path]) -> None:
    file, _ = daemon
    fio("--name=rand4k", f"--filename={file}", "--ioengine=psync", "--rw=randwrite", "--bs=4k",
        "--size=16M", *VERIFY)
    fio("--name=mixed", f"--filename={file}", "--ioengine=psync", "--rw=randwrite", "--bsrange=512-1m",
        "--offset=16M", "--size=32M", *VERIFY)


def test_fio_libaio_with_verify_through_a_loop_device(daemon: tuple[Path, Path]) -> None:
    file, _ = daemon
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(file)],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        fio("--name=qd32", f"--filename={loop}", "--ioengine=libaio", "--iodepth=32", "--rw=randwrite",
            "--bs=4k", "--size=24M", *VERIFY)
        fio("--name=seq", f"--filename={loop}", "--ioengine=libaio", "--iodepth=8", "--rw=write",
            "--bs=1m", "--offset=24M", "--size=32M", *VERIFY)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
