"""The mirror watch and the status verdicts, fed fixed snapshots and clock values (no daemon)."""
from __future__ import annotations

import logging

from vdisk.events import EventRing, MirrorWatch, link_reason
from vdisk.status import CRITICAL, OK, UNKNOWN, WARNING, check, line

log = logging.getLogger("test.events")


def async_st(state: str = "in_sync", buffer: int = 0, lag: float = 0.0, shipped: int = 1, error: str | None = None,
             **extra) -> dict:
    return {"mode": "async", "state": state, "target": "h:1", "buffer_bytes": buffer, "lag_seconds": lag,
            "shipped_seq": shipped, "last_checkpoint": {"id": shipped, "time": None}, "last_error": error,
            "in_flight": 0, **extra}


def test_link_reasons_name_what_an_operator_must_know():
    assert link_reason("in_sync", None) is None
    assert link_reason("disconnected", None) == "connecting"
    assert link_reason("disconnected", "not served") == "not served"
    assert link_reason("disconnected", "peer: authentication failed: wrong pre-shared key") == "authentication failed"
    assert link_reason("split_brain", "split brain: replica 'vol' was written") == "split brain"
    assert link_reason("disconnected", "peer: size mismatch: source volume is 1 bytes") == "size mismatch"
    assert link_reason("disconnected", "peer: replica 'vol' is busy") == "connecting (peer: replica 'vol' is busy)"
    assert link_reason("disconnected", "[Errno 111] Connection refused") == "connecting ([Errno 111] Connection refused)"


def test_rpo_alert_is_raised_once_and_cleared_with_events():
    ring = EventRing(log)
    w = MirrorWatch("vol", ring)
    w.update(async_st(), 100.0, rpo=5)
    w.update(async_st("lagging", 1 << 20, lag=3, shipped=2), 101.0, rpo=5)
    assert not w.alerts
    w.update(async_st("lagging", 1 << 20, lag=6, shipped=3), 102.0, rpo=5)
    w.update(async_st("lagging", 1 << 20, lag=7, shipped=4), 103.0, rpo=5)
    assert list(w.alerts) == ["rpo"] and w.alerts["rpo"]["since"] == 102.0
    assert "lag 7.0 s is past the RPO of 5 s" in w.alerts["rpo"]["message"]
    w.update(async_st(), 104.0, rpo=5)
    assert not w.alerts
    messages = [e["message"] for e in ring.list()]
    assert messages == ["connected to h:1", "in sync", "alert raised: lag 6.0 s is past the RPO of 5 s",
                        "alert cleared: rpo"]  # lagging and back is no news


def test_stall_alert_needs_pending_data_and_no_progress():
    w = MirrorWatch("vol", EventRing(log))
    w.update(async_st("paused", 4096, lag=1, shipped=5), 10.0, rpo=None, stall=3)
    w.update(async_st("paused", 4096, lag=2, shipped=5), 12.0, rpo=None, stall=3)
    assert not w.alerts
    w.update(async_st("paused", 4096, lag=4, shipped=5), 13.5, rpo=None, stall=3)
    assert list(w.alerts) == ["stall"]
    w.update(async_st("lagging", 2048, lag=1, shipped=6), 14.0, rpo=None, stall=3)  # it moves again
    assert not w.alerts and w.last_progress == 14.0


def test_a_disconnect_is_one_event_with_its_reason_and_the_link_since():
    ring = EventRing(log)
    w = MirrorWatch("vol", ring)
    w.update(async_st(), 1.0, rpo=None)
    for t in (2.0, 3.0):
        w.update(async_st("disconnected", error="peer: authentication failed: wrong key"), t, rpo=None)
    out = w.annotate(async_st("disconnected", error="peer: authentication failed: wrong key"), None)
    assert out["link"] == {"connected": False, "since": 2.0, "rtt_ms": None, "reason": "authentication failed"}
    assert [e["message"] for e in ring.list()].count("disconnected from h:1: authentication failed") == 1
    assert "disconnected" in w.alerts


def test_resync_progress_has_bytes_rate_and_eta():
    w = MirrorWatch("vol", EventRing(log))
    st = {"mode": "sync", "state": "syncing", "target": "h:1", "dirty_bytes": 100 << 20, "acked_seq": 1}
    w.update(st, 0.0, rpo=None)
    w.update({**st, "dirty_bytes": 90 << 20, "acked_seq": 2}, 1.0, rpo=None)
    r = w.annotate({**st, "dirty_bytes": 90 << 20}, None)["resync"]
    assert r["total_bytes"] == 100 << 20 and r["done_bytes"] == 10 << 20
    assert r["rate"] == 10 << 20 and r["eta_seconds"] == 9.0


