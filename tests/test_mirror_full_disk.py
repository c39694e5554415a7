"""A sync-mirrored volume on a full filesystem (a small tmpfs mounted by the test): serve keeps
running and comes up again, the dirty map is kept (in memory, saved in place, retried), status says
what is known, and no temp file is ever left behind."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mirror_procs import Procs

nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")
MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[tuple[Procs, Path]]:
    """Procs, and tmp_path/src as a 40 MiB tmpfs (every daemon is stopped before it is unmounted)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("mounting a small tmpfs needs root, and under CI this test must run")
        print("skipped: mounting a small tmpfs needs root")
        pytest.skip("mounting a small tmpfs needs root")
    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0755", "vdisk-test", str(src)], check=True)
    procs = Procs(tmp_path)
    try:
        yield procs, src
    finally:
        procs.kill_all()
        subprocess.run(["umount", str(src)], check=False)
        if os.path.ismount(src):
            subprocess.run(["umount", "-l", str(src)], check=False)


def fill(root: Path) -> None:
    """Use up every free page of the filesystem (appending to root/filler)."""
    fd = os.open(root / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (bytes(MiB), bytes(PAGE)):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    assert os.statvfs(root).f_bavail == 0


def temp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))


def nbd_writes(sock: str, seed: int, n: int = 50, flush: bool = True) -> None:
    """Overwrites inside the first 8 MiB (allocated: a full tmpfs still takes them)."""
    import random

    h = nbd.NBD()
    h.connect_unix(sock)
    rng = random.Random(seed)
    for _ in range(n):
        h.pwrite(rng.randbytes(PAGE), rng.randrange(0, 8 * MiB // PAGE) * PAGE)
    if flush:
        h.flush()  # what the replica lacks is made durable: must not fail on a full disk
    h.shutdown()


def wait_for(pred, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_full_source_disk_keeps_serving_and_loses_no_difference(small_fs: tuple[Procs, Path]) -> None:
    procs, src = small_fs
    data = ["--data-dir", str(src)]
    procs.run(*data, "create", "vol", "--size", "16M")
    tgt, port = procs.target("dst")
    srv, sock = procs.serve("src", "vol")
    procs.run(*data, "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "sync", "--timeout", "3")
    h = nbd.NBD()
    h.connect_unix(sock)
    h.pwrite(os.urandom(8 * MiB), 0)  # allocated from here on
    h.flush()
    h.shutdown()
    procs.wait_state("src", "vol", "in_sync")

    # While serving: the replica goes away, the disk fills up, the host keeps writing and flushing.
    Procs.kill9(tgt)
    procs.wait_state("src", "vol", "degraded")
    fill(src)
    nbd_writes(sock, 1)
    st = procs.status("src", "vol")
    assert st["dirty_bytes"] > 0 and st["save_error"] is None  # saved in place: no space needed
    assert temp_files(src) == []

    # A crash; offline status reads what the files record (map and activity log).
    Procs.kill9(srv)
    st = procs.status("src", "vol")
    assert st["state"] == "disconnected" and st["dirty_bytes"] > 0
    stale = src / f".vol.mirror-dirty.{_dead_pid()}.tmp"
    stale.touch()  # what an earlier version left per failed save

    # Serve comes up on the full disk (the new generation cannot be recorded: said, not fatal),
    # with the stale temp file gone; the replica catches up and compares clean.
    srv, sock = procs.serve("src", "vol")
    assert not stale.exists()
    assert "cannot record its new generation" in (procs.tmp / "serve.log").read_text()
    tgt, _ = procs.target("dst", port)
    procs.wait_state("src", "vol", "in_sync")
    res = procs.run(*data, "verify", "vol", "--json")
    assert '"differing_bytes": 0' in res.stdout, res.stdout
    assert temp_files(src) == []

    # A map that cannot be written at all (its file is gone and the disk has no room for it): serve
    # still comes up, says what it could not save, keeps the bits in memory and retries.
    os.kill(srv.pid, signal.SIGTERM)
    srv.wait(20)
    (src / "vol.mirror-dirty").unlink()
    fill(src)
    srv, sock = procs.serve("src", "vol")
    wait_for(lambda: (procs.status("src", "vol") or {}).get("save_error"), "the failed save to be reported")
    assert str(src / "vol.mirror-dirty") in procs.status("src", "vol")["save_error"]
    assert "cannot save the dirty map" in (procs.tmp / "serve.log").read_text()
    Procs.kill9(tgt)
    procs.wait_state("src", "vol", "degraded")
    nbd_writes(sock, 2)
    st = procs.status("src", "vol")
    assert st["dirty_bytes"] > 0 and st["save_error"]
    assert temp_files(src) == []
    (src / "filler").unlink()  # room again: the next retry saves the map
    wait_for(lambda: procs.status("src", "vol")["save_error"] is None, "the dirty map to be saved")
    procs.target("dst", port)
    procs.wait_state("src", "vol", "in_sync")
    res = procs.run(*data, "verify", "vol", "--json")
    assert '"differing_bytes": 0' in res.stdout, res.stdout
    assert temp_files(src) == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid
