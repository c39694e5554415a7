"""Async mirroring end to end: real `vdisk serve` and `vdisk target` daemons on loopback, libnbd as
the host and as the DR reader, a TCP relay that cuts the link, kill -9 of either daemon."""
from __future__ import annotations

import bisect
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from tests.mirror_procs import Procs

nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")
MiB = 1 << 20


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def vd(procs: Procs, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return procs.run("--data-dir", str(procs.tmp / "src"), *args, check=check)


def async_mirrored(procs: Procs, size: str = "64M", *mirror_args: str, target_args: tuple[str, ...] = (),
                   port: int | None = None):
    """A volume served and async-mirrored; (target proc, target port, serve proc, nbd socket)."""
    vd(procs, "create", "vol", "--size", size)
    tgt, tport = procs.target("dst", 0, *target_args)
    srv, sock = procs.serve("src", "vol")
    vd(procs, "mirror", "vol", "--to", f"127.0.0.1:{port or tport}", "--mode", "async", "--timeout", "3",
       "--checkpoint-interval", "1s", *mirror_args)
    return tgt, tport, srv, sock


def client(sock: str):
    h = nbd.NBD()
    h.connect_unix(sock)
    return h


def images(procs: Procs) -> tuple[bytes, bytes]:
    return (procs.tmp / "src" / "vol.img").read_bytes(), (procs.tmp / "dst" / "vol.img").read_bytes()


def write_random(sock: str, total: int, seed: int, block: int = 1 * MiB, base: int = 0) -> bytes:
    """Incompressible data, sequential from ``base``, flushed; what was written."""
    rng = random.Random(seed)
    h = client(sock)
    out = bytearray()
    for off in range(0, total, block):
        data = rng.randbytes(block)
        h.pwrite(data, base + off)
        out += data
    h.flush()
    h.shutdown()
    return bytes(out)


def wait_for(pred, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(poll)
    raise AssertionError(f"not {what} in {timeout}s (last: {last})")


class Relay:
    """A TCP relay between source and target that the test can cut (a WAN link going down)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lst = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lst.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                a, _ = self.lst.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            except OSError:
                a.close()
                continue
            with self.lock:
                self.conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(x: socket.socket, y: socket.socket) -> None:
        try:
            while True:
                data = x.recv(1 << 16)
                if not data:
                    break
                y.sendall(data)
        except OSError:
            pass
        for s in (x, y):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.lst.close()


# -- the basics ------------------------------------------------------------------------------------
def test_async_mirror_ships_converges_and_reports_lag(procs):
    _, _, _, sock = async_mirrored(procs)
    procs.wait_state("src", "vol", "in_sync")
    write_random(sock, 16 * MiB, seed=1)
    st = procs.wait_state("src", "vol", "in_sync", timeout=60)
    src, dst = images(procs)
    assert src == dst
    for key in ("mode", "state", "buffer_bytes", "journal_bytes", "dirty_bytes", "oldest_unshipped", "lag_seconds",
                "last_checkpoint", "rates", "eta_seconds", "throttle", "schedule"):
        assert key in st, key
    assert st["mode"] == "async" and st["buffer_bytes"] == 0 and st["lag_seconds"] == 0
    assert st["last_checkpoint"]["id"] > 0 and st["last_checkpoint"]["time"] > time.time() - 60
    line = vd(procs, "status", "vol").stdout
    assert "async" in line and "in_sync" in line and "buffer 0 B" in line


def test_throttle_holds_its_rate_and_a_live_change_applies(procs):
    # 4 Mbit/s = 500 kB/s: 4 MiB of incompressible data take ~8.4 s on the wire.
    _, _, _, sock = async_mirrored(procs, "64M", "--rate", "4Mbit")
    procs.wait_state("src", "vol", "in_sync")
    t0 = time.monotonic()
    write_random(sock, 4 * MiB, seed=2)
    lagging = procs.status("src", "vol")
    assert lagging["state"] in ("lagging", "catching_up") and lagging["buffer_bytes"] >= 2 * MiB
    assert lagging["throttle"]["rate"] == 500000.0
    procs.wait_state("src", "vol", "in_sync", timeout=30)
    elapsed = time.monotonic() - t0
    expected = 4 * MiB / 500000.0
    assert expected * 0.85 <= elapsed <= expected * 1.25 + 1.5, f"{elapsed:.1f}s for {expected:.1f}s expected"
    # A change applies live (no reconnect): unthrottled, 8 MiB go in well under the 17 s it would take.
    write_random(sock, 8 * MiB, seed=3, base=8 * MiB)
    assert procs.status("src", "vol")["state"] != "in_sync"
    connects = procs.status("src", "vol")["connects"]
    t1 = time.monotonic()
    out = vd(procs, "throttle", "vol", "--rate", "unlimited")
    assert "unlimited" in out.stdout
    procs.wait_state("src", "vol", "in_sync", timeout=30)
    assert time.monotonic() - t1 < 8
    assert procs.status("src", "vol")["connects"] == connects
    src, dst = images(procs)
    assert src == dst


def test_pause_keeps_journaling_and_resume_catches_up(procs):
    _, _, _, sock = async_mirrored(procs)
    procs.wait_state("src", "vol", "in_sync")
    vd(procs, "pause", "vol")
    data = write_random(sock, 2 * MiB, seed=4)
    time.sleep(2.0)
    st = procs.status("src", "vol")
    assert st["state"] == "paused" and st["buffer_bytes"] >= 2 * MiB and st["lag_seconds"] > 1.0
    assert (procs.tmp / "dst" / "vol.img").read_bytes()[:2 * MiB] != data
    vd(procs, "resume", "vol")
    procs.wait_state("src", "vol", "in_sync", timeout=30)
    src, dst = images(procs)
    assert src == dst


def test_settings_persist_and_changing_one_keeps_the_others(procs):
    _, port, srv, _ = async_mirrored(procs, "64M", "--rate", "2Mbit", "--buffer-size", "64M",
                                     "--schedule", "mon-fri 08:00-18:00 rate=1Mbit")
    vd(procs, "mirror", "vol", "--checkpoint-interval", "2s")
    section = json.loads((procs.tmp / "src" / "vol.json").read_text())["mirror"]
    assert section["rate"] == "2Mbit" and section["buffer_size"] == "64M" and section["checkpoint_interval"] == 2.0
    assert section["schedule"].startswith("mon-fri") and section["to"] == f"127.0.0.1:{port}"
    st = procs.status("src", "vol")
    assert st["throttle"]["configured"] == 250000.0 and st["checkpoint_interval"] == 2.0
    assert st["buffer_size"] == 64 * MiB
    # After a restart of the source daemon the same settings apply.
    srv.terminate()
    srv.wait(20)
    procs.serve("src", "vol")
    st = wait_for(lambda: (s := procs.status("src", "vol")) and s.get("mode") == "async" and s.get("throttle") and s,
                  20, "served")
    assert st["throttle"]["configured"] == 250000.0 and st["checkpoint_interval"] == 2.0


def test_a_scheduled_pause_ships_nothing_until_the_schedule_changes(procs):
    _, _, _, sock = async_mirrored(procs, "64M", "--schedule", "* 00:00-24:00 pause")
    data = write_random(sock, 1 * MiB, seed=5)
    time.sleep(1.5)
    st = procs.status("src", "vol")
    assert st["state"] == "scheduled" and st["schedule"]["paused"] and st["buffer_bytes"] >= MiB
    assert (procs.tmp / "dst" / "vol.img").read_bytes()[:MiB] != data
    vd(procs, "mirror", "vol", "--schedule", "none")
    procs.wait_state("src", "vol", "in_sync", timeout=30)
    src, dst = images(procs)
    assert src == dst


@pytest.mark.parametrize("args,token", [
    (["--rate", "2Mbitt"], "2Mbitt"), (["--rate", "0"], "'0'"), (["--rate", "fast"], "fast"),
    (["--schedule", "tus 08:00-18:00 pause"], "tus"), (["--schedule", "mon 25:00-26:00 pause"], "25:00"),
    (["--schedule", "mon 08:00-18:00 rate=zoom"], "zoom"), (["--ship-at", "2am"], "2am"),
    (["--ship-at", "24:61"], "24:61"), (["--buffer-size", "10Q"], "10Q"),
    (["--checkpoint-interval", "0s"], "0s")])
def test_bad_async_settings_are_one_line_errors_naming_the_token(procs, args, token):
    vd(procs, "create", "vol", "--size", "16M")
    res = vd(procs, "mirror", "vol", "--to", "127.0.0.1:9", "--mode", "async", *args, check=False)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()[-1]
    assert token in err, res.stderr
    assert "Traceback" not in res.stderr


def test_throttle_of_a_sync_mirror_is_refused_with_a_reason(procs):
    vd(procs, "create", "vol", "--size", "16M")
    vd(procs, "mirror", "vol", "--to", "127.0.0.1:9")
    res = vd(procs, "throttle", "vol", "--rate", "1Mbit", check=False)
    assert res.returncode == 1 and "sync" in res.stderr and "--mode async" in res.stderr


# -- overflow and crashes --------------------------------------------------------------------------
def test_overflow_tracks_the_dirty_map_then_catches_up_under_load(procs):
    _, _, _, sock = async_mirrored(procs, "64M", "--buffer-size", "1M", "--rate", "32Mbit")
    procs.wait_state("src", "vol", "in_sync")
    stop = threading.Event()
    seen: list[dict] = []

    def load() -> None:
        h = client(sock)
        rng = random.Random(6)
        while not stop.is_set():
            h.pwrite(rng.randbytes(4096), rng.randrange(0, 16 * MiB // 4096) * 4096)
            time.sleep(0.002)
        h.flush()
        h.shutdown()

    t = threading.Thread(target=load)
    t.start()
    try:
        write_random(sock, 8 * MiB, seed=7, base=32 * MiB)
        for _ in range(30):
            seen.append(procs.status("src", "vol"))
            time.sleep(0.1)
    finally:
        stop.set()
        t.join()
    assert any(s["overflows"] >= 1 for s in seen) and any(s["dirty_bytes"] > 0 for s in seen)
    assert any(s["state"] == "catching_up" for s in seen) or seen[-1]["chunk_bytes_sent"] > 0
    procs.wait_state("src", "vol", "in_sync", timeout=90)
    src, dst = images(procs)
    assert src == dst


def test_source_killed_while_shipping_restarts_and_loses_no_acknowledged_write(procs):
    _, _, srv, sock = async_mirrored(procs, "64M", "--rate", "16Mbit")
    procs.wait_state("src", "vol", "in_sync")
    data = write_random(sock, 8 * MiB, seed=8)  # acknowledged (and flushed) before the kill
    assert procs.status("src", "vol")["buffer_bytes"] > 0
    Procs.kill9(srv)
    procs.serve("src", "vol")
    vd(procs, "throttle", "vol", "--rate", "unlimited")
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    src, dst = images(procs)
    assert src[:8 * MiB] == data and src == dst


def test_target_killed_mid_unit_restarts_at_a_checkpoint_and_converges(procs):
    tgt, port, _, sock = async_mirrored(procs, "64M", target_args=("--nbd", f"unix:{procs.tmp / 'rep.sock'}"))
    procs.wait_state("src", "vol", "in_sync")
    write_random(sock, 24 * MiB, seed=9)
    time.sleep(0.3)
    Procs.kill9(tgt)
    procs.target("dst", port, "--nbd", f"unix:{procs.tmp / 'rep.sock'}")
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    src, dst = images(procs)
    assert src == dst


# -- write-order fidelity ----------------------------------------------------------------------------
BLOCKS = 256  # 4 KiB each: the first MiB of the volume, read by the DR side in one NBD request


class History:
    """Single-threaded QD1 writes, event i writes block order[i] with value i: the source passes
    through exactly the states "after event k"; a replica snapshot must equal one of them."""

    def __init__(self) -> None:
        self.writes: list[list[int]] = [[] for _ in range(BLOCKS)]  # block -> event indices
        self.lock = threading.Lock()
        self.done = 0

    def record(self, block: int, i: int) -> None:
        with self.lock:
            self.writes[block].append(i)

    def check(self, snap: bytes) -> str | None:
        vals = [struct.unpack_from(">Q", snap, b * 4096)[0] for b in range(BLOCKS)]
        for b in range(BLOCKS):
            if snap[b * 4096:(b + 1) * 4096] != struct.pack(">Q", vals[b]) * 512:
                return f"block {b} is torn"
        k = max(vals)
        with self.lock:
            for b in range(BLOCKS):
                w = self.writes[b]
                pos = bisect.bisect_right(w, k)
                expect = w[pos - 1] if pos else 0
                if vals[b] != expect:
                    return f"block {b} holds event {vals[b]} but after event {k} it held {expect}"
        return None


def test_replica_is_always_a_checkpoint_state_through_link_cuts_and_target_kills(procs):
    rep_sock = str(procs.tmp / "rep.sock")
    vd(procs, "create", "vol", "--size", "16M")
    tgt, tport = procs.target("dst", 0, "--nbd", f"unix:{rep_sock}")
    relay = Relay(tport)
    _srv, sock = procs.serve("src", "vol")
    vd(procs, "mirror", "vol", "--to", f"127.0.0.1:{relay.addr}", "--mode", "async", "--timeout", "2",
       "--checkpoint-interval", "0.2s", "--rate", "40Mbit")
    hist = History()
    stop = threading.Event()
    errors: list[str] = []
    samples = [0]

    def writer() -> None:
        h = client(sock)
        rng = random.Random(11)
        i = 0
        while not stop.is_set():
            i += 1
            b = rng.randrange(BLOCKS)
            hist.record(b, i)
            h.pwrite(struct.pack(">Q", i) * 512, b * 4096)
            if rng.random() < 0.02:
                h.flush()
        h.flush()
        h.shutdown()

    def sampler() -> None:
        h = None
        while not stop.is_set():
            try:
                if h is None:
                    h = client(rep_sock)
                snap = h.pread(BLOCKS * 4096, 0)  # one request: one atomic view at the target
            except (nbd.Error, OSError):
                h = None
                time.sleep(0.05)
                continue
            why = hist.check(snap)
            samples[0] += 1
            if why:
                errors.append(why)
            time.sleep(0.02)

    threads = [threading.Thread(target=writer), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    rng = random.Random(12)
    try:
        for step in range(6):
            time.sleep(rng.uniform(0.5, 1.5))
            if step == 3:
                Procs.kill9(tgt)
                time.sleep(0.3)
                tgt, _ = procs.target("dst", tport, "--nbd", f"unix:{rep_sock}")
            else:
                relay.cut()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    relay.close()
    assert not errors, errors[:5]
    assert samples[0] > 20
    src, dst = images(procs)
    assert src == dst
    assert hist.check(dst[:BLOCKS * 4096]) is None


# -- switching modes ---------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("fio") is None and not os.environ.get("CI"), reason="fio is not installed")
def test_live_switch_sync_async_sync_under_fio_then_verify_is_clean(procs):
    vd(procs, "create", "vol", "--size", "64M")
    _, port = procs.target("dst", 0)
    _, sock = procs.serve("src", "vol")
    vd(procs, "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "sync", "--timeout", "3")
    procs.wait_state("src", "vol", "in_sync")
    fio = subprocess.Popen(
        ["fio", "--name=switch", "--ioengine=nbd", f"--uri=nbd+unix:///vol?socket={sock}", "--rw=randwrite",
         "--bsrange=4k-128k", "--size=32M", "--iodepth=16", "--time_based", "--runtime=8",
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=0", "--output-format=terse"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=procs.tmp)
    try:
        time.sleep(2)
        vd(procs, "mirror", "vol", "--mode", "async")
        assert procs.status("src", "vol")["mode"] == "async"
        time.sleep(2.5)
        vd(procs, "mirror", "vol", "--mode", "sync")
        assert procs.status("src", "vol")["mode"] == "sync"
        time.sleep(1.5)
        vd(procs, "mirror", "vol", "--mode", "async")
        out, _ = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
    assert fio.returncode == 0, out
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    vd(procs, "mirror", "vol", "--mode", "sync")
    procs.wait_state("src", "vol", "in_sync", timeout=60)
    res = vd(procs, "verify", "vol", "--json")
    assert json.loads(res.stdout)["differing_bytes"] == 0
    src, dst = images(procs)
    assert src == dst
