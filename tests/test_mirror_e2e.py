"""Sync mirroring end to end: two real daemons on loopback, libnbd and fio as hosts."""
from __future__ import annotations

import os
import random
import shutil
import threading
import time

import pytest

from tests.mirror_procs import Procs, corrupt_silently

nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")
MiB = 1 << 20
REGION = 64 << 10


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def mirrored(procs: Procs, size: str = "64M", *mirror_args: str, target_args: tuple[str, ...] = ()):
    """A volume served and sync-mirrored to a target; (target proc, port, serve proc, nbd socket)."""
    procs.run("--data-dir", str(procs.tmp / "src"), "create", "vol", "--size", size)
    tgt, port = procs.target("dst", 0, *target_args)
    srv, sock = procs.serve("src", "vol")
    procs.run("--data-dir", str(procs.tmp / "src"), "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "sync",
              "--timeout", "3", *mirror_args)
    return tgt, port, srv, sock


def images(procs: Procs) -> tuple[bytes, bytes]:
    return (procs.tmp / "src" / "vol.img").read_bytes(), (procs.tmp / "dst" / "vol.img").read_bytes()


def client(sock: str):
    h = nbd.NBD()
    h.connect_unix(sock)
    return h


@pytest.mark.skipif(shutil.which("fio") is None and not os.environ.get("CI"), reason="fio is not installed")
def test_fio_randwrite_with_verify_then_source_and_replica_are_byte_exact(procs):
    rep_sock = str(procs.tmp / "replica.sock")
    _, _, _, sock = mirrored(procs, target_args=("--nbd", f"unix:{rep_sock}"))
    procs.wait_state("src", "vol", "in_sync")
    import subprocess

    res = subprocess.run(
        ["fio", "--name=mirror", "--ioengine=nbd", f"--uri=nbd+unix:///vol?socket={sock}", "--rw=randwrite",
         "--bsrange=4k-256k", "--size=48M", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1",
         "--do_verify=1", "--randrepeat=0", "--output-format=terse"],
        capture_output=True, text=True, timeout=120, check=False, cwd=procs.tmp)  # fio's state file lands there
    assert res.returncode == 0, res.stdout + res.stderr
    h = client(sock)
    h.flush()
    h.shutdown()
    procs.wait_state("src", "vol", "in_sync")
    src, dst = images(procs)
    assert src == dst
    # A DR host reads the replica over NBD, read-only even while the source mirrors into it.
    r = client(rep_sock)
    assert r.is_read_only() and r.pread(1 << 20, 16 * MiB) == src[16 * MiB:17 * MiB]
    with pytest.raises(nbd.Error):
        r.pwrite(b"x" * 512, 0)
    r.shutdown()
    res = procs.run("--data-dir", str(procs.tmp / "dst"), "serve", "vol", "--nbd",
                    f"unix:{procs.tmp / 'rw.sock'}", check=False)
    assert res.returncode != 0 and "is a replica of volume 'vol'" in res.stderr  # nobody can open it writable


