"""`--metrics tcp:HOST:PORT` on `vdisk serve` and `vdisk target`: scraped over HTTP from real daemons,
parsed with prometheus_client's parser; counters stay monotonic across a target restart and a
sync -> async -> sync mode switch."""
from __future__ import annotations

import os
import random
import re
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.mirror_procs import Procs

nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")
MiB = 1 << 20


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def vd(procs: Procs, *args: str, check: bool = True):
    return procs.run("--data-dir", str(procs.tmp / "src"), *args, check=check)


def serve(procs: Procs, name: str = "vol") -> tuple[str, str]:
    """`vdisk serve NAME --metrics tcp:127.0.0.1:0`: (nbd socket, metrics URL)."""
    sock = str(procs.tmp / f"src-{name}.sock")
    _, line = procs.start("--data-dir", str(procs.tmp / "src"), "serve", name, "--nbd", f"unix:{sock}",
                          "--metrics", "tcp:127.0.0.1:0", "-v", log="serve.log",
                          ready=r"serving .*metrics (http://\S+/metrics)")
    return sock, re.search(r"http://\S+/metrics", line).group(0)


def target(procs: Procs, port: int = 0) -> tuple[int, str]:
    _, line = procs.start("--data-dir", str(procs.tmp / "dst"), "target", "--listen", f"127.0.0.1:{port}",
                          "--metrics", "tcp:127.0.0.1:0", "-v", log="target.log",
                          ready=r"target listening on tcp:127\.0\.0\.1:(\d+).*metrics (http://\S+/metrics)")
    return int(re.search(r"tcp:127\.0\.0\.1:(\d+)", line).group(1)), re.search(r"http://\S+/metrics", line).group(0)


def scrape(url: str) -> dict[str, object]:
    """{family name: family}; the content type is the Prometheus text format."""
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str | None = None, **labels: str) -> float:
    f = fams[family]
    hits = [s.value for s in f.samples if (sample is None or s.name == sample)
            and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (family, labels, f.samples)
    return hits[0]


def write(sock: str, total: int, seed: int) -> None:
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_unix(sock)
    for off in range(0, total, MiB):
        h.pwrite(rng.randbytes(MiB), off)
    h.flush()
    h.shutdown()


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"not {what} in {timeout}s (last: {last})")


COUNTERS = ("vdisk_mirror_shipped_bytes", "vdisk_mirror_wire_bytes", "vdisk_mirror_reconnects")


def test_unmirrored_volume_io_counters(procs):
    vd(procs, "create", "vol", "--size", "16M")
    sock, url = serve(procs)
    write(sock, 2 * MiB, 1)
    fams = scrape(url)
    assert fams["vdisk_volume_size_bytes"].type == "gauge"
    assert value(fams, "vdisk_volume_size_bytes", volume="vol") == 16 * MiB
    assert fams["vdisk_volume_bytes"].type == "counter"
    assert value(fams, "vdisk_volume_bytes", "vdisk_volume_bytes_total", volume="vol", op="write") == 2 * MiB
    assert value(fams, "vdisk_volume_ops", "vdisk_volume_ops_total", volume="vol", op="write") >= 2
    assert value(fams, "vdisk_volume_ops", "vdisk_volume_ops_total", volume="vol", op="flush") >= 1
    assert value(fams, "vdisk_volume_errors", "vdisk_volume_errors_total", volume="vol") == 0
    assert not fams["vdisk_mirror_info"].samples  # not mirrored: no mirror series
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url.replace("/metrics", "/nope"), timeout=10)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=10)
    assert e.value.code == 405
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
        assert r.status == 200 and r.read() == b""


