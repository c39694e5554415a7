"""Point-in-time recovery and failover end to end: real `vdisk serve` (async source) and `vdisk target
--history` daemons on loopback, libnbd as host and DR reader; `vdisk checkpoints`, `vdisk recover`
and `vdisk failover` run beside the target."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time

import pytest

from tests.mirror_procs import Procs

nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")
MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def vd(procs: Procs, data: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return procs.run("--data-dir", str(procs.tmp / data), *args, check=check)


def setup(procs: Procs, *target_args: str):
    vd(procs, "src", "create", "vol", "--size", str(SIZE))
    tgt, port = procs.target("dst", 0, "--history", "1h", *target_args)
    srv, sock = procs.serve("src", "vol")
    vd(procs, "src", "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "async", "--timeout", "3",
       "--checkpoint-interval", "1s")
    procs.wait_state("src", "vol", "in_sync")
    return tgt, port, srv, sock


def write(sock: str, seed: int, n: int = 40) -> None:
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_unix(sock)
    for _ in range(n):
        off = rng.randrange(0, SIZE // 4096 - 16) * 4096
        if rng.random() < 0.1:
            h.zero(rng.randrange(1, 16) * 4096, off)
        else:
            h.pwrite(rng.randbytes(rng.randrange(1, 16) * 4096), off)
    h.flush()
    h.shutdown()


def mark(procs: Procs) -> tuple[int, str]:
    """(checkpoint id, sha256) of the source once the replica has everything: the source's own
    record of the last checkpoint the target acknowledged, and its image's hash (no write runs)."""
    st = procs.wait_state("src", "vol", "in_sync", timeout=60)
    time.sleep(1.5)  # one more checkpoint interval: the state is surely checkpointed and acked
    st = procs.wait_state("src", "vol", "in_sync", timeout=60)
    return st["last_checkpoint"]["id"], hashlib.sha256((procs.tmp / "src" / "vol.img").read_bytes()).hexdigest()


