"""`vdisk status [NAME...] [--json] [--check]`: one snapshot of a data directory (every volume, served
or not, and the replicas if a target keeps them here), its one-line-per-volume rendering, and the
monitoring-plugin verdict. The snapshot is the JSON of docs/CONTROL_API.md ("status snapshot"); the
live dashboard renders the same dict, so nothing here prints or sleeps.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Any

from blockdev.volume import VolumeStore
from mirror.reduce import summary

from .control import VERSION, ControlError, call
from .events import link_reason, pending_bytes
from .replicas import replica_section
from .target_status import target_replicas
from .units import format_rate, format_size

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
CHECK_WORDS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
SEVERITY = {OK: 0, WARNING: 1, UNKNOWN: 2, CRITICAL: 3}  # the verdict is the worst; critical wins
NO_ANSWER = "not served (the daemon does not answer"


def _offline(store: VolumeStore, name: str, why: str) -> dict[str, Any] | None:
    """A mirror nobody runs: what its metadata and files say, with the status keys of a live one."""
    from .mirror_cli import offline_status
    from .mirroring import alert_thresholds

    m = offline_status(store, name)
    if m is None:
        return None
    section = store.meta(name).extra.get("mirror") or {}
    if m["state"] != "split_brain":
        m["last_error"] = why
    try:
        rpo = alert_thresholds(section)[0]
    except ValueError:
        rpo = None
    return {**m, "link": {"connected": False, "since": None, "rtt_ms": None,
                          "reason": link_reason(m["state"], m["last_error"])},
            "rpo_seconds": rpo, "alerts": [], "resync": None, "last_ack": None, "last_progress": None}


def snapshot(store: VolumeStore, names: list[str] | None = None) -> dict[str, Any]:
    """Every named volume (default: all of the data directory); a replica (on a target's data
    directory) is reported as one, by the target if it runs."""
    requested = names or store.names()
    # store.meta: VolumeError for an unknown name (one line, exit 1)
    rep_names = [n for n in requested if replica_section(store.meta(n)) is not None]
    names = [n for n in requested if n not in rep_names]
    replies: dict[str, dict[str, Any] | str] = {}  # control address -> its status reply, or why not
    volumes, events = [], []
    for name in names:
        meta = store.meta(name)
        holder = store.holder(name)
        addr = holder.get("control") if holder else None
        rec: dict[str, Any] = {"name": name, "uuid": meta.uuid, "size": meta.size, "served": False, "mirror": None}
        if addr and addr not in replies:
            try:
                replies[addr] = call(addr, "status", timeout=10.0)
                events += replies[addr].get("events", [])
            except ControlError as e:
                replies[addr] = str(e)
        reply = replies.get(addr) if addr else None
        live = next((v for v in reply["volumes"] if v["name"] == name), None) if isinstance(reply, dict) else None
        if live is not None:
            rec.update(served=True, read_only=live.get("read_only"), io=live.get("io"), mirror=live.get("mirror"))
        else:
            why = "not served" if not addr else f"{NO_ANSWER}: {reply})"
            rec["mirror"] = _offline(store, name, why)
        volumes.append(rec)
    events = [e for e in events if e.get("volume") in set(names)]
    replicas: list[dict[str, Any]] = []
    if rep_names:
        replicas, target_events = target_replicas(store)
        replicas = [r for r in replicas if r["name"] in rep_names]
        events += [e for e in target_events if e.get("volume") in rep_names]
    return {"version": VERSION, "time": time.time(), "data_dir": str(store.root), "volumes": volumes,
            "replicas": replicas, "events": sorted(events, key=lambda e: e["time"])}


def when(t: float | None, now: float) -> str:
    """'12:03:04 (2m 5s ago)': a time an operator can compare with the clock and the logs."""
    if not t:
        return "never"
    ago = max(0.0, now - t)
    span = f"{ago:.0f}s" if ago < 60 else f"{ago // 60:.0f}m {ago % 60:02.0f}s" if ago < 3600 else f"{ago / 3600:.1f}h"
    return f"{dt.datetime.fromtimestamp(t).strftime('%H:%M:%S')} ({span} ago)"


def line(vol: dict[str, Any], now: float) -> str:
    """One line per volume: vol1  async  lagging  buffer 246.7 MiB  lag 3.1 s  wire ...  ETA 21 s."""
    from .mirror_cli import async_line

    m = vol.get("mirror")
    name = vol["name"]
    if m is None:
        return f"{name}  not mirrored  {'served' if vol.get('served') else 'not served'}"
    if m.get("mode") == "async":
        parts = [async_line(name, m)]
        red = summary(m.get("reduction"))
        if red:
            parts.append(f"reduction {red}")
    else:
        init = m.get("initial_sync") or {}
        parts = [name, "sync", str(m.get("state")), f"dirty {format_size(m.get('dirty_bytes', 0))}",
                 f"to {m.get('target')}"]
        if init and not init.get("done") and init.get("total_bytes"):
            parts.append(f"initial sync {init.get('percent', 0)}%")
        if m.get("state") in ("split_brain",) and m.get("last_error"):
            parts.append(f"({m['last_error']})")
        parts = ["  ".join(parts)]
    resync = m.get("resync")
    if resync:
        total = resync["total_bytes"]
        pct = 100.0 * resync["done_bytes"] / total if total else 100.0
        eta = resync.get("eta_seconds")
        parts.append(f"resync {format_size(resync['done_bytes'])}/{format_size(total)} {pct:.0f}%  "
                     f"{format_rate(resync.get('rate')) if resync.get('rate') else '- B/s'}  "
                     f"ETA {'-' if eta is None else f'{eta:.0f} s'}")
    link = m.get("link") or {}
    if link and not link.get("connected"):
        reason = link.get("reason") or "disconnected"
        since = f" since {when(link['since'], now)}" if link.get("since") else ""
        if m.get("state") != "split_brain":
            parts.append(f"disconnected: {reason}{since}")
        parts.append(f"last ack {when(m.get('last_ack'), now)}")
    for a in m.get("alerts") or ():
        parts.append(f"ALERT {a['message']}")
    return "  ".join(parts)


def render(snap: dict[str, Any]) -> str:
    """The plain text of a snapshot: one line per volume, then one per replica."""
    now = snap["time"]
    out = [line(v, now) for v in snap["volumes"]]
    for r in snap["replicas"]:
        src = r.get("source") or {}
        cp = r.get("last_checkpoint") or {}
        link = (f"connected since {when(r['connected_since'], now)}" if r["connected"] else
                f"disconnected{' since ' + when(r['disconnected_since'], now) if r.get('disconnected_since') else ''}")
        mode = f"  {r['mode']}" if r.get("mode") else ""
        # The target cannot tell an idle source from a slow link: the checkpoint's age bounds the lag.
        age = "" if r.get("lag_seconds") is None or r.get("mode") == "sync" else f"  age {r['lag_seconds']:.1f} s"
        cps = f"  checkpoint {cp['id']} at {when(cp.get('time'), now)}" if cp.get("id") else ""
        out.append(f"{r['name']}  replica of {src.get('name')!r} from {src.get('addr') or '?'}{mode}  {link}{cps}{age}")
    if not out:
        out.append(f"no volumes in {snap['data_dir']}")
    return "\n".join(out)


def check(snap: dict[str, Any], rpo: float | None, stall: float) -> tuple[int, str]:
    """The monitoring-plugin verdict: the worst volume's code and a one-line reason. CRITICAL for a
    split brain, a disconnected mirror or lag past the RPO; WARNING for no progress while data is
    pending for ``stall`` seconds; UNKNOWN when the daemon holding a volume does not answer. ``rpo``
    None: each mirror's own ``--rpo`` (if any)."""
    now = snap["time"]
    problems: list[tuple[int, str]] = []
    mirrored = 0
    for v in snap["volumes"]:
        m = v.get("mirror")
        if m is None:
            continue
        mirrored += 1
        name, state = v["name"], m.get("state")
        link = m.get("link") or {}
        limit = rpo if rpo is not None else m.get("rpo_seconds")
        lag = m.get("lag_seconds")
        if str(m.get("last_error")).startswith(NO_ANSWER):
            problems.append((UNKNOWN, f"{name}: {m['last_error']}"))
        elif state == "split_brain":
            problems.append((CRITICAL, f"{name} split brain"))
        elif not link.get("connected", state not in ("disconnected", "degraded")):
            problems.append((CRITICAL, f"{name} disconnected ({link.get('reason') or state})"))
        if limit is not None and lag is not None and lag > limit:
            problems.append((CRITICAL, f"{name} lag {lag:.1f} s past the RPO of {limit:g} s"))
        progress = m.get("last_progress")
        pending = pending_bytes(m)
        if pending and progress is not None and now - progress >= stall:
            paused = " (paused)" if state == "paused" else ""
            stalled = f"{name} no progress for {now - progress:.0f} s with {format_size(pending)} pending{paused}"
            problems.append((WARNING, stalled))
    if not problems:
        return OK, f"{mirrored} mirror{'s' if mirrored != 1 else ''} ok"
    problems.sort(key=lambda p: -SEVERITY[p[0]])
    return problems[0][0], "; ".join(t for _, t in problems)
