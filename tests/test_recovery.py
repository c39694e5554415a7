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
    # in_sync: the journal is empty, so the checkpoint cut at the host's flush is committed.
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


def test_planned_failover_demotes_the_source_and_loses_no_write(procs):
    import threading

    _, _, srv, sock = setup(procs)
    write(sock, 5)
    res = vd(procs, "dst", "failover", "vol", "--no-demote", check=False)
    assert res.returncode == 1 and "busy" in res.stderr  # the source still mirrors into it
    acked: list[tuple[int, bytes]] = []
    refused: list[str] = []
    stop = threading.Event()

    def writer() -> None:  # the host keeps writing during the failover
        h = nbd.NBD()
        h.connect_unix(sock)
        rng = random.Random(9)
        while not stop.is_set():
            off, data = rng.randrange(SIZE // 4096) * 4096, rng.randbytes(4096)
            try:
                h.pwrite(data, off)
            except nbd.Error as e:
                refused.append(str(e))
                break
            acked.append((off, data))
        h.shutdown()

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)
    try:
        res = vd(procs, "dst", "failover", "vol", "--json")
    finally:
        time.sleep(0.3)
        stop.set()
        t.join(20)
    assert json.loads(res.stdout)["checkpoint"] > 0
    assert refused and acked  # writes were going on, and the source refused them once fenced
    promoted = (procs.tmp / "dst" / "vol.img").read_bytes()
    assert promoted == (procs.tmp / "src" / "vol.img").read_bytes()  # no acknowledged write lost
    last = {}
    for off, data in acked:
        last[off] = data
    assert all(promoted[o:o + 4096] == d for o, d in last.items())
    st = procs.status("src", "vol")
    assert st["state"] == "demoted"
    info = json.loads(vd(procs, "dst", "info", "vol", "--json").stdout)
    assert "replica" not in info and info["promoted"]["planned"] and info["promoted"]["source_name"] == "vol"
    assert vd(procs, "dst", "checkpoints", "vol", check=False).returncode == 1
    _p, dsock = procs.serve("dst", "vol")  # an ordinary volume now: served writable
    h = nbd.NBD()
    h.connect_unix(dsock)
    h.pwrite(b"after failover" * 100, 0)
    h.flush()
    h.shutdown()
    # The old source stays demoted: not served writable again, until failback makes it the replica.
    srv.terminate()
    srv.wait(10)
    res = vd(procs, "src", "serve", "vol", "--nbd", f"unix:{procs.tmp / 'again.sock'}", check=False)
    assert res.returncode == 1 and "demoted by a planned failover" in res.stderr
    out = json.loads(vd(procs, "src", "failback", "vol", "--json").stdout)
    assert out["discarded_bytes"] == 0


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


# -- failback ---------------------------------------------------------------------------------------
class CountingRelay:
    """A TCP relay that counts the bytes each way: what a mirror costs on the WAN."""

    def __init__(self, port: int) -> None:
        import socket
        import threading

        self.port, self.sent, self.lock = port, 0, threading.Lock()
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lst.getsockname()[1]
        self.socks: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                a, _ = self.lst.accept()
                b = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError:
                return
            self.socks += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    def _pump(self, x, y) -> None:
        try:
            while data := x.recv(1 << 16):
                y.sendall(data)
                with self.lock:
                    self.sent += len(data)
        except OSError:
            pass
        for s in (x, y):
            try:
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.lst.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


