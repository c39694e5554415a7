"""When the async mirror may ship, and how fast: ``--schedule`` windows and ``--ship-at`` instants.

Pure functions of an aware ``datetime``: no clock is read here, so the shipper asks ``window(now)``
and sleeps until ``next_change``, and tests pass any instant and any zone.

Grammar of ``--schedule`` (entries separated by ``;``, a trailing ``;`` is fine)::

    SCHEDULE := ENTRY { ";" ENTRY }
    ENTRY    := DAYS WINDOW ACTION
    DAYS     := "*" | DAYSPEC { "," DAYSPEC }
    DAYSPEC  := DAY | DAY "-" DAY            (a range may wrap: fri-mon is fri, sat, sun, mon)
    DAY      := mon | tue | wed | thu | fri | sat | sun   (case-insensitive)
    WINDOW   := HH:MM "-" HH:MM              (00:00..23:59; 24:00 allowed as an end)
    ACTION   := "rate=" RATE | "pause"       (RATE as --rate: 2Mbit, 10MB/s, unlimited, ...)

    e.g. "mon-fri 08:00-18:00 rate=1Mbit; * 18:00-08:00 rate=unlimited; sat,sun 00:00-24:00 pause"

- A window whose end is not after its start crosses midnight and belongs to the day it starts on
  (``fri 22:00-06:00`` runs from Friday 22:00 to Saturday 06:00); ``00:00-24:00`` is the whole day.
- Where windows overlap, the first entry listed wins.
- Outside every window the mirror's own ``--rate`` applies (``Window.rate == "default"``).
- Times are local wall-clock times. On a spring-forward day a boundary inside the skipped hour happens
  at the first instant after the gap; on a fall-back day an ambiguous boundary is its first occurrence.

``--ship-at 02:00,14:00`` lists wall-clock times at which an accumulated journal is shipped; the same
DST rules apply. All arithmetic is done on POSIX timestamps, because aware datetimes that share a
``tzinfo`` compare by wall time and get the ambiguous hour wrong; wall times are read in ``now``'s zone
when it is a ZoneInfo (it has DST rules), else in the system zone (``datetime.now().astimezone()``
carries only today's fixed offset), and results are aware datetimes in that zone.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Literal
from zoneinfo import ZoneInfo

from vdisk.units import parse_clock, parse_rate

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY = 86400.0
_HORIZON_DAYS = 8  # the schedule repeats weekly: if nothing changes within 8 days, nothing ever does


def local_zone() -> dt.tzinfo:
    """The system's zone with its DST rules: $TZ, else /etc/localtime, else today's fixed offset."""
    key = os.environ.get("TZ", "").lstrip(":")
    if key:
        try:
            return ZoneInfo(key)
        except (ValueError, OSError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return ZoneInfo.from_file(f)
    except (ValueError, OSError):
        tz = dt.datetime.now().astimezone().tzinfo
        return tz if tz is not None else dt.UTC


def zone_for(now: dt.datetime, tz: dt.tzinfo | None = None) -> dt.tzinfo:
    """The zone whose wall clock applies: ``tz`` if given, else ``now.tzinfo`` when it has DST rules
    (a ZoneInfo), else the system zone (``datetime.now().astimezone()`` carries only a fixed offset)."""
    if tz is not None:
        return tz
    if now.tzinfo is None or isinstance(now.tzinfo, dt.timezone):
        return local_zone()
    return now.tzinfo


def _offset(ts: float, tz: dt.tzinfo) -> dt.timedelta | None:
    return dt.datetime.fromtimestamp(ts, tz).utcoffset()


def wall_to_timestamp(day: dt.date, minutes: int, tz: dt.tzinfo) -> float:
    """The instant of a wall-clock time: the first instant after a DST gap if it does not exist, its
    first occurrence if it is ambiguous. ``minutes`` may be 1440 (24:00 = next day's 00:00)."""
    day, minutes = day + dt.timedelta(days=minutes // 1440), minutes % 1440
    wall = dt.datetime(day.year, day.month, day.day, minutes // 60, minutes % 60)
    first = wall.replace(tzinfo=tz, fold=0)
    ts = first.timestamp()
    if dt.datetime.fromtimestamp(ts, tz).replace(tzinfo=None) == wall:
        return ts  # exists; fold=0 is the first occurrence of an ambiguous time
    # In a gap: the two folds give instants on either side of the transition; find it (whole seconds).
    a, b = sorted((ts, wall.replace(tzinfo=tz, fold=1).timestamp()))
    lo, hi, after = int(a), int(b) + 1, _offset(b, tz)
    while hi - lo > 1:  # invariant: lo is before the transition, hi is at or after it
        mid = (lo + hi) // 2
        if _offset(mid, tz) == after:
            hi = mid
        else:
            lo = mid
    return float(hi)


def _bad(problem: str, entry: str) -> ValueError:
    return ValueError(f"invalid --schedule: {problem} in entry {entry!r}")


def _parse_day(name: str, entry: str) -> int:
    try:
        return DAYS.index(name.lower())
    except ValueError:
        raise _bad(f"unknown day {name!r}", entry) from None


def _parse_days(text: str, entry: str) -> frozenset[int]:
    if text == "*":
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        if not part:
            raise _bad(f"empty day in {text!r}", entry)
        if "-" in part:
            first, _, last = part.partition("-")
            a, b = _parse_day(first, entry), _parse_day(last, entry)
            days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
        else:
            days.add(_parse_day(part, entry))
    return frozenset(days)


def _parse_time(text: str, entry: str, *, end: bool) -> int:
    try:
        hour, minute = parse_clock(text, allow_24=end)
    except ValueError:
        raise _bad(f"bad time {text!r} (use HH:MM, 00:00 to 24:00)", entry) from None
    return hour * 60 + minute


@dataclass(frozen=True)
class Window:
    """What the schedule says at one instant, and until when at most."""

    paused: bool
    rate: float | None | Literal["default"]  # bytes/s; None = unlimited; "default" = the mirror's --rate
    label: str  # the winning entry's normalised text, "" outside every window
    next_change: dt.datetime | None  # when window() may answer differently next; None: never


@dataclass(frozen=True)
class _Entry:
    days: frozenset[int]
    start: int  # minutes after local midnight
    end: int  # minutes after the start day's midnight (> start; up to 2880 when crossing midnight)
    paused: bool
    rate: float | None
    label: str

    def occurrences(self, first: dt.date, ndays: int, tz: dt.tzinfo) -> list[tuple[float, float]]:
        out = []
        for i in range(ndays):
            day = first + dt.timedelta(days=i)
            if day.weekday() in self.days:
                out.append((wall_to_timestamp(day, self.start, tz), wall_to_timestamp(day, self.end, tz)))
        return out


def _parse_entry(entry: str) -> _Entry:
    parts = entry.split()
    if len(parts) < 2:
        raise _bad("missing window (HH:MM-HH:MM)", entry)
    if len(parts) < 3:
        raise _bad("missing action (rate=RATE or pause)", entry)
    if len(parts) > 3:
        raise _bad(f"unexpected {parts[3]!r} (one action per entry)", entry)
    days_text, window, action = parts[0].lower(), parts[1], parts[2]
    days = _parse_days(days_text, entry)
    start_text, dash, end_text = window.partition("-")
    if not dash:
        raise _bad(f"bad window {window!r} (use HH:MM-HH:MM)", entry)
    start = _parse_time(start_text, entry, end=False)
    end = _parse_time(end_text, entry, end=True)
    if end <= start:
        end += 1440  # crosses midnight; belongs to the day it starts on
    low = action.lower()
    if low == "pause":
        return _Entry(days, start, end, True, None, f"{days_text} {window} pause")
    if low.startswith("rate="):
        try:
            rate = parse_rate(action[5:])
        except ValueError:
            raise _bad(f"bad rate {action[5:]!r} (use e.g. 2Mbit, 10MB/s or unlimited)", entry) from None
        return _Entry(days, start, end, False, rate, f"{days_text} {window} rate={action[5:]}")
    raise _bad(f"unknown action {action!r} (use rate=RATE or pause)", entry)


class Schedule:
    """Parsed ``--schedule``: ``window(now)`` says whether to pause or which rate applies."""

    def __init__(self, entries: tuple[_Entry, ...], tz: dt.tzinfo | None = None) -> None:
        self._entries = entries
        self.tz = tz  # None: the zone of each ``now`` (see zone_for)
        self.text = "; ".join(e.label for e in entries)

    @classmethod
    def parse(cls, spec: str, tz: dt.tzinfo | None = None) -> Schedule:
        """ValueError naming the bad token; an empty spec is a schedule with no windows."""
        pieces = [p.strip() for p in str(spec).split(";")]
        if len(pieces) > 1 and not pieces[-1]:
            pieces.pop()  # a trailing ';'
        if pieces == [""]:
            return cls((), tz)
        for p in pieces:
            if not p:
                raise ValueError(f"invalid --schedule: empty entry in {str(spec).strip()!r}")
        return cls(tuple(_parse_entry(p) for p in pieces), tz)

    def _state(self, ts: float, occ: list[list[tuple[float, float]]]) -> tuple[bool, float | None | str, str]:
        for entry, spans in zip(self._entries, occ):
            if any(a <= ts < b for a, b in spans):
                return entry.paused, entry.rate, entry.label
        return False, "default", ""

    def window(self, now: dt.datetime) -> Window:
        """The window at ``now`` (aware) and the next instant at which the answer changes."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("Schedule.window needs an aware datetime (e.g. datetime.now().astimezone())")
        ts, tz = now.timestamp(), zone_for(now, self.tz)
        today = now.astimezone(tz).date()
        first = today - dt.timedelta(days=2)  # a window started at most ~25 h ago may still be open
        ndays = 2 + _HORIZON_DAYS + 2
        occ = [e.occurrences(first, ndays, tz) for e in self._entries]
        state = self._state(ts, occ)
        horizon = wall_to_timestamp(today + dt.timedelta(days=_HORIZON_DAYS), 0, tz)
        bounds = sorted({t for spans in occ for span in spans for t in span if ts < t <= horizon})
        nxt = next((b for b in bounds if self._state(b, occ) != state), None)
        paused, rate, label = state
        return Window(paused, rate, label,  # type: ignore[arg-type]
                      None if nxt is None else dt.datetime.fromtimestamp(nxt, tz))

    def __repr__(self) -> str:
        return f"Schedule.parse({self.text!r})"


class ShipAt:
    """Parsed ``--ship-at 02:00,14:00``: the wall-clock times at which the journal is shipped."""

    def __init__(self, times: tuple[int, ...], tz: dt.tzinfo | None = None) -> None:
        self._times = times  # minutes after midnight, sorted, unique
        self.tz = tz  # None: the zone of each ``now`` (see zone_for)
        self.text = ",".join(f"{m // 60:02d}:{m % 60:02d}" for m in times)

    @classmethod
    def parse(cls, text: str, tz: dt.tzinfo | None = None) -> ShipAt:
        """ValueError naming the bad token."""
        times = set()
        for part in str(text).split(","):
            try:
                hour, minute = parse_clock(part)
            except ValueError:
                raise ValueError(f"invalid --ship-at: bad time {part.strip()!r} in {str(text).strip()!r} "
                                 "(use HH:MM or a comma list, e.g. 02:00,14:00)") from None
            times.add(hour * 60 + minute)
        return cls(tuple(sorted(times)), tz)

    def next_after(self, now: dt.datetime) -> dt.datetime:
        """The next ship instant strictly after ``now`` (aware), in its zone (see ``zone_for``)."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("ShipAt.next_after needs an aware datetime (e.g. datetime.now().astimezone())")
        ts, tz = now.timestamp(), zone_for(now, self.tz)
        today = now.astimezone(tz).date()
        best = min(t for i in range(-1, 3) for m in self._times
                   if (t := wall_to_timestamp(today + dt.timedelta(days=i), m, tz)) > ts)
        return dt.datetime.fromtimestamp(best, tz)

    def __repr__(self) -> str:
        return f"ShipAt.parse({self.text!r})"
