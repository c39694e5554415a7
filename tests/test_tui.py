"""`vdisk status --watch`: the pure formatting on fixed snapshots, the textual app driven by its pilot
at 80x24, and the plain fallback when stdout is not a terminal.

The textual pilot runs on asyncio; these tests are plain functions that call ``asyncio.run`` (the
suite's trio mode would otherwise run an ``async def`` test under trio).
"""
from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from vdisk import tui

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_765_000_000.0
MiB = 1 << 20


def async_mirror(**over: Any) -> dict[str, Any]:
    m = {"mode": "async", "state": "lagging", "target": "10.0.0.2:7800", "buffer_bytes": 246.7 * MiB,
         "journal_bytes": 200 * MiB, "dirty_bytes": 46.7 * MiB, "lag_seconds": 3.1,
         "last_checkpoint": {"id": 41, "time": NOW - 2},
         "rates": {"wire_10s": 230 * 1024, "wire_60s": 200 * 1024, "logical_out_10s": 3.4 * MiB,
                   "logical_out_60s": 3 * MiB, "logical_in_10s": 0},
         "eta_seconds": 21.0, "throttle": {"rate": 250000.0, "configured": 250000.0, "paused": False},
         "schedule": {"spec": "mon-fri 08:00-18:00 rate=2Mbit", "window": "mon-fri 08:00-18:00",
                      "paused": False, "next_change": "2025-12-06T18:00:00+00:00"},
         "last_error": None, "initial_sync": {"done": True, "total_bytes": 64 * MiB},
         "link": {"connected": True, "since": NOW - 192, "rtt_ms": 1.25, "reason": None},
         "rpo_seconds": None, "alerts": [], "resync": None}
    m.update(over)
    return m


def snapshot(**over: Any) -> dict[str, Any]:
    snap = {"version": 1, "time": NOW, "data_dir": "/srv/vdisk", "volumes": [
        {"name": "vol1", "size": 1 << 30, "served": True, "mirror": async_mirror()},
        {"name": "db", "size": 1 << 30, "served": True, "mirror": {
            "mode": "sync", "state": "degraded", "target": "10.0.0.3:7800", "dirty_bytes": 4 * MiB,
            "last_error": "connection refused", "initial_sync": {"done": True, "total_bytes": 1 << 30}}},
        {"name": "scratch", "size": 1 << 20, "served": False, "mirror": None},
    ], "replicas": [], "events": [
        {"time": NOW - 5, "volume": "vol1", "level": "warning", "message": "link down: connection reset"},
        {"time": NOW - 4, "volume": "vol1", "level": "info", "message": "link up"},
    ]}
    snap.update(over)
    return snap


# -- pure helpers -----------------------------------------------------------------------------------
def test_seconds_and_sizes_are_short_and_tolerate_junk():
    assert tui.fmt_seconds(3.14) == "3.1 s"
    assert tui.fmt_seconds(42) == "42 s"
    assert tui.fmt_seconds(125) == "2m05s"
    assert tui.fmt_seconds(3720) == "1h02m"
    assert tui.fmt_seconds(2 * 86400 + 3 * 3600) == "2d03h"
    for junk in (None, "3", float("nan"), True, {}):
        assert tui.fmt_seconds(junk) == "-"
        assert tui.fmt_size(junk) == "-"
        assert tui.fmt_rate(junk) == "-"
    assert tui.fmt_rate(230 * 1024) == "230.0 KiB/s"


def test_state_colours_follow_the_issue():
    for state in ("in_sync",):
        assert tui.state_colour(state) == "green"
    for state in ("lagging", "catching_up", "syncing"):
        assert tui.state_colour(state) == "yellow"
    for state in ("degraded", "disconnected", "split_brain"):
        assert tui.state_colour(state) == "red"
    for state in ("paused", "scheduled"):
        assert tui.state_colour(state) == "blue"
    assert tui.state_colour("something new") == "dim"
    assert tui.state_colour(None) == "dim"


