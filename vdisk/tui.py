"""`vdisk status --watch`: a live dashboard of a data directory's mirrors (textual), or plain lines when
stdout is not a terminal.

The dashboard only ever sees snapshots in the shape of `vdisk status --json` (``fetch`` returns one)
and asks for a pause or resume through ``toggle_pause``. Both block on a control socket for up to its
timeout, so they run on daemon threads: a slow or hung daemon freezes the numbers, never the keys, and
`q` never waits for it. The daemon keeps only 10 s / 60 s rates, so the minutes of history behind the
sparklines are kept here, one sample per snapshot.

Snapshots come from daemons of other versions and from data directories nobody serves: every key may
be missing or None, and everything that turns a snapshot into text is a pure function below, tested
without a terminal.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Label, RichLog, Sparkline, Static

from .units import format_rate, format_size

Snapshot = dict[str, Any]
Fetch = Callable[[], Snapshot]
TogglePause = Callable[[str, bool], None]

DEFAULT_RPO = 60.0  # seconds: what lag is coloured against when a mirror has no --rpo
HISTORY = 120  # samples per volume: two minutes at the default interval
STATE_COLOURS = {
    "in_sync": "green",
    "lagging": "yellow", "catching_up": "yellow", "syncing": "yellow",
    "degraded": "red", "disconnected": "red", "split_brain": "red",
    "paused": "blue", "scheduled": "blue",
}
COLUMNS = (("VOLUME", 10), ("MODE", 5), ("STATE", 12), ("BUFFER", 10), ("LAG", 6), ("WIRE", 11), ("ETA", 5))
# The table's last column, the buffer's trend over the history, takes what the terminal has left.
TREND = "BUFFER TREND"
FIXED_WIDTH = sum(w + 2 for _, w in COLUMNS) + 2 + 2  # cell padding, the trend's padding, a scrollbar
BARS = "▁▂▃▄▅▆▇█"


# -- reading a snapshot that may lack anything ----------------------------------------------------
def dig(obj: Any, *path: str, default: Any = None) -> Any:
    """``obj[a][b]...`` or ``default`` when any step is missing, None or not a dict."""
    for key in path:
        if not isinstance(obj, dict):
            return default
        obj = obj.get(key)
    return default if obj is None else obj


def number(value: Any) -> float | None:
    """A finite number from a snapshot field, or None (strings, bools and junk are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def mirror_of(vol: Any) -> dict[str, Any] | None:
    m = dig(vol, "mirror")
    return m if isinstance(m, dict) else None


def state_of(vol: Any) -> str:
    """The mirror's state; 'unmirrored' without one; '?' when a daemon did not say."""
    m = mirror_of(vol)
    if m is None:
        return "unmirrored"
    return str(m.get("state") or "?")


def buffer_of(m: dict[str, Any] | None) -> float | None:
    """What the replica lacks: the async buffer, or a sync mirror's dirty bytes."""
    if m is None:
        return None
    b = number(m.get("buffer_bytes"))
    return b if b is not None else number(m.get("dirty_bytes"))


def rpo_of(m: dict[str, Any] | None) -> float:
    rpo = number(dig(m, "rpo_seconds"))
    return rpo if rpo and rpo > 0 else DEFAULT_RPO


def is_paused(m: dict[str, Any] | None) -> bool:
    return bool(dig(m, "throttle", "paused") or dig(m, "paused")) or dig(m, "state") == "paused"


# -- formatting -----------------------------------------------------------------------------------
def state_colour(state: str | None) -> str:
    return STATE_COLOURS.get(state or "", "dim")


def lag_colour(lag: float | None, rpo: float | None = None) -> str:
    """Green well inside the RPO, yellow in its second half, red past it; dim when unknown."""
    rpo = rpo if rpo and rpo > 0 else DEFAULT_RPO
    if lag is None:
        return "dim"
    if lag > rpo:
        return "bold red"
    return "yellow" if lag > rpo / 2 else "green"


def fmt_size(n: Any) -> str:
    v = number(n)
    return "-" if v is None else format_size(v)


def fmt_rate(n: Any) -> str:
    v = number(n)
    return "-" if v is None else f"{format_size(v)}/s"


def fmt_seconds(s: Any) -> str:
    """3.1 s, 2m05s, 1h02m, 2d03h: short enough for a 7-column cell."""
    v = number(s)
    if v is None:
        return "-"
    v = max(0.0, v)
    if v < 60:
        return f"{v:.1f} s" if v < 10 else f"{v:.0f} s"
    if v < 3600:
        return f"{int(v // 60)}m{int(v % 60):02d}s"
    if v < 86400:
        return f"{int(v // 3600)}h{int(v % 3600 // 60):02d}m"
    return f"{int(v // 86400)}d{int(v % 86400 // 3600):02d}h"


def fmt_eta(m: dict[str, Any] | None) -> str:
    """The predicted catch-up: '-' with nothing to ship, '?' when it does not shrink (paused, no link)."""
    eta, buf = number(dig(m, "eta_seconds")), buffer_of(m)
    if eta is not None:
        return fmt_seconds(eta)
    return "?" if buf and dig(m, "mode") == "async" else "-"  # a sync mirror predicts no catch-up


def fmt_clock(t: Any) -> str:
    v = number(t)
    return "-" if v is None else time.strftime("%H:%M:%S", time.localtime(v))


def volume_row(vol: dict[str, Any]) -> tuple[Text, ...]:
    """The table's cells for one volume: name, mode, state, buffer, lag, wire rate, ETA."""
    m = mirror_of(vol)
    state = state_of(vol)
    name = str(dig(vol, "name", default="?"))
    if m is None:
        return (Text(name), Text("-", "dim"), Text(state, "dim"), *(Text("-", "dim") for _ in range(4)))
    lag = number(m.get("lag_seconds"))
    return (Text(name, "bold"), Text(str(m.get("mode") or "?")), Text(state, state_colour(state)),
            Text(fmt_size(buffer_of(m))), Text(fmt_seconds(lag), lag_colour(lag, rpo_of(m))),
            Text(fmt_rate(dig(m, "rates", "wire_10s"))), Text(fmt_eta(m)))


def spark_text(values: list[float], width: int) -> str:
    """``values`` as ``width`` block characters (each the largest value of its slice), read against
    zero: a table cell's sparkline, one per volume."""
    if width <= 0 or not values:
        return ""
    top = max(values)
    out = []
    for i in range(width):
        chunk = values[i * len(values) // width:max((i + 1) * len(values) // width, i * len(values) // width + 1)]
        v = max(chunk) if chunk else 0.0
        out.append(BARS[min(len(BARS) - 1, int(v / top * (len(BARS) - 1) + 0.5))] if top > 0 else BARS[0])
    return "".join(out)


def replica_row(rep: dict[str, Any]) -> tuple[Text, ...]:
    """A replica on a target's data directory: connected or not, and how far behind its source."""
    connected = dig(rep, "connected")
    state = "connected" if connected else ("disconnected" if connected is not None else "?")
    lag = number(dig(rep, "lag_seconds"))
    return (Text(str(dig(rep, "name", default="?")), "bold"), Text("replica"),
            Text(state, "green" if connected else "red" if connected is not None else "dim"),
            Text("-", "dim"), Text(fmt_seconds(lag), lag_colour(lag)), Text("-", "dim"), Text("-", "dim"))


def rows(snapshot: Snapshot) -> list[tuple[str, tuple[Text, ...]]]:
    """(row key, cells) for every volume and replica; keys are stable across snapshots."""
    out = [(f"v:{dig(v, 'name')}", volume_row(v)) for v in dig(snapshot, "volumes", default=[]) if isinstance(v, dict)]
    out += [(f"r:{dig(r, 'name')}", replica_row(r)) for r in dig(snapshot, "replicas", default=[])
            if isinstance(r, dict)]
    return out


def find(snapshot: Snapshot | None, key: str | None) -> dict[str, Any] | None:
    """The volume ("v:NAME") or replica ("r:NAME") a row key stands for."""
    if not snapshot or not key:
        return None
    kind, _, name = key.partition(":")
    for item in dig(snapshot, "volumes" if kind == "v" else "replicas", default=[]):
        if isinstance(item, dict) and str(item.get("name")) == name:
            return item
    return None


def link_text(m: dict[str, Any], now: float) -> Text:
    """'-> host:port  link up 3m12s  rtt 1.2 ms', or down with the reason (not served, authentication...)."""
    out = Text.assemble(("-> ", "dim"), str(m.get("target") or "?"), "  ")
    link = m.get("link") if isinstance(m.get("link"), dict) else {}
    connected = link.get("connected")
    if connected is None:  # older daemons: the state says it
        connected = None if m.get("state") in (None, "?") else m.get("state") not in ("disconnected", "split_brain")
    since = number(link.get("since"))
    ago = f" {fmt_seconds(now - since)}" if since else ""
    if connected:
        out.append(f"link up{ago}", "green")
        rtt = number(link.get("rtt_ms"))
        if rtt is not None:
            out.append(f"  rtt {rtt:.1f} ms")
    elif connected is not None:
        out.append(f"link down{ago}", "red")
        reason = link.get("reason") or m.get("last_error")
        if reason:
            out.append(f" ({reason})", "red")
    return out


def detail_lines(item: dict[str, Any] | None, now: float) -> list[Text]:
    """Below the table, for the selected row: link and target, throttle and schedule window,
    catch-up, last checkpoint, resync or initial-sync progress, last error."""
    if item is None:
        return [Text("no volume", "dim")]
    name = str(item.get("name"))
    if "source" in item or item.get("connected_since") is not None:  # a replica
        src = item.get("source") if isinstance(item.get("source"), dict) else {}
        line = Text.assemble((name, "bold"), f"  replica of {src.get('name') or '?'} from {src.get('addr') or '?'}")
        cp = dig(item, "last_checkpoint", "id")
        extra = Text(f"connected since {fmt_clock(item.get('connected_since'))}  "
                     f"checkpoint {'#' + str(cp) if cp is not None else '-'} at "
                     f"{fmt_clock(dig(item, 'last_checkpoint', 'time'))}")
        return [line, extra]
    m = mirror_of(item)
    if m is None:
        return [Text.assemble((name, "bold"), (f"  not mirrored{'' if item.get('served') else ', not served'}",
                                               "dim"))]
    first = Text.assemble((name, "bold"), f"  {m.get('mode') or '?'} ", link_text(m, now))
    if not item.get("served", True) and "not served" not in first.plain:
        first.append("  not served", "red")
    second = Text()
    thr = m.get("throttle") if isinstance(m.get("throttle"), dict) else {}
    if m.get("mode") == "async":
        second.append(f"throttle {format_rate(number(thr.get('rate')))}")
        if is_paused(m):
            second.append(" paused", "blue")
    sched = m.get("schedule") if isinstance(m.get("schedule"), dict) else None
    if sched:
        window = sched.get("window") or "no window"
        second.append(f"  window {window}", "blue" if sched.get("paused") else "")
        change = sched.get("next_change")
        if number(change) is not None:  # a unix time, or an ISO timestamp (today's daemons)
            second.append(f" until {fmt_clock(change)[:5]}")
        elif isinstance(change, str) and "T" in change:
            second.append(f" until {change.partition('T')[2][:5]}")
    buf = buffer_of(m)
    if buf:
        second.append(f"  catch-up {fmt_eta(m)}")
    cp = dig(m, "last_checkpoint", "time")
    if number(cp):
        second.append(f"  checkpoint {fmt_seconds(now - number(cp))} ago", "dim")  # type: ignore[operator]
    lines = [first, second] if second.plain else [first]
    progress = _progress(m)
    if progress:
        lines.append(progress)
    if m.get("last_error") and m.get("state") != "in_sync" and str(m["last_error"]) not in first.plain:
        lines.append(Text(f"last error: {m['last_error']}", "red"))
    return lines


def _progress(m: dict[str, Any]) -> Text | None:
    """'resync 12.0 MiB / 64.0 MiB (18%) @ 1.0 MiB/s, ETA 52 s' or the initial sync's bytes."""
    rs = m.get("resync") if isinstance(m.get("resync"), dict) else None
    init = m.get("initial_sync") if isinstance(m.get("initial_sync"), dict) else {}
    if rs:
        done, total, what = number(rs.get("done_bytes")), number(rs.get("total_bytes")), "resync"
    elif init and init.get("done") is False and number(init.get("total_bytes")):
        total = number(init.get("total_bytes"))
        done = number(init.get("copied_bytes"))
        if done is None and total is not None and buffer_of(m) is not None:
            done = max(0.0, total - (buffer_of(m) or 0.0))
        rs, what = {}, "initial sync"
    else:
        return None
    pct = f" ({100 * done / total:.0f}%)" if done is not None and total else ""
    out = Text(f"{what} {fmt_size(done)} / {fmt_size(total)}{pct}", "yellow")
    if number(rs.get("rate")):
        out.append(f" @ {fmt_rate(rs.get('rate'))}")
    if number(rs.get("eta_seconds")) is not None:
        out.append(f", ETA {fmt_seconds(rs.get('eta_seconds'))}")
    return out


def alerts_of(snapshot: Snapshot) -> list[tuple[str, str]]:
    """(volume, message) for every active alert. A daemon that reports alerts is trusted; for one
    that does not (no ``alerts`` key), lag past the RPO is flagged here."""
    out = []
    for v in dig(snapshot, "volumes", default=[]):
        m = mirror_of(v)
        if m is None:
            continue
        name = str(dig(v, "name", default="?"))
        if isinstance(m.get("alerts"), list):
            for a in m["alerts"]:
                if isinstance(a, dict):
                    msg = a.get("message") or a.get("kind") or "alert"
                    since = number(a.get("since"))
                    out.append((name, f"{msg}" + (f" (since {fmt_clock(since)})" if since else "")))
            continue
        lag = number(m.get("lag_seconds"))
        if lag is not None and lag > rpo_of(m):
            out.append((name, f"lag {fmt_seconds(lag)} past its RPO of {fmt_seconds(rpo_of(m))}"))
    return out


def event_text(ev: dict[str, Any]) -> Text:
    level = str(ev.get("level") or "info")
    style = {"error": "red", "critical": "bold red", "warning": "yellow", "warn": "yellow"}.get(level, "")
    vol = ev.get("volume")
    return Text.assemble((fmt_clock(ev.get("time")) + " ", "dim"), (f"{vol}: " if vol else ""),
                         (str(ev.get("message") or ""), style))


class EventFeed:
    """The snapshot's ``events`` that were not shown yet, deduplicated by (time, message): every
    snapshot repeats the daemon's recent events.

    A snapshot without an ``events`` key (a daemon that keeps no log) gets one event per state change
    seen between two snapshots, so the log still says when a mirror went down or caught up."""

    def __init__(self, limit: int = 10000) -> None:
        self._seen: set[tuple[Any, str]] = set()
        self._order: deque[tuple[Any, str]] = deque()
        self._limit = limit
        self._states: dict[str, str] = {}

    def new(self, snapshot: Snapshot) -> list[dict[str, Any]]:
        if isinstance(snapshot.get("events"), list):
            events = [e for e in snapshot["events"] if isinstance(e, dict)]
        else:
            events = self._state_changes(snapshot)
        fresh = []
        for ev in sorted(events, key=lambda e: number(e.get("time")) or 0.0):
            key = (ev.get("time"), str(ev.get("message")))
            if key in self._seen:
                continue
            self._seen.add(key)
            self._order.append(key)
            if len(self._order) > self._limit:
                self._seen.discard(self._order.popleft())
            fresh.append(ev)
        return fresh

    def _state_changes(self, snapshot: Snapshot) -> list[dict[str, Any]]:
        out = []
        now = number(snapshot.get("time")) or time.time()
        for v in dig(snapshot, "volumes", default=[]):
            name, state = str(dig(v, "name", default="?")), state_of(v)
            old = self._states.get(name)
            self._states[name] = state
            if old == state or (old is None and state == "unmirrored"):
                continue
            level = "warning" if state_colour(state) in ("red",) else "info"
            msg = state if old is None else f"{old} -> {state}"
            err = dig(v, "mirror", "last_error")
            if err and state in ("disconnected", "split_brain", "degraded"):
                msg += f" ({err})"
            out.append({"time": now, "volume": name, "level": level, "message": msg})
        return out


class History:
    """Per volume, the last ``size`` samples of wire rate and buffer, one per snapshot."""

    def __init__(self, size: int = HISTORY) -> None:
        self.size = size
        self._series: dict[tuple[str, str], deque[float]] = {}
        self._last_time: float | None = None

    def add(self, snapshot: Snapshot) -> None:
        t = number(snapshot.get("time"))
        if t is not None and t == self._last_time:
            return  # the same snapshot twice (a cached reply) is not a new sample
        self._last_time = t
        for v in dig(snapshot, "volumes", default=[]):
            m = mirror_of(v)
            if m is None:
                continue
            name = str(dig(v, "name", default="?"))
            self._push(name, "wire", number(dig(m, "rates", "wire_10s")) or 0.0)
            self._push(name, "buffer", buffer_of(m) or 0.0)

    def _push(self, name: str, what: str, value: float) -> None:
        self._series.setdefault((name, what), deque(maxlen=self.size)).append(value)

    def series(self, name: str, what: str) -> list[float]:
        return list(self._series.get((name, what), ()))


# -- plain output ---------------------------------------------------------------------------------
def plain_line(vol: dict[str, Any]) -> str:
    """One line per volume, as `vdisk status` prints it:
    vol1  async  lagging  buffer 246.7 MiB  lag 3.1 s  wire 230.0 KiB/s  eff 3.4 MiB/s  ETA 21 s"""
    name = str(dig(vol, "name", default="?"))
    m = mirror_of(vol)
    if m is None:
        return f"{name}  not mirrored" + ("" if vol.get("served") else "  (not served)")
    is_async, lag = m.get("mode") == "async", number(m.get("lag_seconds"))
    parts = [name, str(m.get("mode") or "?"), state_of(vol),
             f"{'dirty' if m.get('buffer_bytes') is None and not is_async else 'buffer'} {fmt_size(buffer_of(m))}"]
    if is_async or lag is not None:  # a sync mirror has no lag, only dirty regions to resync
        parts.append("lag ?" if lag is None else f"lag {fmt_seconds(lag)}")
    rates = m.get("rates") if isinstance(m.get("rates"), dict) else None
    if rates:
        parts += [f"wire {fmt_rate(rates.get('wire_10s'))}", f"eff {fmt_rate(rates.get('logical_out_10s'))}"]
    if buffer_of(m) and (is_async or number(m.get("eta_seconds")) is not None):
        parts.append(f"ETA {fmt_eta(m)}")
    if number(dig(m, "throttle", "rate")):
        parts.append(f"throttle {format_rate(number(dig(m, 'throttle', 'rate')))}")
    if dig(m, "schedule", "window"):
        parts.append(f"window {dig(m, 'schedule', 'window')}")
    if m.get("target"):
        parts.append(f"-> {m['target']}")
    if m.get("last_error") and state_of(vol) in ("disconnected", "split_brain", "degraded"):
        parts.append(f"({m['last_error']})")
    return "  ".join(parts)


def plain_lines(snapshot: Snapshot) -> list[str]:
    lines = [plain_line(v) for v in dig(snapshot, "volumes", default=[]) if isinstance(v, dict)]
    for r in dig(snapshot, "replicas", default=[]):
        if isinstance(r, dict):
            src = r.get("source") if isinstance(r.get("source"), dict) else {}
            lines.append(f"{r.get('name')}  replica of {src.get('name') or '?'} from {src.get('addr') or '?'}  "
                         f"{'connected' if r.get('connected') else 'disconnected'}  "
                         f"lag {fmt_seconds(r.get('lag_seconds'))}")
    lines += [f"ALERT {name}: {msg}" for name, msg in alerts_of(snapshot)]
    return lines


def plain_watch(fetch: Fetch, interval: float, count: int | None, as_json: bool = False,
                out: Any = None) -> int:
    """Not a terminal: the plain lines (or one JSON snapshot per line) every ``interval``,
    ``count`` times or until interrupted, each refresh separated by an empty line."""
    from .status import render

    out = out or sys.stdout
    n = 0
    try:
        while True:
            try:
                snap = fetch()
            except Exception as e:
                if n == 0:
                    raise  # a bad name or data directory: the command's error, at once
                # A daemon restarting or slow: said on stderr, the watch goes on.
                print(f"vdisk: error: {e}", file=sys.stderr, flush=True)
                time.sleep(interval)
                continue
            text = json.dumps(snap, default=str) if as_json else render(snap)  # as `vdisk status` prints
            print(("" if n == 0 or as_json else "\n") + text, file=out, flush=True)
            n += 1
            if count is not None and n >= count:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `| head`: the reader has seen enough
        return 0


# -- the dashboard --------------------------------------------------------------------------------
class VolumeTable(DataTable[Text]):
    """The volumes, one row each; its arrows select (and say so in the footer)."""

    BINDINGS: ClassVar[list[Binding]] = [
        Binding("up", "cursor_up", "Select", key_display="↑↓"),
        Binding("down", "cursor_down", "Select", show=False),
    ]


class Dashboard(App[int]):
    """Volumes table (arrows select), details and sparklines of the selected one, alerts, events."""

    TITLE = "vdisk status"
    ENABLE_COMMAND_PALETTE = False  # nothing to command: the footer keeps its room for the keys
    CSS = """
    Screen { layout: vertical; }
    #top { height: 1; background: $panel; color: $text; padding: 0 1; }
    #volumes { height: auto; max-height: 50%; }
    #detail { height: auto; padding: 0 1; border-top: solid $primary-darken-2; }
    #info { height: auto; }
    .spark { height: 1; }
    .spark .what { width: 8; color: $text-muted; }
    .spark Sparkline { width: 1fr; }
    .spark .now { width: 14; padding: 0 0 0 1; }
    #alerts { height: auto; padding: 0 1; color: $error; text-style: bold; }
    #alerts.empty { display: none; }
    #events { height: 1fr; min-height: 3; border-top: solid $primary-darken-2; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", show=False, priority=True),  # textual's default only says "press ctrl+q"
        Binding("p", "toggle_pause", "Pause/resume"),
    ]

    def __init__(self, fetch: Fetch, toggle_pause: TogglePause, interval: float = 1.0) -> None:
        super().__init__()
        self._fetch, self._toggle, self.interval = fetch, toggle_pause, interval
        self.snapshot: Snapshot | None = None
        self.history = History()
        self.feed = EventFeed()
        self._keys: list[str] = []
        self._busy = False
        self._error: str | None = None
        self._trend_width = -1

    def compose(self) -> ComposeResult:
        yield Static("vdisk status: connecting...", id="top")
        yield VolumeTable(id="volumes", cursor_type="row", zebra_stripes=False)
        with Vertical(id="detail"):
            yield Static(id="info")
            with Horizontal(classes="spark"):
                yield Label("wire", classes="what")
                yield Sparkline([], id="wire")
                yield Label("", id="wire-now", classes="now")
            with Horizontal(classes="spark"):
                yield Label("buffer", classes="what")
                yield Sparkline([], id="buffer")
                yield Label("", id="buffer-now", classes="now")
        yield Static(id="alerts", classes="empty")
        log = RichLog(id="events", max_lines=2000, wrap=False, markup=False)
        log.can_focus = False  # the arrows always select a volume
        log.border_title = "events"
        yield log
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#volumes", DataTable).focus()
        self._build_columns()
        self.set_interval(self.interval, self.refresh_now)
        self.refresh_now()

    # fetching, off the event loop
    def refresh_now(self) -> None:
        if self._busy:  # the last fetch has not returned: a slow daemon is not asked twice
            return
        self._busy = True
        threading.Thread(target=self._fetch_in_thread, name="vdisk-fetch", daemon=True).start()

    def _fetch_in_thread(self) -> None:
        snap, err = None, None
        try:
            snap = self._fetch()
        except Exception as e:  # noqa: BLE001 - shown in the dashboard, the next tick retries
            err = str(e) or type(e).__name__
        try:
            self.call_from_thread(self._apply, snap, err)
        except RuntimeError:  # the app has quit meanwhile
            pass

    def _apply(self, snap: Snapshot | None, err: str | None) -> None:
        self._busy = False
        self._error = err
        if snap is not None and isinstance(snap, dict):
            self.snapshot = snap
            self.history.add(snap)
            self._update_table(snap)
            self._update_alerts(snap)
            log = self.query_one("#events", RichLog)
            for ev in self.feed.new(snap):
                log.write(event_text(ev))
        self._update_top()
        self._update_detail()

    def _update_top(self) -> None:
        snap = self.snapshot or {}
        vols = dig(snap, "volumes", default=[])
        text = Text.assemble(("vdisk ", "bold"), str(dig(snap, "data_dir", default="")),
                             f"  {len(vols)} volume{'s' if len(vols) != 1 else ''}",
                             ("  " + fmt_clock(snap.get("time")), "dim") if snap else "")
        if self._error:
            text.append(f"  {self._error}", "bold red")
        self.query_one("#top", Static).update(text)

    def _build_columns(self) -> None:
        """The columns, the trend as wide as the terminal allows; again after a resize."""
        width = max(3, self.size.width - FIXED_WIDTH)
        if width == self._trend_width:
            return
        self._trend_width = width
        table = self.query_one("#volumes", DataTable)
        table.clear(columns=True)
        for label, w in COLUMNS:
            table.add_column(label, key=label, width=w)
        label = TREND if width >= len(TREND) else "TREND" if width >= 5 else ""  # no "BUF" at 80 columns
        table.add_column(label, key=TREND, width=width)
        self._keys = []  # the rows are added again with the next snapshot (now, if there is one)
        if self.snapshot is not None:
            self._update_table(self.snapshot)

    def on_resize(self, _event: object) -> None:
        self._build_columns()

    def _trend(self, key: str) -> Text:
        if not key.startswith("v:"):
            return Text("")
        data = self.history.series(key[2:], "buffer")
        padded = [0.0] * (self.history.size - len(data)) + data
        return Text(spark_text(padded, self._trend_width) if data else "", "cyan")

    def _update_table(self, snap: Snapshot) -> None:
        table = self.query_one("#volumes", DataTable)
        new = [(key, (*cells, self._trend(key))) for key, cells in rows(snap)]
        keys = [k for k, _ in new]
        labels = [label for label, _ in COLUMNS] + [TREND]
        if keys == self._keys:
            for key, cells in new:
                for label, cell in zip(labels, cells, strict=True):
                    table.update_cell(key, label, cell)
            return
        selected = self.selected_key()
        table.clear()
        for key, cells in new:
            table.add_row(*cells, key=key)
        self._keys = keys
        if selected in keys:
            table.move_cursor(row=keys.index(selected), animate=False)

    def _update_alerts(self, snap: Snapshot) -> None:
        alerts = alerts_of(snap)
        widget = self.query_one("#alerts", Static)
        widget.set_class(not alerts, "empty")
        widget.update(Text("\n".join(f"ALERT {name}: {msg}" for name, msg in alerts)))

    def _update_detail(self) -> None:
        key = self.selected_key()
        item = find(self.snapshot, key)
        now = number(dig(self.snapshot, "time")) or time.time()
        self.query_one("#info", Static).update(Text("\n").join(detail_lines(item, now)))
        name = key.partition(":")[2] if key and key.startswith("v:") else None
        for what, fmt in (("wire", fmt_rate), ("buffer", fmt_size)):
            data = self.history.series(name, what) if name else []
            # A fixed time axis (the whole history, zeros before the first sample): the bars are
            # read against zero and a column is always the same span of time.
            self.query_one(f"#{what}", Sparkline).data = [0.0] * (self.history.size - len(data)) + data
            self.query_one(f"#{what}-now", Label).update(fmt(data[-1]) if data else "-")

    def selected_key(self) -> str | None:
        table = self.query_one("#volumes", DataTable)
        row = table.cursor_row
        return self._keys[row] if self._keys and 0 <= row < len(self._keys) else None

    def on_data_table_row_highlighted(self, _event: object) -> None:
        self._update_detail()

    # pause / resume
    def action_toggle_pause(self) -> None:
        key = self.selected_key()
        item = find(self.snapshot, key)
        if not key or not key.startswith("v:") or item is None:
            self.notify("select a volume first", severity="warning")
            return
        name, m = key[2:], mirror_of(item)
        if m is None or m.get("mode") != "async":
            self.notify(f"{name}: pause and resume apply to async mirrors", severity="warning")
            return
        pause = not is_paused(m)
        verb = "pause" if pause else "resume"
        self.query_one("#events", RichLog).write(
            Text.assemble((fmt_clock(time.time()) + " ", "dim"), f"{name}: {verb} requested", style="blue"))

        def run() -> None:
            try:
                self._toggle(name, pause)
            except Exception as e:  # noqa: BLE001 - the daemon's refusal, shown to the operator
                after: Callable[[], object] = partial(self._refused, f"{name}: {verb} failed: {e}")
            else:
                after = self.refresh_now  # show the new state now, not at the next tick
            try:
                self.call_from_thread(after)
            except RuntimeError:  # the app has quit meanwhile
                pass

        threading.Thread(target=run, name="vdisk-pause", daemon=True).start()

    def _refused(self, message: str) -> None:
        """A refused pause/resume: a toast to see now, a line in the log to find later."""
        self.notify(message, severity="error")
        self.query_one("#events", RichLog).write(
            Text.assemble((fmt_clock(time.time()) + " ", "dim"), (message, "red")))


def watch_command(args: argparse.Namespace, collect: Fetch, toggle_pause: TogglePause) -> int:
    """`vdisk status --watch`: the dashboard on a terminal, else the plain lines every --interval
    (--count times, or until interrupted)."""
    interval = float(getattr(args, "interval", None) or 1.0)
    count = getattr(args, "count", None)
    if not sys.stdout.isatty():
        return plain_watch(collect, interval, count, as_json=bool(getattr(args, "json", False)))
    collect()  # a bad name or data directory is one line on stderr, not an empty dashboard
    # Textual draws on the process's original stderr: with only stdout on the terminal
    # (`vdisk status --watch 2>log`) the screen would go into the file. Draw where stdout goes.
    saved = sys.__stderr__
    if not (saved is not None and saved.isatty()):
        sys.__stderr__ = sys.__stdout__
    try:
        Dashboard(collect, toggle_pause, interval).run()
    finally:
        sys.__stderr__ = saved
    return 0


def pause_basic(store: Any, name: str, pause: bool) -> None:
    """The dashboard's `p`: pause or resume through the daemon that serves ``name``."""
    from .control import ControlError, call
    from .mirror_cli import _daemon

    control = _daemon(store, name)
    if control is None:
        raise ControlError(f"volume {name!r} is not served (use `vdisk {'pause' if pause else 'resume'} {name}`)")
    call(control, "pause" if pause else "resume", name=name)