def test_mirror_counters_monotonic_across_reconnect_and_mode_switch(procs):
    vd(procs, "create", "vol", "--size", "16M")
    tport, turl = target(procs)
    sock, url = serve(procs)
    vd(procs, "mirror", "vol", "--to", f"127.0.0.1:{tport}", "--timeout", "2", "--wait", "--wait-timeout", "30")
    write(sock, 2 * MiB, 2)
    procs.wait_state("src", "vol", "in_sync")
    fams = scrape(url)
    assert value(fams, "vdisk_mirror_info", volume="vol", mode="sync", target=f"127.0.0.1:{tport}") == 1
    assert value(fams, "vdisk_mirror_state", volume="vol", state="in_sync") == 1
    assert value(fams, "vdisk_mirror_state", volume="vol", state="disconnected") == 0
    assert value(fams, "vdisk_mirror_connected", volume="vol") == 1
    assert value(fams, "vdisk_mirror_lag_seconds", volume="vol") == 0
    for c in COUNTERS:
        assert fams[c].type == "counter"
    first = {c: value(fams, c, volume="vol") for c in COUNTERS}
    assert first["vdisk_mirror_shipped_bytes"] >= 2 * MiB
    assert first["vdisk_mirror_wire_bytes"] >= 2 * MiB

    t = scrape(turl)
    assert value(t, "vdisk_target_replicas") == 1
    assert value(t, "vdisk_target_connected_sources") == 1
    assert value(t, "vdisk_target_applied_bytes", "vdisk_target_applied_bytes_total") >= 2 * MiB
    assert value(t, "vdisk_replica_connected", volume="vol") == 1

    def check_monotonic(prev: dict[str, float]) -> dict[str, float]:
        now = {c: value(scrape(url), c, volume="vol") for c in COUNTERS}
        assert all(now[c] >= prev[c] for c in COUNTERS), (prev, now)
        return now

    # A target restart: the link drops, the mirror reconnects (same replicator, counts go on).
    procs.kill9(procs.procs[0])
    procs.wait_state("src", "vol", "degraded", timeout=15)
    seen = check_monotonic(first)
    _, turl = target(procs, tport)  # a new process: its metrics port is new too
    procs.wait_state("src", "vol", "in_sync")
    write(sock, MiB, 3)
    procs.wait_state("src", "vol", "in_sync")
    seen = check_monotonic(seen)
    assert seen["vdisk_mirror_reconnects"] >= 1
    assert seen["vdisk_mirror_shipped_bytes"] >= first["vdisk_mirror_shipped_bytes"] + MiB

    # Mode switch: a new replicator each time; its predecessor's counts are banked.
    vd(procs, "mirror", "vol", "--mode", "async", "--checkpoint-interval", "1s")
    seen = check_monotonic(seen)
    write(sock, MiB, 4)
    procs.wait_state("src", "vol", "in_sync")
    seen = check_monotonic(seen)
    fams = scrape(url)
    assert value(fams, "vdisk_mirror_info", volume="vol", mode="async", target=f"127.0.0.1:{tport}") == 1
    assert value(fams, "vdisk_mirror_last_checkpoint_id", volume="vol") >= 1
    assert value(fams, "vdisk_mirror_buffer_bytes", volume="vol") >= 0
    tport2 = tport

    def committed_on_target():
        f = scrape(turl)
        return f if value(f, "vdisk_replica_last_checkpoint_id", volume="vol") >= 1 else None

    t = wait_for(committed_on_target, 15, "checkpoint on the target")
    assert value(t, "vdisk_replica_last_checkpoint_timestamp_seconds", volume="vol") > time.time() - 120
    vd(procs, "mirror", "vol", "--mode", "sync")
    seen = check_monotonic(seen)
    write(sock, MiB, 5)
    procs.wait_state("src", "vol", "in_sync")
    seen = check_monotonic(seen)
    assert value(scrape(url), "vdisk_mirror_info", volume="vol", mode="sync", target=f"127.0.0.1:{tport2}") == 1
    assert seen["vdisk_mirror_shipped_bytes"] >= first["vdisk_mirror_shipped_bytes"] + 3 * MiB


@pytest.mark.parametrize("spec", ["unix:/tmp/x", "tcp:", "127.0.0.1:9100", "tcp:127.0.0.1:99999", "tcp:h:port"])
def test_bad_metrics_value_is_one_line(procs, spec):
    for cmd in (("serve", "vol"), ("target", "--listen", "127.0.0.1:0")):
        res = vd(procs, *cmd, "--metrics", spec, check=False)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "metrics" in lines[0], res.stderr