def test_lag_is_coloured_against_the_rpo_with_a_60s_default():
    assert tui.lag_colour(10, None) == "green"
    assert tui.lag_colour(31, None) == "yellow"
    assert tui.lag_colour(61, None) == "bold red"
    assert tui.lag_colour(61, 600) == "green"
    assert tui.lag_colour(5, 6) == "yellow"
    assert tui.lag_colour(None, 60) == "dim"
    assert tui.rpo_of({"rpo_seconds": None}) == 60.0 and tui.rpo_of({"rpo_seconds": 300}) == 300.0
    cells = tui.volume_row({"name": "v", "mirror": async_mirror(lag_seconds=90.0, rpo_seconds=120)})
    assert cells[4].plain == "1m30s" and str(cells[4].style) == "yellow"


def test_rows_of_a_fixed_snapshot():
    rows = dict(tui.rows(snapshot()))
    assert list(rows) == ["v:vol1", "v:db", "v:scratch"]
    assert [c.plain for c in rows["v:vol1"]] == ["vol1", "async", "lagging", "246.7 MiB", "3.1 s", "230.0 KiB/s",
                                                 "21 s"]
    assert str(rows["v:vol1"][2].style) == "yellow"
    assert [c.plain for c in rows["v:db"]][:4] == ["db", "sync", "degraded", "4.0 MiB"]
    assert str(rows["v:db"][2].style) == "red"
    assert [c.plain for c in rows["v:scratch"]][:3] == ["scratch", "-", "unmirrored"]


def test_plain_line_is_the_status_line():
    lines = tui.plain_lines(snapshot())
    assert lines[0] == ("vol1  async  lagging  buffer 246.7 MiB  lag 3.1 s  wire 230.0 KiB/s  eff 3.4 MiB/s  "
                        "ETA 21 s  throttle 2.0 Mbit/s  window mon-fri 08:00-18:00  -> 10.0.0.2:7800")
    assert lines[1] == "db  sync  degraded  dirty 4.0 MiB  -> 10.0.0.3:7800  (connection refused)"
    assert lines[2] == "scratch  not mirrored  (not served)"


def test_detail_shows_link_schedule_catch_up_and_progress():
    vol = snapshot()["volumes"][0]
    text = "\n".join(t.plain for t in tui.detail_lines(vol, NOW))
    assert "-> 10.0.0.2:7800" in text and "link up 3m12s" in text and "rtt 1.2 ms" in text
    assert "throttle 2.0 Mbit/s" in text and "window mon-fri 08:00-18:00 until 18:00" in text
    assert "catch-up 21 s" in text and "checkpoint 2.0 s ago" in text
    vol["mirror"]["schedule"]["next_change"] = NOW + 3600  # a unix time works as well
    text = "\n".join(t.plain for t in tui.detail_lines(vol, NOW))
    assert f"until {time.strftime('%H:%M', time.localtime(NOW + 3600))}" in text
    down = {"name": "v", "served": True, "mirror": async_mirror(
        state="disconnected", eta_seconds=None, link={"connected": False, "since": NOW - 30,
                                                      "reason": "authentication failed"},
        resync={"done_bytes": 16 * MiB, "total_bytes": 64 * MiB, "rate": MiB, "eta_seconds": 48})}
    text = "\n".join(t.plain for t in tui.detail_lines(down, NOW))
    assert "link down 30 s (authentication failed)" in text and "catch-up ?" in text
    assert "resync 16.0 MiB / 64.0 MiB (25%) @ 1.0 MiB/s, ETA 48 s" in text


def test_a_target_lists_its_replicas():
    snap = {"volumes": [], "replicas": [{"name": "vol1", "source": {"name": "vol1", "uuid": "u", "addr": "10.0.0.1:5"},
                                         "connected": True, "connected_since": NOW - 60,
                                         "last_checkpoint": {"id": 7, "time": NOW - 1}, "lag_seconds": 1.5}]}
    (key, cells), = tui.rows(snap)
    assert key == "r:vol1" and [c.plain for c in cells][:5] == ["vol1", "replica", "connected", "-", "1.5 s"]
    text = "\n".join(t.plain for t in tui.detail_lines(tui.find(snap, key), NOW))
    assert "replica of vol1 from 10.0.0.1:5" in text and "checkpoint #7" in text
    assert tui.plain_lines(snap) == ["vol1  replica of vol1 from 10.0.0.1:5  connected  lag 1.5 s"]


