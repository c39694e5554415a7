"""What an operator is told about a daemon's mirrors: a bounded ring of events (state changes,
alerts raised and cleared) and, per mirror, a watch that turns successive status snapshots into
those events, the link's history and the RPO / stall alerts.

Pure but for the logger: the watch is fed snapshots and a clock value, so tests need no daemon.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import asdict, dataclass
from typing import Any

from .units import format_size

EVENTS_KEPT = 256
DEFAULT_STALL = 120.0  # seconds without progress while data is pending
# States in which no link to the target exists.
DOWN_STATES = ("disconnected", "degraded", "split_brain", "stopped")
# Link reasons no retry can end: the operator must act (a --wait stops at once on these).
PERMANENT = ("authentication failed", "version mismatch", "size mismatch", "refused", "split brain")
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass(frozen=True)
class Event:
    time: float
    volume: str
    level: str  # info | warning | error
    message: str


class EventRing:
    """The last ``size`` events of a daemon, oldest first; each is logged once as it is added."""

    def __init__(self, logger: logging.Logger, size: int = EVENTS_KEPT) -> None:
        self.logger = logger
        self._ring: collections.deque[Event] = collections.deque(maxlen=size)

    def add(self, now: float, volume: str, level: str, message: str, logged: bool = True) -> Event:
        """``logged=False``: the line is in the log already (the replicator wrote it as it happened)."""
        ev = Event(now, volume, level, message)
        self._ring.append(ev)
        if logged:
                self.logger.log(LEVELS[level], "%s: %s", f"volume {volume}" if volume else "target", message)
        return ev

    def list(self, volumes: set[str] | None = None) -> list[dict[str, Any]]:
        return [asdict(e) for e in self._ring if volumes is None or e.volume in volumes]


# Words of a link refused for its security (mirror/secure.py): shown whole, they say what to do.
TLS_REFUSALS = ("certificate", "requires tls", "not use tls", "speak tls")


def link_reason(state: str | None, last_error: str | None) -> str | None:
    """Why a mirror has no link, in the words of `vdisk status`; None while it has one."""
    if state not in DOWN_STATES:
        return None
    err = (last_error or "").lower()
    if state == "split_brain" or "split brain" in err:
        return "split brain"
    if state == "stopped":
        return "stopped"
    if any(w in err for w in TLS_REFUSALS):
        return f"refused: {last_error}"  # a TLS refusal: the whole reason (which fingerprint, what to do)
    for word in ("not served", "authentication failed", "version mismatch", "size mismatch"):
        if word in err:
            return word
    # The target said no (ErrorMsg): permanent unless it is busy (a takeover) or its own disk failed.
    if err.startswith("peer: ") and not any(w in err for w in ("busy", "i/o error", "internal error")):
        return "refused"
    return "connecting" if not err else f"connecting ({last_error})"


def pending_bytes(st: dict[str, Any]) -> int:
    """What the replica lacks: the async buffer, or the sync dirty map."""
    return int(st.get("buffer_bytes", st.get("dirty_bytes", 0)) or 0)


def _progress_key(st: dict[str, Any]) -> tuple[Any, ...]:
    cp = (st.get("last_checkpoint") or {}).get("id")
    return (st.get("acked_seq"), st.get("shipped_seq"), cp, st.get("chunk_bytes_sent"), st.get("resync_bytes_sent"))


class MirrorWatch:
    """One mirror's history, fed a status snapshot about once a second (``update``); ``annotate``
    adds what a single snapshot cannot say: link since, last progress, alerts, resync progress."""

    def __init__(self, name: str, ring: EventRing) -> None:
        self.name, self.ring = name, ring
        self.state: str | None = None
        self.connected: bool | None = None
        self.since: float | None = None  # of the current connected / disconnected spell
        self.reason: str | None = None
        self.last_ack: float | None = None  # the last time the replica acknowledged all it had been sent
        self.last_progress: float | None = None
        self._key: tuple[Any, ...] | None = None
        self.alerts: dict[str, dict[str, Any]] = {}  # kind -> {"kind", "since", "message"}
        self._resync: tuple[float, int] | None = None  # (start, bytes pending at start)
        self._rate: tuple[float, int] | None = None  # (time, pending) of the previous sample
        self.rate = 0.0
        self._overflows = 0
        self._window: str | None = None
        self._out_since: float | None = None  # when it last left in_sync (or was first seen out of it)
        self._sent_base = 0  # the resync/chunk byte counter when it was last in sync
        self._spell: set[str] = {"disconnected"}  # the states since it was last in sync

    def _event(self, now: float, level: str, message: str, logged: bool = True) -> None:
        self.ring.add(now, self.name, level, message, logged)

    def update(self, st: dict[str, Any], now: float, rpo: float | None, stall: float = DEFAULT_STALL) -> None:
        state = str(st.get("state"))
        pending = pending_bytes(st)
        reason = link_reason(state, st.get("last_error"))
        self._link(st, now, state, reason)
        self._state(st, now, state, reason is None)
        self._progress(st, now, state, pending, reason is None)
        overflows = int(st.get("overflows") or 0)
        if overflows > self._overflows:  # the replicator logged it
            self._event(now, "warning", "the source buffer is full: new writes are tracked in the dirty map",
                        logged=False)
        self._overflows = overflows
        window = (st.get("schedule") or {}).get("window")
        if window != self._window:
            self._event(now, "info", f"schedule window {window} opened" if window else
                        f"schedule window {self._window} closed")
            self._window = window
        self._evaluate(st, now, rpo, stall, pending, reason is None, reason)

    def _link(self, st: dict[str, Any], now: float, state: str, reason: str | None) -> None:
        connected = reason is None
        if connected == self.connected and (connected or reason == self.reason):
            return
        if connected:  # the replicator logged these two
            self._event(now, "info", f"connected to {st.get('target')}", logged=False)
        elif state == "split_brain":
            self._event(now, "error", f"split brain: {st.get('last_error')}", logged=False)
        elif self.connected is not None or reason != "connecting":  # not a first "connecting" at start
            # Not logged: the replicator logs each new link error itself (once, then every few minutes).
            self._event(now, "warning", f"disconnected from {st.get('target')}: {reason}", logged=False)
        if connected != self.connected:
            self.since = now
        self.connected, self.reason = connected, reason

    def _state(self, st: dict[str, Any], now: float, state: str, connected: bool) -> None:
        sent = int(st.get("resync_bytes_sent", st.get("chunk_bytes_sent", 0)) or 0)
        if sent < self._sent_base:  # a new replicator (mode switch): its counters start at 0
            self._sent_base = 0
        if state == self.state:
            return
        if state == "in_sync":
            # An async mirror under writes goes lagging <-> in_sync all the time: that is no news.
            if self._spell - {"lagging"}:
                took = f" in {now - self._out_since:.1f} s" if self._out_since is not None else ""
                moved = f", {format_size(sent - self._sent_base)} resent" if sent > self._sent_base else ""
                self._event(now, "info", f"in sync{moved}{took}")
            self._sent_base, self._out_since, self._spell = sent, None, set()
        else:
            if self._out_since is None:
                self._out_since = now
            self._spell.add(state)
            if state == "degraded" or connected and state in ("paused", "scheduled", "catching_up"):
                self._event(now, "warning" if state == "degraded" else "info", state.replace("_", " "))
        self.state = state

    def _progress(self, st: dict[str, Any], now: float, state: str, pending: int, connected: bool) -> None:
        """Resync extent and drain rate, the last progress and the last full acknowledgement."""
        if state in ("syncing", "catching_up") and pending:
            if self._resync is None or pending > self._resync[1]:
                self._resync = (now if self._resync is None else self._resync[0], pending)
        elif state == "in_sync":
            self._resync = None
        if self._rate is not None and now > self._rate[0]:
            drained = max(0, self._rate[1] - pending) / (now - self._rate[0])
            self.rate = 0.8 * self.rate + 0.2 * drained if self.rate else drained
        self._rate = (now, pending)
        key = _progress_key(st)
        if not pending or key != self._key or self.last_progress is None:
            self.last_progress = now
        self._key = key
        if connected and (state == "in_sync" or st.get("in_flight") == 0 and key[0] is not None):
            self.last_ack = now
        cp_time = (st.get("last_checkpoint") or {}).get("time")
        if cp_time:
            self.last_ack = max(self.last_ack or 0.0, float(cp_time))

    def _evaluate(self, st: dict[str, Any], now: float, rpo: float | None, stall: float, pending: int,
                  connected: bool, reason: str | None) -> None:
        lag = st.get("lag_seconds")
        want: dict[str, str] = {}
        if rpo is not None and lag is not None and lag > rpo:
            want["rpo"] = f"lag {lag:.1f} s is past the RPO of {rpo:g} s"
        if pending and self.last_progress is not None and now - self.last_progress >= stall:
            want["stall"] = (f"no progress for {now - self.last_progress:.0f} s with "
                             f"{format_size(pending)} pending")
        if reason == "split brain":
            want["split_brain"] = f"split brain: {st.get('last_error')}"
        elif not connected and self.since is not None and (
                not str(reason).startswith("connecting") or now - self.since >= stall):  # retries get ``stall`` s
            want["disconnected"] = f"disconnected since {now - self.since:.0f} s: {reason}"
        for kind, message in want.items():
            if kind not in self.alerts:
                self.alerts[kind] = {"kind": kind, "since": now, "message": message}
                self._event(now, "error" if kind in ("split_brain", "rpo") else "warning", f"alert raised: {message}",
                            logged=kind != "split_brain")  # the replicator logged the split brain
            else:
                self.alerts[kind]["message"] = message
        for kind in [k for k in self.alerts if k not in want]:
            del self.alerts[kind]
            self._event(now, "info", f"alert cleared: {kind.replace('_', ' ')}", logged=kind != "split_brain")

    def annotate(self, st: dict[str, Any], rpo: float | None) -> dict[str, Any]:
        """The snapshot with the link, RPO, alerts and resync progress (the status JSON keys)."""
        reason = link_reason(str(st.get("state")), st.get("last_error"))
        pending = pending_bytes(st)
        resync = None
        if self._resync is not None and pending and str(st.get("state")) in ("syncing", "catching_up"):
            total = self._resync[1]
            resync = {"done_bytes": max(0, total - pending), "total_bytes": total, "rate": round(self.rate, 1),
                      "eta_seconds": round(pending / self.rate, 1) if self.rate > 0 else None}
        return {**st, "link": {"connected": reason is None, "since": self.since, "rtt_ms": st.get("rtt_ms") if reason is None else None,
                         "reason": reason},
                "rpo_seconds": rpo, "alerts": list(self.alerts.values()), "resync": resync,
                "last_ack": self.last_ack, "last_progress": self.last_progress}