def snapshot(mirror: dict | None, now: float = 1000.0) -> dict:
    return {"version": 1, "time": now, "data_dir": "/d", "replicas": [], "events": [],
            "volumes": [{"name": "vol", "size": 1, "served": True, "mirror": mirror}]}


def test_check_verdicts():
    ok = {**async_st(), "link": {"connected": True}, "last_progress": 999.0}
    assert check(snapshot(ok), None, 120) == (OK, "1 mirror ok")
    assert check(snapshot(None), None, 120) == (OK, "0 mirrors ok")
    lag = {**ok, "state": "lagging", "lag_seconds": 90.0, "buffer_bytes": 1, "rpo_seconds": 60}
    assert check(snapshot(lag), None, 120) == (CRITICAL, "vol lag 90.0 s past the RPO of 60 s")
    assert check(snapshot(lag), 100, 120)[0] == OK
    stalled = {**lag, "last_progress": 800.0}
    assert check(snapshot(stalled), 100, 120) == (WARNING, "vol no progress for 200 s with 1 B pending")
    down = {**ok, "state": "disconnected", "link": {"connected": False, "reason": "not served"}}
    assert check(snapshot(down), None, 120) == (CRITICAL, "vol disconnected (not served)")
    mute = {**down, "last_error": "not served (the daemon does not answer: timed out)"}
    assert check(snapshot(mute), None, 120) == (UNKNOWN, "vol: not served (the daemon does not answer: timed out)")
    both = snapshot(mute)
    both["volumes"].append({"name": "b", "size": 1, "served": True, "mirror": lag})
    assert check(both, None, 120)[0] == CRITICAL  # critical outranks unknown


def test_lines_in_one_style():
    now = 1000.0
    sync = {"mode": "sync", "state": "degraded", "target": "h:1", "dirty_bytes": 1 << 20,
            "initial_sync": {"done": True}, "link": {"connected": False, "since": 940.0, "reason": "connecting"},
            "last_ack": 939.0, "alerts": []}
    text = line({"name": "vol", "mirror": sync}, now)
    assert text.startswith("vol  sync  degraded  dirty 1.0 MiB  to h:1  disconnected: connecting since ")
    assert "(1m 00s ago)" in text and "last ack " in text
    rates = {"wire_10s": 230 * 1024, "logical_out_10s": 3.4 * 1024 * 1024}
    a = {**async_st("lagging", 246 << 20, lag=3.1), "rates": rates, "eta_seconds": 21.0,
         "link": {"connected": True}}
    assert line({"name": "vol1", "mirror": a}, now) == ("vol1  async  lagging  buffer 246.0 MiB  lag 3.1 s  "
                                                      "wire 230.0 KiB/s  eff 3.4 MiB/s (15.1x)  ETA 21 s")


def test_a_target_that_is_only_unreachable_alerts_after_the_stall_time():
    w = MirrorWatch("vol", EventRing(log))
    down = async_st("disconnected", error="[Errno 111] Connection refused")
    w.update(down, 0.0, rpo=None, stall=10)
    w.update(down, 5.0, rpo=None, stall=10)
    assert not w.alerts
    w.update(down, 10.0, rpo=None, stall=10)
    assert list(w.alerts) == ["disconnected"] and "Connection refused" in w.alerts["disconnected"]["message"]


def test_in_sync_after_an_outage_says_what_was_resent_and_how_long_it_took():
    ring = EventRing(log)
    w = MirrorWatch("vol", ring)
    base = {"mode": "sync", "target": "h:1", "dirty_bytes": 0, "acked_seq": 1, "last_error": None}
    w.update({**base, "state": "in_sync", "resync_bytes_sent": 0}, 0.0, rpo=None)
    w.update({**base, "state": "degraded", "dirty_bytes": 1 << 20, "last_error": "link lost"}, 1.0, rpo=None)
    w.update({**base, "state": "syncing", "dirty_bytes": 1 << 20}, 3.0, rpo=None)
    w.update({**base, "state": "in_sync", "resync_bytes_sent": 1 << 20}, 4.5, rpo=None)
    assert [e["message"] for e in ring.list()] == [
        "connected to h:1", "in sync", "disconnected from h:1: connecting (link lost)", "degraded",
        "connected to h:1", "in sync, 1.0 MiB resent in 3.5 s"]


def test_a_retry_log_repeats_every_few_minutes_but_a_new_error_at_once(caplog):
    from blockdev.nbd.limits import RateLimited

    now = [0.0]
    say = RateLimited(log, 300.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.events"):
        for t, err in ((0, "refused"), (1, "refused"), (2, "refused"), (3, "wrong key"), (4, "wrong key"),
                       (303, "wrong key")):
            now[0] = t
            say(logging.WARNING, "retry: %s", err, key=err)
    assert [r.getMessage() for r in caplog.records] == [
        "retry: refused", "retry: wrong key", "retry: wrong key (1 more since the last message)"]