def test_everything_tolerates_missing_keys_and_none():
    sparse: list[dict[str, Any]] = [
        {}, {"volumes": None, "events": None, "replicas": None}, {"volumes": [None, {}, {"name": "x", "mirror": {}}]},
        {"volumes": [{"name": "x", "mirror": {k: None for k in async_mirror()}}]},
        {"volumes": [{"name": "x", "mirror": {"mode": "async", "rates": {"wire_10s": None}, "link": None,
                                              "throttle": None, "schedule": None, "alerts": None}}],
         "replicas": [{}, {"name": "r", "source": None, "connected": True}], "events": [None, {}]},
    ]
    history, feed = tui.History(), tui.EventFeed()
    for snap in sparse:
        tui.plain_lines(snap)
        tui.alerts_of(snap)
        history.add(snap)
        feed.new(snap)
        for key, cells in tui.rows(snap):
            assert len(cells) == len(tui.COLUMNS)
            tui.detail_lines(tui.find(snap, key), NOW)


def test_alerts_from_the_daemon_or_lag_past_the_rpo():
    snap = snapshot()
    snap["volumes"][0]["mirror"]["alerts"] = [{"kind": "rpo", "since": NOW - 10, "message": "lag 75 s past RPO 60 s"}]
    assert tui.alerts_of(snap)[0][0] == "vol1" and tui.alerts_of(snap)[0][1].startswith("lag 75 s past RPO 60 s")
    # A daemon that reports no alerts at all: the dashboard flags lag past the RPO itself.
    old = {"volumes": [{"name": "v", "mirror": {"mode": "async", "state": "lagging", "lag_seconds": 90.0}}]}
    assert tui.alerts_of(old) == [("v", "lag 1m30s past its RPO of 1m00s")]
    old["volumes"][0]["mirror"]["lag_seconds"] = 10.0
    assert tui.alerts_of(old) == []


def test_event_feed_deduplicates_by_time_and_message():
    feed = tui.EventFeed()
    snap = snapshot()
    assert [e["message"] for e in feed.new(snap)] == ["link down: connection reset", "link up"]
    assert feed.new(snap) == []
    snap["events"].append({"time": NOW - 1, "volume": "vol1", "level": "info", "message": "in sync"})
    assert [e["message"] for e in feed.new(snap)] == ["in sync"]
    # Without an events key: one event per state change between snapshots.
    feed = tui.EventFeed()
    bare = snapshot()
    del bare["events"]
    assert [e["volume"] for e in feed.new(bare)] == ["vol1", "db"]  # an unmirrored volume has no news
    bare["volumes"][0]["mirror"]["state"] = "in_sync"
    bare["time"] = NOW + 1
    assert [(e["volume"], e["message"]) for e in feed.new(bare)] == [("vol1", "lagging -> in_sync")]


def test_history_keeps_the_last_samples_per_volume():
    h = tui.History(size=3)
    for i in range(5):
        snap = snapshot(time=NOW + i)
        snap["volumes"][0]["mirror"]["rates"]["wire_10s"] = float(i)
        h.add(snap)
    h.add(snap)  # the same snapshot again: no new sample
    assert h.series("vol1", "wire") == [2.0, 3.0, 4.0]
    assert h.series("vol1", "buffer") == [246.7 * MiB] * 3
    assert h.series("db", "buffer") == [4 * MiB] * 3
    assert h.series("scratch", "wire") == []