def fill(sock: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_unix(sock)
    for off in range(0, size, MiB):
        h.pwrite(rng.randbytes(MiB), off)
    h.flush()
    h.shutdown()


def change_one_percent(sock: str, size: int, seed: int) -> None:
    """1 % of the disk rewritten in 64 KiB extents at random places."""
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_unix(sock)
    for _ in range(size // 100 // (64 << 10)):
        h.pwrite(rng.randbytes(64 << 10), rng.randrange(size // (64 << 10)) * (64 << 10))
    h.flush()
    h.shutdown()


def wait_ok(procs: Procs, data: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout
    while True:
        res = vd(procs, data, *args, check=False)
        if res.returncode == 0 or time.monotonic() > deadline:
            assert res.returncode == 0, res.stderr
            return res
        time.sleep(0.2)


def test_unplanned_failover_then_failback_sends_only_the_difference_and_switches_back(procs):
    size = 32 * MiB
    vd(procs, "src", "create", "vol", "--size", str(size))
    _tgt, port = procs.target("dst", 0, "--history", "1h", "--timeout", "2s")
    srv, sock = procs.serve("src", "vol")
    vd(procs, "src", "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "async", "--timeout", "3",
       "--checkpoint-interval", "1s")
    fill(sock, size, 1)
    mark(procs)
    # The source site goes down (a clean stop: after a crash its activity log's extents count as
    # possibly unshipped, and failback then asks for --discard-local, see the split-brain test).
    srv.terminate()
    srv.wait(10)
    wait_ok(procs, "dst", "failover", "vol")  # once the target has let go of the replica
    dsrv, dsock = procs.serve("dst", "vol")
    change_one_percent(dsock, size, 2)
    # The old source comes back: its mirror is refused (split brain: its replica was promoted).
    srv, sock = procs.serve("src", "vol")
    st = procs.wait_state("src", "vol", "split_brain")
    assert "promoted by a failover" in st["last_error"]
    srv.terminate()
    srv.wait(10)
    out = json.loads(vd(procs, "src", "failback", "vol", "--json").stdout)
    assert out["awaiting_failback"] and out["discarded_bytes"] == 0
    _atgt, aport = procs.target("src", 0, "--history", "1h", "--timeout", "2s")
    relay = CountingRelay(aport)
    try:
        vd(procs, "dst", "mirror", "vol", "--to", f"127.0.0.1:{relay.addr}", "--mode", "async", "--timeout", "3",
           "--checkpoint-interval", "1s")
        procs.wait_state("dst", "vol", "in_sync", timeout=60)
        wire = relay.sent
    finally:
        relay.close()
    assert (procs.tmp / "src" / "vol.img").read_bytes() == (procs.tmp / "dst" / "vol.img").read_bytes()
    assert wire <= 0.015 * size, f"failback sent {wire} bytes for a 1 % change of {size}"
    print(f"failback wire bytes: {wire} ({wire / size:.2%} of the disk)")
    # Planned switch back: the DR host stops, the old site is promoted, DR becomes its replica.
    dsrv.terminate()
    dsrv.wait(10)
    want = sha((procs.tmp / "dst" / "vol.img").read_bytes())
    wait_ok(procs, "src", "failover", "vol")
    assert sha((procs.tmp / "src" / "vol.img").read_bytes()) == want
    vd(procs, "dst", "failback", "vol")
    srv, sock = procs.serve("src", "vol")
    vd(procs, "src", "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "async", "--timeout", "3",
       "--checkpoint-interval", "1s")
    write(sock, 11)
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    assert (procs.tmp / "src" / "vol.img").read_bytes() == (procs.tmp / "dst" / "vol.img").read_bytes()
    info = json.loads(vd(procs, "dst", "info", "vol", "--json").stdout)
    assert info["replica"]["source_uuid"] == json.loads(vd(procs, "src", "info", "vol", "--json").stdout)["uuid"]


def test_split_brain_failback_needs_discard_local_and_keeps_the_discarded_side(procs):
    vd(procs, "src", "create", "vol", "--size", str(SIZE))
    _tgt, port = procs.target("dst", 0, "--history", "1h", "--timeout", "2s")
    srv, sock = procs.serve("src", "vol")
    vd(procs, "src", "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "async", "--timeout", "3",
       "--checkpoint-interval", "1s")
    write(sock, 1)
    mark(procs)
    Procs.kill9(srv)
    wait_ok(procs, "dst", "failover", "vol")
    dsrv, dsock = procs.serve("dst", "vol")
    write(dsock, 2)
    srv, sock = procs.serve("src", "vol")
    write(sock, 3)  # the old source is written after the split too
    procs.wait_state("src", "vol", "split_brain")
    srv.terminate()
    srv.wait(10)
    discarded = sha((procs.tmp / "src" / "vol.img").read_bytes())
    res = vd(procs, "src", "failback", "vol", check=False)
    assert res.returncode == 1 and "split brain" in res.stderr and "--discard-local" in res.stderr
    assert "replica" not in json.loads(vd(procs, "src", "info", "vol", "--json").stdout)  # nothing changed
    vd(procs, "src", "failback", "vol", "--discard-local")
    procs.target("src", 0, "--history", "1h")
    aport = int((procs.tmp / "target.log").read_text().rsplit("target listening on tcp:127.0.0.1:", 1)[1].split(",")[0])
    vd(procs, "dst", "mirror", "vol", "--to", f"127.0.0.1:{aport}", "--mode", "async", "--timeout", "3",
       "--checkpoint-interval", "1s")
    procs.wait_state("dst", "vol", "in_sync", timeout=60)
    assert (procs.tmp / "src" / "vol.img").read_bytes() == (procs.tmp / "dst" / "vol.img").read_bytes()
    cps = json.loads(vd(procs, "src", "checkpoints", "vol", "--json").stdout)["checkpoints"]
    assert cps[0]["id"] == 0  # the discarded side, kept
    out = procs.tmp / "discarded.img"
    vd(procs, "src", "recover", "vol", "--at", "0", "--to", str(out))
    assert sha(out.read_bytes()) == discarded
    dsrv.terminate()


def test_retention_trims_old_checkpoints_but_not_one_a_recovery_reads(procs):
    _tgt, _port, _srv, sock = setup(procs, "--history", "3s")  # the last --history wins: 3 s

    def ids() -> list[int]:
        return [c["id"] for c in json.loads(vd(procs, "dst", "checkpoints", "vol", "--json").stdout)["checkpoints"]]

    for seed in range(3):
        write(sock, seed, 5)
        mark(procs)
    pinned = ids()[0]
    rsock = str(procs.tmp / "pin.sock")
    p, _ = procs.start("--data-dir", str(procs.tmp / "dst"), "recover", "vol", "--at", str(pinned), "--nbd",
                       f"unix:{rsock}", log="pin.log", ready="recovering vol")
    want = read_export(f"nbd+unix:///vol?socket={rsock}")
    for seed in range(10, 14):
        time.sleep(1)  # the pinned checkpoint goes past the 3 s window
        write(sock, seed, 5)
        mark(procs)
    cps = json.loads(vd(procs, "dst", "checkpoints", "vol", "--json").stdout)["checkpoints"]
    assert cps[0]["id"] == pinned  # kept for the recovery
    assert read_export(f"nbd+unix:///vol?socket={rsock}") == want
    p.terminate()
    p.wait(10)
    write(sock, 20, 5)
    mark(procs)
    cps = json.loads(vd(procs, "dst", "checkpoints", "vol", "--json").stdout)["checkpoints"]
    assert cps[0]["id"] > pinned
    assert cps[0]["time_ns"] >= time.time_ns() - 8 * 10**9  # window 3 s, plus a commit or two of slack


def test_giving_up_a_promotion_needs_discard_local_and_the_old_source_takes_the_copy_back(procs):
    _tgt, _port, srv, sock = setup(procs)
    write(sock, 1)
    mark(procs)
    srv.terminate()
    srv.wait(10)
    wait_ok(procs, "dst", "failover", "vol")
    dsrv, dsock = procs.serve("dst", "vol")
    write(dsock, 2)  # the DR copy is written after the failover...
    dsrv.terminate()
    dsrv.wait(10)
    promoted = sha((procs.tmp / "dst" / "vol.img").read_bytes())
    # ...but the operator keeps the old site: the DR copy goes back to being its replica.
    res = vd(procs, "dst", "failback", "vol", check=False)
    assert res.returncode == 1 and "served writable after its failover" in res.stderr
    vd(procs, "dst", "failback", "vol", "--discard-local")
    srv, sock = procs.serve("src", "vol")  # its mirror to the DR target resumes: adopted, compared
    write(sock, 3)
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    assert (procs.tmp / "src" / "vol.img").read_bytes() == (procs.tmp / "dst" / "vol.img").read_bytes()
    out = procs.tmp / "dr-discarded.img"
    vd(procs, "dst", "recover", "vol", "--at", "0", "--to", str(out))
    assert sha(out.read_bytes()) == promoted  # the discarded DR copy, kept as checkpoint 0


def test_sync_mirror_checkpoints_at_host_flushes_and_survive_a_target_kill(procs):
    vd(procs, "src", "create", "vol", "--size", str(SIZE))
    tgt, port = procs.target("dst", 0, "--history", "1h")
    _srv, sock = procs.serve("src", "vol")
    vd(procs, "src", "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "sync", "--timeout", "3")
    procs.wait_state("src", "vol", "in_sync")

    def latest() -> int:
        cps = json.loads(vd(procs, "dst", "checkpoints", "vol", "--json").stdout)["checkpoints"]
        return cps[-1]["id"] if cps else 0

    marks: list[tuple[int, str]] = []
    for seed in range(3):
        time.sleep(1.1)  # at most one sync checkpoint a second
        write(sock, seed)  # ends with a flush: the sync source cuts a checkpoint after it
        prev = marks[-1][0] if marks else 0
        deadline = time.monotonic() + 10
        while (cp := latest()) <= prev and time.monotonic() < deadline:
            time.sleep(0.05)
        marks.append((cp, sha((procs.tmp / "src" / "vol.img").read_bytes())))
    assert len({cp for cp, _ in marks}) == 3 and all(cp > 0 for cp, _ in marks)
    write(sock, 50, 100)
    Procs.kill9(tgt)  # mid-unit: the acknowledged sync writes stay (never rolled back)
    procs.target("dst", port, "--history", "1h")
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    write(sock, 51)
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    assert (procs.tmp / "src" / "vol.img").read_bytes() == (procs.tmp / "dst" / "vol.img").read_bytes()
    for cp, want in marks:
        out = procs.tmp / f"sync{cp}.img"
        vd(procs, "dst", "recover", "vol", "--at", str(cp), "--to", str(out))
        assert sha(out.read_bytes()) == want, cp
