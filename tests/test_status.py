"""`vdisk status` as an operator uses it, against real daemons: every volume served or not, the
replicas of a target, the JSON snapshot's keys, `--check` exit codes, RPO alerts raised and cleared,
the control API's version, and a `mirror --wait` that gives up at once on a wrong key."""
from __future__ import annotations

import json
import re
import time

import pytest

from tests.mirror_procs import Procs
from tests.test_mirror_async import async_mirrored, vd, wait_for, write_random
from vdisk.control import VERSION, call, control_address

MiB = 1 << 20
VOLUME_KEYS = {"name", "size", "served", "mirror"}
MIRROR_KEYS = {"mode", "state", "link", "rpo_seconds", "alerts", "resync"}
REPLICA_KEYS = {"name", "source", "connected", "connected_since", "last_checkpoint", "lag_seconds"}


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


def snap(procs: Procs, data: str = "src", *names: str) -> dict:
    return json.loads(procs.run("--data-dir", str(procs.tmp / data), "status", *names, "--json").stdout)


def check(procs: Procs, *args: str) -> tuple[int, str]:
    res = procs.run("--data-dir", str(procs.tmp / "src"), "status", "--check", *args, check=False)
    return res.returncode, res.stdout.strip()


def test_status_without_names_shows_every_volume_and_the_targets_replicas(procs):
    tgt, _, _, sock = async_mirrored(procs, "16M")
    vd(procs, "create", "idle", "--size", "8M")  # never served
    procs.wait_state("src", "vol", "in_sync")
    write_random(sock, 1 * MiB, seed=2)
    procs.wait_state("src", "vol", "in_sync")
    s = snap(procs)
    assert s["version"] == VERSION and isinstance(s["time"], float) and s["data_dir"].endswith("src")
    assert set(s) >= {"version", "time", "data_dir", "volumes", "replicas", "events"}
    by = {v["name"]: v for v in s["volumes"]}
    assert set(by) == {"vol", "idle"} and all(VOLUME_KEYS <= set(v) for v in by.values())
    assert by["idle"]["served"] is False and by["idle"]["mirror"] is None
    m = by["vol"]["mirror"]
    assert by["vol"]["served"] and MIRROR_KEYS <= set(m) and m["state"] == "in_sync"
    assert m["link"]["connected"] is True and m["link"]["since"] and m["link"]["reason"] is None
    assert {"connected", "since", "rtt_ms", "reason"} <= set(m["link"])
    assert any(e["volume"] == "vol" and "connected" in e["message"] for e in s["events"])
    assert all({"time", "volume", "level", "message"} <= set(e) for e in s["events"])
    text = vd(procs, "status").stdout.splitlines()
    assert text[0].startswith("idle  not mirrored") and text[1].startswith("vol  async  in_sync  buffer 0 B")

    # The target's data directory: its replicas, asked of the running target...
    d = snap(procs, "dst")
    assert d["volumes"] == [] and len(d["replicas"]) == 1
    r = d["replicas"][0]
    assert REPLICA_KEYS <= set(r) and r["name"] == "vol" and r["connected"] and r["connected_since"]
    assert r["source"]["name"] == "vol" and r["source"]["uuid"] == s["volumes"][1]["uuid"]
    assert r["source"]["addr"].startswith("127.0.0.1:") and r["last_checkpoint"]["id"] > 0
    assert any(e["volume"] == "vol" and e["message"].startswith("source 127.0.0.1:") and "connected (async)"
               in e["message"] for e in d["events"])
    one = snap(procs, "dst", "vol")  # a replica by name: the target's record of it
    assert one["volumes"] == [] and one["replicas"][0]["name"] == "vol" and one["connected"] is True
    plain = procs.run("--data-dir", str(procs.tmp / "dst"), "status").stdout
    assert "vol  replica of 'vol' from 127.0.0.1:" in plain and "connected since" in plain
    # ... and from the metadata once it is gone.
    Procs.kill9(tgt)
    r = snap(procs, "dst")["replicas"][0]
    assert not r["connected"] and r["connected_since"] is None and r["last_checkpoint"]["id"] > 0


def test_status_of_one_name_keeps_the_volume_keys_at_the_top(procs):
    vd(procs, "create", "vol", "--size", "8M")
    vd(procs, "mirror", "vol", "--to", "127.0.0.1:9", "--rpo", "30s")
    s = snap(procs, "src", "vol")
    assert s["name"] == "vol" and s["served"] is False and s["mirror"]["state"] == "disconnected"
    assert s["mirror"]["link"]["reason"] == "not served" and s["mirror"]["rpo_seconds"] == 30
    assert s["volumes"][0]["name"] == "vol"
    assert "disconnected: not served" in vd(procs, "status", "vol").stdout
    assert check(procs)[0] == 2 and "vol disconnected (not served)" in check(procs)[1]