def test_metrics_port_in_use_is_one_line(procs):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        vd(procs, "create", "vol", "--size", "1M")
        for cmd in (("serve", "vol"), ("target", "--listen", "127.0.0.1:0")):
            res = vd(procs, *cmd, "--metrics", f"tcp:127.0.0.1:{port}", check=False)
            assert res.returncode == 1
            assert res.stderr.strip().splitlines()[-1] == (f"vdisk: error: cannot listen for metrics on 127.0.0.1:{port}: "
                                          "Address already in use")
    finally:
        s.close()


def test_counters_are_banked_when_a_replicator_is_replaced():
    """MirrorManager.counters = retired replicators' counts + the live one's, so a swap never dips,
    and what a retiring replicator still ships after the swap is added once."""
    from types import SimpleNamespace as NS

    from vdisk.mirroring import MirrorManager

    daemon = NS(control=NS(register=lambda *a: None))
    mgr = MirrorManager(daemon)  # type: ignore[arg-type]

    def rep(acked: int, sent: int, connects: int) -> NS:
        return NS(acked_bytes=acked, outbox=NS(sent=sent), connects=connects)

    old = rep(100, 120, 2)
    mgr.mirrors["v"] = NS(rep=old)  # type: ignore[assignment]
    assert mgr.counters("v")["logical_bytes"] == 100
    new = rep(0, 0, 0)
    mgr.mirrors["v"].rep = new  # the swap and the bank happen in one step on the event loop
    seen = mgr._bank("v", old)
    assert mgr.counters("v") == {"logical_bytes": 100, "wire_bytes": 120, "connects": 2, "overflows": 0,
                                 "overflow_bytes": 0, "saved_zero": 0, "saved_dedup": 0, "saved_compression": 0,
                                 "saved_coalesced": 0}
    old.acked_bytes, old.outbox.sent = 150, 170  # the retiring one finished a send
    new.acked_bytes, new.connects = 10, 1
    mgr._bank("v", old, seen)
    c = mgr.counters("v")
    assert (c["logical_bytes"], c["wire_bytes"], c["connects"]) == (160, 170, 3)
    mgr._bank("v", new)  # mirror --stop: no live replicator, the totals stay
    del mgr.mirrors["v"]
    assert mgr.counters("v")["logical_bytes"] == 160


def test_rpo_alert_is_a_metric_raised_and_cleared(procs):
    # A paused async mirror with writes lags past --rpo: vdisk_mirror_alert{kind="rpo"} goes to 1
    # (as the status and the event log say), then back to 0 once it has caught up.
    port, _ = target(procs)
    vd(procs, "create", "vol", "--size", "16M")
    sock, url = serve(procs)
    vd(procs, "mirror", "vol", "--to", f"127.0.0.1:{port}", "--mode", "async", "--rpo", "1s")
    procs.wait_state("src", "vol", "in_sync")
    assert value(scrape(url), "vdisk_mirror_alert", volume="vol", kind="rpo") == 0
    assert value(scrape(url), "vdisk_mirror_rpo_seconds", volume="vol") == 1.0
    vd(procs, "pause", "vol")
    write(sock, 2 * MiB, seed=3)
    wait_for(lambda: value(scrape(url), "vdisk_mirror_alert", volume="vol", kind="rpo") == 1, 20, "rpo alert raised")
    vd(procs, "resume", "vol")
    procs.wait_state("src", "vol", "in_sync")
    wait_for(lambda: value(scrape(url), "vdisk_mirror_alert", volume="vol", kind="rpo") == 0, 20, "rpo alert cleared")


async def test_idle_connections_cannot_lock_scrapers_out():
    """More idle connections than scraper slots: the oldest idle ones are dropped for newcomers, so a
    real scrape is answered at once (it used to wait for the 10 s request timeout)."""
    import trio
    from prometheus_client import CollectorRegistry, Counter

    from vdisk import metrics

    reg = CollectorRegistry()
    Counter("probe", "a probe", registry=reg).inc()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(metrics.serve_metrics, metrics.parse_metrics("tcp:127.0.0.1:0"), reg)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3 * metrics.MAX_SCRAPERS)]
        await trio.sleep(0.2)
        with trio.fail_after(3):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            body = b""
            while chunk := await s.receive_some(65536):
                body += chunk
        assert body.startswith(b"HTTP/1.1 200") and b"probe_total 1.0" in body
        for c in idle:
            await c.aclose()
        await s.aclose()
        nursery.cancel_scope.cancel()