def test_spark_text_is_read_against_zero_and_fills_its_width():
    assert tui.spark_text([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert tui.spark_text([0, 7], 4) == "▁▁██"
    assert tui.spark_text([5.0, 5.0], 3) == "███"
    assert tui.spark_text([0.0, 0.0], 2) == "▁▁"
    assert tui.spark_text([1, 9, 2, 3], 2) == "█▃"  # each column shows the largest of its slice
    assert tui.spark_text([], 5) == "" and tui.spark_text([1.0], 0) == ""


def test_plain_watch_prints_every_interval_count_times():
    out = io.StringIO()
    calls = []

    def fetch() -> dict[str, Any]:
        calls.append(1)
        return snapshot()

    assert tui.plain_watch(fetch, 0.01, 2, out=out) == 0
    assert len(calls) == 2
    text = out.getvalue()
    assert text.count("vol1  async  lagging") == 2 and "\n\n" in text


def test_plain_watch_reports_a_later_error_and_goes_on(capsys: pytest.CaptureFixture[str]):
    out = io.StringIO()
    results: list[Any] = [snapshot(), ConnectionError("daemon restarting"), snapshot()]

    def fetch() -> dict[str, Any]:
        r = results.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    assert tui.plain_watch(fetch, 0.01, 2, out=out) == 0
    assert out.getvalue().count("vol1  async") == 2
    assert "vdisk: error: daemon restarting" in capsys.readouterr().err
    with pytest.raises(ConnectionError):  # the first fetch failing is the command's error
        tui.plain_watch(lambda: fetch() if results else (_ for _ in ()).throw(ConnectionError("x")), 0.01, 1,
                        out=out)


# -- the app, through textual's pilot ---------------------------------------------------------------
class Fake:
    """A daemon stand-in: a snapshot per fetch, and the pause requests it got."""

    def __init__(self, snap: dict[str, Any], delay: float = 0.0) -> None:
        self.snap, self.delay = snap, delay
        self.fetches = 0
        self.toggles: list[tuple[str, bool]] = []
        self.toggled = threading.Event()

    def fetch(self) -> dict[str, Any]:
        self.fetches += 1
        time.sleep(self.delay)
        return self.snap

    def toggle(self, name: str, pause: bool) -> None:
        self.toggles.append((name, pause))
        self.toggled.set()


async def _until(pilot: Any, pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


def screen_text(app: Any) -> str:
    """The screen as plain text (the SVG screenshot's text is what a terminal would show)."""
    import re
    from html import unescape

    svg = app.export_screenshot()
    return unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")


def test_app_shows_the_volumes_at_80x24_and_p_pauses_the_selected_one():
    fake = Fake(snapshot())

    async def scenario() -> None:
        app = tui.Dashboard(fake.fetch, fake.toggle, interval=0.2)
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.query_one("#volumes")
            await _until(pilot, lambda: table.row_count == 3)
            assert [c.plain for c in table.get_row_at(0)][:3] == ["vol1", "async", "lagging"]
            assert app.selected_key() == "v:vol1"
            await _until(pilot, lambda: "246.7 MiB   3.1 s" in screen_text(app))
            text = screen_text(app)
            assert "lagging" in text and "246.7 MiB" in text and "link up" in text
            assert "link down: connection reset" in text  # the event log
            await pilot.press("p")
            await _until(pilot, fake.toggled.is_set)
            assert fake.toggles == [("vol1", True)]
            # Arrows select; p on a sync mirror is refused in the dashboard, the callback is not called.
            await pilot.press("down")
            assert app.selected_key() == "v:db"
            await pilot.press("p")
            await pilot.pause(0.2)
            assert fake.toggles == [("vol1", True)]
            await pilot.press("up")
            assert app.selected_key() == "v:vol1"
            # Paused now: p resumes.
            fake.snap = snapshot(time=NOW + 1)
            fake.snap["volumes"][0]["mirror"].update(state="paused", throttle={"rate": None, "paused": True})
            await _until(pilot, lambda: "paused" in [c.plain for c in table.get_row_at(0)])
            fake.toggled.clear()
            await pilot.press("p")
            await _until(pilot, fake.toggled.is_set)
            assert fake.toggles[-1] == ("vol1", False)
            # The daemon refuses: the operator is told, nothing else changes.
            def refuse(name: str, pause: bool) -> None:
                raise RuntimeError("the mirror of vol1 is sync")

            app._toggle = refuse
            await pilot.press("p")
            await _until(pilot, lambda: "vol1: resume failed" in screen_text(app))
            await pilot.press("q")
            await pilot.pause(0.1)
        assert not app.is_running

    asyncio.run(scenario())


def test_app_keeps_the_selection_when_volumes_come_and_go_and_shows_fetch_errors():
    fake = Fake(snapshot())
    fail = {"on": False}

    def fetch() -> dict[str, Any]:
        if fail["on"]:
            raise ConnectionError("cannot reach the vdisk daemon")
        return fake.fetch()

    async def scenario() -> None:
        app = tui.Dashboard(fetch, fake.toggle, interval=0.1)
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.query_one("#volumes")
            await _until(pilot, lambda: table.row_count == 3)
            await pilot.press("down")
            assert app.selected_key() == "v:db"
            fake.snap = snapshot(time=NOW + 1)
            fake.snap["volumes"].insert(0, {"name": "aaa", "served": False, "mirror": None})
            await _until(pilot, lambda: table.row_count == 4)
            assert app.selected_key() == "v:db"
            fail["on"] = True
            await _until(pilot, lambda: "cannot reach" in screen_text(app))
            assert table.row_count == 4  # the last numbers stay up
            await pilot.press("q")

    asyncio.run(scenario())


def test_app_shows_alerts_and_grows_with_the_terminal():
    snap = snapshot()
    snap["volumes"][0]["mirror"]["alerts"] = [{"kind": "rpo", "since": NOW - 10, "message": "lag past RPO"}]
    fake = Fake(snap)

    async def scenario(size: tuple[int, int]) -> tuple[int, int]:
        app = tui.Dashboard(fake.fetch, fake.toggle, interval=0.2)
        async with app.run_test(size=size) as pilot:
            await _until(pilot, lambda: "ALERT vol1: lag past RPO" in screen_text(app))
            sizes = app.query_one("#events").size.height, app.query_one("#wire").size.width
            trend = app.query_one("#volumes").get_row_at(0)[-1].plain
            assert len(trend) == max(3, size[0] - tui.FIXED_WIDTH) and trend.endswith("█")
            await pilot.press("ctrl+c")
            await pilot.pause(0.1)
            assert not app.is_running
        return sizes

    small, large = asyncio.run(scenario((80, 24))), asyncio.run(scenario((160, 50)))
    assert small[0] >= 3 and large[0] >= small[0] + 20
    assert large[1] >= small[1] + 70


def test_a_slow_daemon_never_freezes_the_keys():
    fake = Fake(snapshot(), delay=30.0)

    async def scenario() -> float:
        app = tui.Dashboard(fake.fetch, fake.toggle, interval=0.1)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.5)
            assert fake.fetches == 1  # a fetch in flight is not repeated
            t0 = time.monotonic()
            await pilot.press("q")
            await pilot.pause(0.1)
        return time.monotonic() - t0

    assert asyncio.run(scenario()) < 3


# -- the command, not on a terminal -----------------------------------------------------------------
def test_watch_without_a_terminal_prints_plain_lines_and_exits(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    data = tmp_path / "data"

    def vd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vdisk.cli", "--data-dir", str(data), *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    assert vd("create", "v1", "--size", "16M").returncode == 0
    assert vd("create", "v2", "--size", "16M").returncode == 0
    assert vd("mirror", "v2", "--to", "127.0.0.1:9", "--mode", "async").returncode == 0
    res = vd("status", "--watch", "--count", "2", "--interval", "0.1")
    assert res.returncode == 0, res.stderr
    blocks = res.stdout.strip().split("\n\n")
    assert len(blocks) == 2
    first = blocks[0].splitlines()  # the lines `vdisk status` prints (vdisk/status.py)
    assert len(first) == 2 and first[0].startswith("v1  not mirrored") and "not served" in first[0]
    assert first[1].startswith("v2  async  disconnected  buffer 0 B") and "not served" in first[1]
    one = vd("status", "v2", "--watch", "--count", "1", "--json")
    assert one.returncode == 0 and '"name": "v2"' in one.stdout and '"v1"' not in one.stdout
    missing = vd("status", "nope", "--watch", "--count", "1")
    assert missing.returncode == 1 and "no volume named 'nope'" in missing.stderr
    every = vd("status")  # every volume of the data directory, once
    assert every.returncode == 0 and every.stdout.splitlines()[0].startswith("v1  not mirrored")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# -- end to end: the dashboard in a real terminal (tmux) against live daemons ----------------------
def test_watch_in_tmux_shows_a_throttled_async_mirror_and_q_exits(tmp_path: Path):
    """A target and a served volume async-mirrored under a 2 Mbit/s throttle, 6 MiB written through
    NBD: the dashboard (in a 100x30 tmux pane) shows the volume, its state and a non-zero buffer; `p`
    pauses it through the daemon; `q` ends the dashboard with exit code 0."""
    import re
    import shlex
    import shutil

    from tests.mirror_procs import Procs

    nbd = pytest.importorskip("nbd") if not os.environ.get("CI") else __import__("nbd")
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed (scripts/setup.sh installs it)")
        pytest.skip("tmux is not installed")
    procs = Procs(tmp_path)
    tmux = ["tmux", "-L", f"vdisk-test-{os.getpid()}"]  # a private server: other tmux users are not touched
    exit_file = tmp_path / "exit"
    try:
        procs.run("--data-dir", str(tmp_path / "src"), "create", "vol", "--size", "64M")
        _, port = procs.target("dst")
        _, sock = procs.serve("src", "vol")
        procs.run("--data-dir", str(tmp_path / "src"), "mirror", "vol", "--to", f"127.0.0.1:{port}",
                  "--mode", "async", "--rate", "2Mbit", "--checkpoint-interval", "1s", "--timeout", "3")
        procs.wait_state("src", "vol", "in_sync")
        h = nbd.NBD()
        h.connect_unix(sock)
        for i in range(6):  # 6 MiB at 250 kB/s: about 25 s to ship
            h.pwrite(os.urandom(MiB), i * MiB)
        h.flush()
        h.shutdown()
        watch = shlex.join([sys.executable, "-m", "vdisk.cli", "--data-dir", str(tmp_path / "src"), "status",
                            "--watch"])
        shell = (f"cd {shlex.quote(str(ROOT))} && PYTHONPATH={shlex.quote(procs.env['PYTHONPATH'])} {watch}; "
                 f"echo $? > {shlex.quote(str(exit_file))}")
        subprocess.run([*tmux, "new-session", "-d", "-s", "watch", "-x", "100", "-y", "30", shell], check=True,
                       env={**os.environ, "TERM": "xterm-256color"}, timeout=10)

        def pane() -> str:
            return subprocess.run([*tmux, "capture-pane", "-p", "-t", "watch"], capture_output=True, text=True,
                                  timeout=10, check=False).stdout

        row = re.compile(r"\bvol\s+async\s+(lagging|catching_up)\s+([0-9.]+) (B|KiB|MiB)\b")
        deadline = time.monotonic() + 25
        screen, m = "", None
        while time.monotonic() < deadline and m is None:
            time.sleep(0.3)
            screen = pane()
            m = row.search(screen)
        assert m is not None, f"no lagging row with a buffer on the screen:\n{screen}"
        assert float(m.group(2)) > 0 and m.group(3) != "B", screen
        assert f"127.0.0.1:{port}" in screen and "link up" in screen, screen
        (tmp_path / "screen.txt").write_text(screen)
        # p pauses the selected (only) volume through its daemon; the dashboard shows it.
        subprocess.run([*tmux, "send-keys", "-t", "watch", "p"], check=True, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not re.search(r"\bvol\s+async\s+paused\b", screen):
            time.sleep(0.3)
            screen = pane()
        assert re.search(r"\bvol\s+async\s+paused\b", screen), screen
        assert procs.status("src", "vol")["throttle"]["paused"] is True
        subprocess.run([*tmux, "send-keys", "-t", "watch", "q"], check=True, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not exit_file.exists():
            time.sleep(0.1)
        assert exit_file.exists(), f"q did not end the dashboard:\n{pane()}"
        time.sleep(0.1)
        assert exit_file.read_text().strip() == "0"
        # The target's data directory: its replica, where from.
        dst = procs.run("--data-dir", str(tmp_path / "dst"), "status", "--watch", "--count", "1").stdout
        assert dst.startswith("vol  replica of 'vol' from 127.0.0.1:") and "connected" in dst, dst
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10, check=False)
        procs.kill_all()