def test_check_exit_codes_ok_lag_past_rpo_stalled_and_disconnected(procs):
    tgt, _, _, sock = async_mirrored(procs, "16M")
    procs.wait_state("src", "vol", "in_sync")
    assert check(procs) == (0, "VDISK OK - 1 mirror ok")
    vd(procs, "pause", "vol")
    write_random(sock, 1 * MiB, seed=3)
    wait_for(lambda: (procs.status("src", "vol") or {}).get("lag_seconds", 0) > 1.5, 10, "lagging")
    code, text = check(procs, "--rpo", "1s")
    assert code == 2 and "vol lag" in text and "past the RPO of 1 s" in text, text
    time.sleep(2.5)  # the daemon samples progress once a second
    code, text = check(procs, "--rpo", "1h", "--stall", "2s")
    assert code == 1 and text.startswith("VDISK WARNING - vol no progress for") and "(paused)" in text, text
    vd(procs, "resume", "vol")
    procs.wait_state("src", "vol", "in_sync")
    Procs.kill9(tgt)
    procs.wait_state("src", "vol", "disconnected")
    code, text = check(procs)
    assert code == 2 and text.startswith("VDISK CRITICAL - vol disconnected"), text


def test_rpo_alert_is_raised_and_cleared(procs):
    _, _, _, sock = async_mirrored(procs, "16M")
    before = procs.wait_state("src", "vol", "in_sync")
    assert "rpo 1s" in vd(procs, "mirror", "vol", "--rpo", "1s").stdout  # live, without a reconnect
    after = procs.status("src", "vol")
    assert after["rpo_seconds"] == 1 and after["connects"] == before["connects"] == 1
    vd(procs, "pause", "vol")
    write_random(sock, 1 * MiB, seed=4)
    m = wait_for(lambda: (st := procs.status("src", "vol")) and any(a["kind"] == "rpo" for a in st["alerts"]) and st,
                 15, "an rpo alert")
    assert m["rpo_seconds"] == 1 and "past the RPO of 1 s" in m["alerts"][0]["message"]
    assert "ALERT lag" in vd(procs, "status", "vol").stdout
    vd(procs, "resume", "vol")
    wait_for(lambda: not procs.status("src", "vol")["alerts"], 15, "the alert cleared")
    messages = [e["message"] for e in snap(procs, "src", "vol")["events"]]
    assert any(t.startswith("alert raised: lag") for t in messages) and "alert cleared: rpo" in messages
    log = (procs.tmp / "serve.log").read_text()
    assert "volume vol: alert raised: lag" in log and "volume vol: alert cleared: rpo" in log


def test_mirror_wait_with_a_wrong_key_fails_fast(procs):
    for name, key in (("right", "a-long-enough-key-0123456789\n"), ("wrong", "another-key-that-is-long-enough\n")):
        (procs.tmp / name).write_text(key)
        (procs.tmp / name).chmod(0o600)
    vd(procs, "create", "vol", "--size", "8M")
    _, port = procs.target("dst", 0, "--psk-file", str(procs.tmp / "right"))
    procs.serve("src", "vol")
    t0 = time.monotonic()
    res = vd(procs, "mirror", "vol", "--to", f"127.0.0.1:{port}", "--psk-file", str(procs.tmp / "wrong"),
             "--wait", "--json", check=False)
    assert res.returncode != 0 and time.monotonic() - t0 < 15
    assert "cannot sync: " in res.stderr and "wrong pre-shared key" in res.stderr
    out = json.loads(res.stdout)
    assert out["in_sync"] is False and out["mirror"]["link"]["reason"] == "authentication failed"


def test_mirror_wait_on_an_unserved_volume_is_an_error(procs):
    vd(procs, "create", "vol", "--size", "8M")
    res = vd(procs, "mirror", "vol", "--to", "127.0.0.1:9", "--wait", check=False)
    assert res.returncode == 1 and "is not served" in res.stderr


def test_both_daemons_answer_hello_with_the_protocol_version_and_the_link_is_timed(procs):
    tgt, _, srv, _ = async_mirrored(procs, "8M")
    for data, p, role in (("src", srv, "serve"), ("dst", tgt, "target")):
        reply = call(control_address(procs.tmp / data, p.pid), "hello")
        assert reply["version"] == VERSION and reply["role"] == role and "status" in reply["commands"]
    # An idle link is timed by its keep-alives.
    rtt = wait_for(lambda: procs.status("src", "vol")["link"]["rtt_ms"], 15, "a round trip measured")
    assert 0 < rtt < 1000


def test_a_listen_error_names_the_address(procs):
    vd(procs, "create", "vol", "--size", "1M")
    res = vd(procs, "serve", "vol", "--nbd", f"unix:{procs.tmp}/missing/x.sock", check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == f"vdisk: error: cannot listen on unix:{procs.tmp}/missing/x.sock: No such file or directory"


def test_a_failing_reconnect_is_logged_once_with_a_timestamp(procs):
    vd(procs, "create", "vol", "--size", "8M")
    procs.serve("src", "vol")
    vd(procs, "mirror", "vol", "--to", "127.0.0.1:9")  # nothing listens there: refused, retried with backoff
    m = wait_for(lambda: (st := procs.status("src", "vol")) and st.get("connects") == 0 and st["last_error"] and st,
                 10, "a failed connect")
    assert m["link"]["reason"].startswith("connecting (") and m["link"]["connected"] is False
    time.sleep(3)  # several retries
    lines = [ln for ln in (procs.tmp / "serve.log").read_text().splitlines() if "cannot connect to 127.0.0.1:9" in ln]
    assert len(lines) == 1, lines
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} vdisk serve: WARNING mirror vol -> ", lines[0]), lines
    code, text = check(procs)
    assert code == 2 and text.startswith("VDISK CRITICAL - vol disconnected (connecting ("), text