def read_export(uri: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    out = b"".join(h.pread(min(4 * MiB, SIZE - o), o) for o in range(0, SIZE, 4 * MiB))
    h.shutdown()
    return out


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_pitr_exports_past_checkpoints_byte_exact_while_mirroring_continues(procs):
    _tgt, _port, _, sock = setup(procs)
    marks = []
    for seed in range(3):
        write(sock, seed)
        marks.append(mark(procs))
    write(sock, 99, 200)  # more, still shipping while we recover
    listing = json.loads(vd(procs, "dst", "checkpoints", "vol", "--json").stdout)
    ids = [c["id"] for c in listing["checkpoints"]]
    for cp, _h in marks:
        assert cp in ids
    assert all({"id", "time", "time_ns", "bytes"} <= set(c) for c in listing["checkpoints"])
    assert "latest" in vd(procs, "dst", "checkpoints", "vol").stdout
    for cp, want in marks:
        rsock = str(procs.tmp / f"rec{cp}.sock")
        p, _ = procs.start("--data-dir", str(procs.tmp / "dst"), "recover", "vol", "--at", str(cp), "--nbd",
                           f"unix:{rsock}", log=f"rec{cp}.log", ready="recovering vol at checkpoint")
        assert sha(read_export(f"nbd+unix:///vol?socket={rsock}")) == want
        p.terminate()
        p.wait(10)
    # --to a file and a new volume; a relative time picks the newest checkpoint at or before it.
    cp, want = marks[0]
    out = procs.tmp / "copy.img"
    vd(procs, "dst", "recover", "vol", "--at", str(cp), "--to", str(out))
    assert sha(out.read_bytes()) == want
    vd(procs, "dst", "recover", "vol", "--at", str(cp), "--to", "restored")
    assert sha((procs.tmp / "dst" / "restored.img").read_bytes()) == want
    res = vd(procs, "dst", "recover", "vol", "--at", "-1h", "--to", "x", check=False)
    assert res.returncode == 1 and "no checkpoint of 'vol' at or before" in res.stderr
    res = vd(procs, "dst", "recover", "vol", "--at", "123456789", "--to", "x", check=False)
    assert res.returncode == 1 and "not in its history" in res.stderr
    res = vd(procs, "dst", "recover", "vol", "--at", "yesterday", "--to", "x", check=False)
    assert res.returncode == 1 and "invalid --at" in res.stderr
    # The mirror went on meanwhile: the replica converges to the source.
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    assert (procs.tmp / "src" / "vol.img").read_bytes() == (procs.tmp / "dst" / "vol.img").read_bytes()


def test_writable_recovery_never_touches_the_replica_or_the_mirror(procs):
    _, _, _, sock = setup(procs)
    write(sock, 1)
    cp, want = mark(procs)
    write(sock, 2)
    mark(procs)
    rsock = str(procs.tmp / "rw.sock")
    p, _ = procs.start("--data-dir", str(procs.tmp / "dst"), "recover", "vol", "--at", str(cp), "--writable",
                       "--nbd", f"unix:{rsock}", log="rw.log", ready="recovering vol")
    replica_before = sha((procs.tmp / "dst" / "vol.img").read_bytes())
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///vol?socket={rsock}")
    assert not h.is_read_only()
    h.pwrite(b"T" * 6000, 1000)  # partial blocks at both ends: copy-on-write keeps their edges
    h.zero(8192, 3 * MiB)
    h.flush()
    got = h.pread(SIZE, 0)
    h.shutdown()
    assert got[1000:7000] == b"T" * 6000 and got[3 * MiB:3 * MiB + 8192] == bytes(8192)
    assert sha((procs.tmp / "dst" / "vol.img").read_bytes()) == replica_before
    write(sock, 3)  # the mirror keeps shipping into the replica while the test export runs
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    assert (procs.tmp / "src" / "vol.img").read_bytes() == (procs.tmp / "dst" / "vol.img").read_bytes()
    p.terminate()
    p.wait(10)
    # A fresh read-only export of the same checkpoint still has the original bytes.
    out = procs.tmp / "again.img"
    vd(procs, "dst", "recover", "vol", "--at", str(cp), "--to", str(out))
    assert sha(out.read_bytes()) == want


def test_planned_failover_loses_no_write_and_the_volume_serves_writable(procs):
    _, _, srv, sock = setup(procs)
    write(sock, 5)
    res = vd(procs, "dst", "failover", "vol", check=False)
    assert res.returncode == 1 and "busy" in res.stderr  # the source still mirrors into it
    _cp, want = mark(procs)
    srv.terminate()  # planned: the source site stops after the replica has everything
    srv.wait(10)
    deadline = time.monotonic() + 20
    while True:
        res = vd(procs, "dst", "failover", "vol", "--json", check=False)
        if res.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert res.returncode == 0, res.stderr
    assert sha((procs.tmp / "dst" / "vol.img").read_bytes()) == want
    info = json.loads(vd(procs, "dst", "info", "vol", "--json").stdout)
    assert "replica" not in info and info["promoted"]["source_name"] == "vol"
    assert vd(procs, "dst", "checkpoints", "vol", check=False).returncode == 1
    _p, dsock = procs.serve("dst", "vol")  # an ordinary volume now: served writable
    h = nbd.NBD()
    h.connect_unix(dsock)
    h.pwrite(b"after failover" * 100, 0)
    h.flush()
    h.shutdown()


def test_failover_at_an_older_checkpoint_after_a_target_kill(procs):
    tgt, port, srv, sock = setup(procs)
    write(sock, 7)
    cp, want = mark(procs)
    write(sock, 8)
    mark(procs)
    write(sock, 9, 300)
    time.sleep(0.2)
    Procs.kill9(tgt)  # mid-unit perhaps: the history stays consistent
    srv.terminate()  # the source site is lost
    srv.wait(10)
    assert cp in [c["id"] for c in json.loads(vd(procs, "dst", "checkpoints", "vol", "--json").stdout)["checkpoints"]]
    procs.target("dst", port, "--history", "1h")  # restarts: rolls back a torn unit, keeps the history
    out = procs.tmp / "before.img"
    vd(procs, "dst", "recover", "vol", "--at", str(cp), "--to", str(out))
    assert sha(out.read_bytes()) == want
    res = vd(procs, "dst", "failover", "vol", "--at", str(cp), "--json")
    assert json.loads(res.stdout)["checkpoint"] == cp
    assert sha((procs.tmp / "dst" / "vol.img").read_bytes()) == want