def test_every_acknowledged_write_is_on_the_replica_when_the_source_is_killed(procs):
    _, _, srv, sock = mirrored(procs)
    procs.wait_state("src", "vol", "in_sync")
    h = client(sock)
    rng = random.Random(7)
    acked: list[tuple[int, bytes]] = []
    slots = rng.sample(range(64 * MiB // 4096), 3000)
    bufs = []
    for i, slot in enumerate(slots):
        data = rng.randbytes(4096)
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        bufs.append(buf)

        def done(err, off=slot * 4096, data=data):
            if err.value == 0:
                acked.append((off, data))
            return 1

        h.aio_pwrite(buf, slot * 4096, completion=done)
        while h.aio_in_flight() >= 32:
            h.poll(-1)
        if i == 2000:
            break
    # Kill the source at once, with writes still in flight: acknowledged ones must be on the replica.
    Procs.kill9(srv)
    assert len(acked) > 1000
    fd = os.open(procs.tmp / "dst" / "vol.img", os.O_RDONLY)
    try:
        missing = [off for off, data in acked if os.pread(fd, 4096, off) != data]
    finally:
        os.close(fd)
    assert not missing, f"{len(missing)} acknowledged writes are not on the replica"


def writer(sock: str, stop: threading.Event, log: list[tuple[float, int]], seed: int) -> None:
    h = client(sock)
    rng = random.Random(seed)
    while not stop.is_set():
        off = rng.randrange(0, 64 * MiB // 4096) * 4096
        log.append((time.monotonic(), off))
        h.pwrite(rng.randbytes(4096), off)
    h.flush()
    h.shutdown()


def test_target_killed_mid_load_degrades_then_resyncs_only_what_changed(procs):
    tgt, port, _, sock = mirrored(procs)
    procs.wait_state("src", "vol", "in_sync")
    stop, log = threading.Event(), []
    t = threading.Thread(target=writer, args=(sock, stop, log, 1))
    t.start()
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        Procs.kill9(tgt)
        st = procs.wait_state("src", "vol", "degraded")
        deadline = time.monotonic() + 30  # writes go on locally, marking the dirty map
        while procs.status("src", "vol")["dirty_bytes"] == 0:
            assert time.monotonic() < deadline, "no write was marked dirty while the target was down"
            time.sleep(0.05)
        before = st["resync_bytes_sent"]
        procs.target("dst", port)
        st = procs.wait_state("src", "vol", "in_sync")
        resync_done = time.monotonic()
    finally:
        stop.set()
        t.join(30)
    st = procs.wait_state("src", "vol", "in_sync")
    # Resent bytes are bounded by the regions written from the write in flight at the kill (the writer
    # has one at a time: the last one started before it) until the resync ended.
    in_flight = max(ts for ts, _ in log if ts <= killed_at)
    touched = {off // REGION for ts, off in log if in_flight <= ts <= resync_done}
    resent = st["resync_bytes_sent"] - before
    assert 0 < resent <= len(touched) * REGION
    res = procs.run("--data-dir", str(procs.tmp / "src"), "verify", "vol", "--json")
    assert '"differing_bytes": 0' in res.stdout
    src, dst = images(procs)
    assert src == dst


def test_source_crash_resyncs_only_the_activity_log_not_the_volume(procs):
    _, _, srv, sock = mirrored(procs, "256M")
    procs.wait_state("src", "vol", "in_sync")
    h = client(sock)
    rng = random.Random(3)
    for _ in range(200):  # writes confined to three 4 MiB extents
        h.pwrite(rng.randbytes(4096), rng.choice([0, 100, 200]) * MiB + rng.randrange(0, 1024) * 4096)
    Procs.kill9(srv)
    st = procs.status("src", "vol")  # nobody serves it: read from the metadata and the dirty map
    assert st["state"] == "disconnected" and st["mode"] == "sync" and st["initial_sync"]["done"]
    _, sock = procs.serve("src", "vol")  # the mirror resumes from the persisted configuration
    st = procs.wait_state("src", "vol", "in_sync")
    assert st["initial_sync"]["done"]
    assert st["resync_regions_sent"] <= 3 * 64  # the logged extents, not the 4096 regions of the volume
    src, dst = images(procs)
    assert src == dst


def test_wrong_key_is_refused_by_both_daemons(procs):
    for name, key in (("right", "a-long-enough-key-0123456789\n"), ("wrong", "another-key-that-is-long-enough\n")):
        (procs.tmp / name).write_text(key)
        (procs.tmp / name).chmod(0o600)  # a key file others can read is refused
    mirrored(procs, "16M", "--psk-file", str(procs.tmp / "wrong"),
             target_args=("--psk-file", str(procs.tmp / "right")))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (procs.status("src", "vol") or {}).get("last_error"):
        time.sleep(0.1)
    st = procs.status("src", "vol")
    assert "wrong pre-shared key" in st["last_error"] and st["state"] == "disconnected"
    assert "wrong pre-shared key" in (procs.tmp / "target.log").read_text()
    assert not (procs.tmp / "dst" / "vol.img").exists()


def test_verify_finds_planted_differences_and_repair_resends_only_them(procs):
    _, _, _, sock = mirrored(procs, "32M")
    h = client(sock)
    rng = random.Random(5)
    h.pwrite(rng.randbytes(8 * MiB), 0)
    h.flush()
    procs.wait_state("src", "vol", "in_sync")
    corrupt_silently(procs.tmp / "dst" / "vol.img",  # the last one in a hole
                     [(off, b"\x5a") for off in (10, 3 * MiB + 5, 3 * MiB + REGION + 1, 20 * MiB)])
    data = ["--data-dir", str(procs.tmp / "src")]
    res = procs.run(*data, "verify", "vol", check=False)
    assert res.returncode == 1 and "3 differing ranges" in res.stdout, res.stdout
    res = procs.run(*data, "verify", "vol", "--repair", "--json")
    import json

    rep = json.loads(res.stdout)
    assert rep["repaired"] and rep["differing_blocks"] == 4
    assert rep["ranges"] == [[0, REGION], [3 * MiB, 2 * REGION], [20 * MiB, REGION]]
    assert rep["resent_bytes"] == 3 * REGION  # the hole goes back as a zero frame, not bytes
    res = procs.run(*data, "verify", "vol", check=False)
    assert res.returncode == 0, (res.stdout, res.stderr, procs.status("src", "vol"))
    src, dst = images(procs)
    assert src == dst


@pytest.mark.skipif(shutil.which("fio") is None and not os.environ.get("CI"), reason="fio is not installed")
def test_overlapping_writes_in_flight_leave_source_and_replica_identical(procs):
    # Random sizes up to 1 MiB without a random map: big writes run on two worker threads and overlap
    # each other, so they may land locally in another order than the replica applies them. The mirror
    # must notice and resend those ranges, not report in_sync over a replica that differs.
    _, _, _, sock = mirrored(procs, "16M")
    procs.wait_state("src", "vol", "in_sync")
    import subprocess

    res = subprocess.run(
        ["fio", "--name=overlap", "--ioengine=nbd", f"--uri=nbd+unix:///vol?socket={sock}", "--rw=randwrite",
         "--bsrange=4k-1m", "--size=16M", "--io_size=160M", "--iodepth=32", "--norandommap", "--randrepeat=0",
         "--output-format=terse"],
        capture_output=True, text=True, timeout=120, check=False, cwd=procs.tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    deadline = time.monotonic() + 30
    while True:
        st = procs.wait_state("src", "vol", "in_sync")
        if st["dirty_bytes"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    src, dst = images(procs)
    assert src == dst, f"replica differs from the source; mirror status {st}"


def test_reconfiguring_a_running_mirror_under_load_loses_no_write(procs):
    # `vdisk mirror NAME ...` again while the volume is served and written: the new replicator is
    # attached in one step and what the old one had not got acknowledged is resent. With the same
    # --to the pairing is kept (no compare runs), so a write that went nowhere would stay missing.
    _, port, _, sock = mirrored(procs)
    procs.wait_state("src", "vol", "in_sync")
    stop, log = threading.Event(), []
    threads = [threading.Thread(target=writer, args=(sock, stop, log, seed)) for seed in (11, 12, 13)]
    for t in threads:
        t.start()
    try:
        for i in range(8):
            while len(log) < 200 * (i + 1):  # writes in flight across every hand-over
                time.sleep(0.01)
            policy = ("--on-link-loss", "block") if i % 2 else ()
            procs.run("--data-dir", str(procs.tmp / "src"), "mirror", "vol", "--to", f"127.0.0.1:{port}",
                      "--mode", "sync", "--timeout", "3", *policy)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    st = procs.wait_state("src", "vol", "in_sync")
    assert st["dirty_bytes"] == 0 and st["on_link_loss"] == "block"
    res = procs.run("--data-dir", str(procs.tmp / "src"), "verify", "vol", "--json")
    assert '"differing_bytes": 0' in res.stdout, res.stdout
    src, dst = images(procs)
    assert src == dst
