"""The async mirror's pure parts: TokenBucket, --schedule windows, --ship-at instants, rate units."""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.schedule import Schedule, ShipAt, Window
from mirror.throttle import TokenBucket
from vdisk.units import format_rate, parse_rate

BERLIN = ZoneInfo("Europe/Berlin")
UTC = dt.UTC
KIB, MIB = 1024, 1 << 20
KBIT = 1000 / 8  # bytes/s
MBIT, GBIT = KBIT * 1000, KBIT * 1000_000


def berlin(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, fold: int = 0) -> dt.datetime:
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=BERLIN, fold=fold)


def ts(when: dt.datetime | None) -> float:
    """Instants compared as instants: datetimes in a repeated (fall-back) hour are never == across zones."""
    assert when is not None and when.utcoffset() is not None
    return when.timestamp()


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> dt.datetime:
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=UTC)


# --- TokenBucket on a simulated clock -------------------------------------------------------------

def simulate(bucket: TokenBucket, frame: int, until: float, *, jitter: float = 0.0,
             changes: dict[float, float | None] | None = None) -> list[tuple[float, int]]:
    """A shipper that waits what reserve() says (plus some oversleep), then sends; (send time, bytes)."""
    pending = sorted((changes or {}).items())
    sends: list[tuple[float, int]] = []
    t, i = 0.0, 0
    while t < until:
        while pending and pending[0][0] <= t:
            when, rate = pending.pop(0)
            bucket.set_rate(rate, when)
        wait = bucket.reserve(frame, t)
        assert wait >= 0.0
        t += wait + (jitter * ((i * 7919) % 13) / 13 if wait else 0.0)
        if bucket.rate is None:
            t += 0.001  # unlimited: the link itself takes some time
        i += 1
        if t < until:
            sends.append((t, frame))
    return sends


def sent_between(sends: list[tuple[float, int]], a: float, b: float) -> int:
    return sum(n for t, n in sends if a <= t < b)


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(min_value=64 * KBIT, max_value=10 * GBIT),
       fraction=st.floats(min_value=0.002, max_value=0.5),
       jitter=st.sampled_from([0.0, 0.001, 0.005]))
def test_bucket_rate_within_ten_percent_over_ten_seconds(rate: float, fraction: float, jitter: float) -> None:
    frame = max(1, min(4 * MIB, int(rate * fraction)))  # frames up to 4 MiB and half a second of link
    sends = simulate(TokenBucket(rate), frame, 10.0, jitter=jitter)
    assert 0.9 <= sent_between(sends, 0.0, 10.0) / (rate * 10) <= 1.1


@pytest.mark.parametrize("rate", [64 * KBIT, 1 * MBIT, 100 * MBIT, 10 * GBIT])
def test_bucket_with_4mib_frames_holds_the_rate_over_the_frames_own_time(rate: float) -> None:
    """A 4 MiB frame is 9 minutes at 64 kbit/s: the average holds over a window of 20 frames' time."""
    window = max(10.0, 20 * 4 * MIB / rate)
    sends = simulate(TokenBucket(rate), 4 * MIB, window)
    assert 0.9 <= sent_between(sends, 0.0, window) / (rate * window) <= 1.1


def test_bucket_first_frame_goes_at_once_then_debt_is_waited_off() -> None:
    b = TokenBucket(1 * MBIT, burst=64 * KIB)
    assert b.reserve(64 * KIB, 100.0) == 0.0
    assert b.reserve(125_000, 100.0) == pytest.approx(1.0)
    assert b.reserve(0, 100.5) == pytest.approx(0.5)  # half of the debt repaid meanwhile


@pytest.mark.parametrize("old,new", [(10 * MBIT, 1 * MBIT), (1 * MBIT, 100 * MBIT), (64 * KBIT, 1 * GBIT),
                                     (1 * GBIT, 64 * KBIT), (None, 2 * MBIT), (2 * MBIT, None)])
def test_set_rate_applies_within_one_second(old: float | None, new: float | None) -> None:
    frame = 8 * KIB
    bucket = TokenBucket(old)
    if new is None:
        assert old is not None
        sends = simulate(bucket, frame, 6.5, changes={5.0: None})
        assert sent_between(sends, 6.0, 6.5) > 10 * old * 0.5  # unthrottled: only the link's own time
        assert bucket.reserve(4 * MIB, 6.0) == 0.0 and bucket.rate is None
        return
    sends = simulate(bucket, frame, 16.0, changes={5.0: new})
    assert bucket.rate == new
    assert 0.9 <= sent_between(sends, 6.0, 16.0) / (new * 10) <= 1.1


def test_set_rate_caps_tokens_at_the_new_burst() -> None:
    b = TokenBucket(1 * GBIT)
    b.reserve(0, 0.0)
    b.set_rate(64 * KBIT, 10.0)  # a full 1 Gbit/s burst would be 100 MB at 64 kbit/s
    assert b.reserve(int(b.burst) + 8000, 10.0) == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64 * MIB), st.floats(0, 1e6)), max_size=50))
def test_unlimited_never_waits(reservations: list[tuple[int, float]]) -> None:
    b = TokenBucket(None)
    assert b.rate is None
    for nbytes, now in reservations:
        assert b.reserve(nbytes, now) == 0.0


def test_unlimited_after_debt_never_waits() -> None:
    b = TokenBucket(64 * KBIT)
    assert b.reserve(4 * MIB, 0.0) > 500
    b.set_rate(None, 1.0)
    assert b.reserve(4 * MIB, 1.0) == 0.0


@pytest.mark.parametrize("rate", [0, -1.0, float("nan"), float("inf")])
def test_bad_rates_are_refused(rate: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate)
    with pytest.raises(ValueError):
        TokenBucket(None).set_rate(rate, 0.0)


def test_bucket_under_trio_mock_clock() -> None:
    """The shipper's loop, awaiting reserve()'s answer on trio's virtual clock."""
    rate, frame, frames = 2 * MBIT, 64 * KIB, 200
    bucket = TokenBucket(rate)
    sent_at: list[float] = []

    async def shipper() -> None:
        for _ in range(frames):
            await trio.sleep(bucket.reserve(frame, trio.current_time()))
            sent_at.append(trio.current_time())
        bucket.set_rate(20 * MBIT, trio.current_time())
        start = trio.current_time()
        for _ in range(frames):
            await trio.sleep(bucket.reserve(frame, trio.current_time()))
        sent_at.append(trio.current_time() - start)

    trio.run(shipper, clock=trio.testing.MockClock(autojump_threshold=0))
    elapsed = sent_at[frames - 1] - sent_at[0]
    assert elapsed == pytest.approx((frames - 1) * frame / rate, rel=0.1)
    assert sent_at[-1] == pytest.approx(frames * frame / (20 * MBIT), rel=0.1)


# --- Schedule -------------------------------------------------------------------------------------

SPEC = "mon-fri 08:00-18:00 rate=1Mbit; * 18:00-08:00 rate=unlimited; sat,sun 00:00-24:00 pause"
# 2026-12-02 is a Wednesday; 2026-12-05 a Saturday.


def test_example_spec_weekday_windows() -> None:
    s = Schedule.parse(SPEC)
    w = s.window(berlin(2026, 12, 2, 10, 0))
    assert w == Window(False, 125_000.0, "mon-fri 08:00-18:00 rate=1Mbit", berlin(2026, 12, 2, 18, 0))
    w = s.window(berlin(2026, 12, 2, 19, 0))
    assert (w.paused, w.rate, w.next_change) == (False, None, berlin(2026, 12, 3, 8, 0))
    assert w.label == "* 18:00-08:00 rate=unlimited"


def test_example_spec_first_match_wins_on_the_weekend() -> None:
    s = Schedule.parse(SPEC)
    w = s.window(berlin(2026, 12, 5, 3, 0))  # Friday's 18:00-08:00 reaches into Saturday, before the pause
    assert (w.paused, w.rate, w.next_change) == (False, None, berlin(2026, 12, 5, 8, 0))
    w = s.window(berlin(2026, 12, 5, 10, 0))
    assert w.paused and w.label == "sat,sun 00:00-24:00 pause" and w.next_change == berlin(2026, 12, 5, 18, 0)
    w = s.window(berlin(2026, 12, 5, 19, 0))  # the '*' entry is listed first
    assert not w.paused and w.rate is None


def test_outside_all_windows_is_default() -> None:
    s = Schedule.parse("mon-fri 08:00-18:00 rate=1Mbit")
    w = s.window(berlin(2026, 12, 2, 20, 0))
    assert w == Window(False, "default", "", berlin(2026, 12, 3, 8, 0))
    assert s.window(berlin(2026, 12, 4, 19, 0)).next_change == berlin(2026, 12, 7, 8, 0)  # Fri -> Mon
    assert s.window(berlin(2026, 12, 2, 18, 0)).rate == "default"  # the end is exclusive
    assert s.window(berlin(2026, 12, 2, 8, 0)).rate == 125_000.0  # the start inclusive


def test_never_changing_schedules_have_no_next_change() -> None:
    assert Schedule.parse("").window(berlin(2026, 12, 2)) == Window(False, "default", "", None)
    w = Schedule.parse("* 00:00-24:00 pause").window(berlin(2026, 12, 2, 12))
    assert w.paused and w.next_change is None


@pytest.mark.parametrize("days,paused_on", [
    ("fri-mon", {"fri", "sat", "sun", "mon"}),
    ("tue-thu", {"tue", "wed", "thu"}),
    ("tue,thu", {"tue", "thu"}),
    ("mon,wed-fri", {"mon", "wed", "thu", "fri"}),
    ("SUN", {"sun"}),
    ("*", {"mon", "tue", "wed", "thu", "fri", "sat", "sun"}),
])
def test_day_lists_and_ranges(days: str, paused_on: set[str]) -> None:
    s = Schedule.parse(f"{days} 10:00-11:00 pause")
    names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    for i in range(7):  # 2026-11-30 is a Monday
        assert s.window(berlin(2026, 11, 30, 10, 30) + dt.timedelta(days=i)).paused == (names[i] in paused_on), names[i]


def test_window_crossing_midnight_belongs_to_its_start_day() -> None:
    s = Schedule.parse("fri 22:00-06:00 pause")
    assert s.window(berlin(2026, 12, 4, 23, 0)).paused  # Fri 23:00
    w = s.window(berlin(2026, 12, 5, 5, 59))  # Sat 05:59
    assert w.paused and w.next_change == berlin(2026, 12, 5, 6, 0)
    assert not s.window(berlin(2026, 12, 4, 5, 0)).paused  # Fri 05:00: Thursday has no window
    assert not s.window(berlin(2026, 12, 5, 23, 0)).paused  # Sat 23:00
    assert Schedule.parse("mon 08:00-08:00 pause").window(berlin(2026, 11, 30, 20)).paused  # 24 h window


def test_adjacent_windows_of_the_same_state_merge_in_next_change() -> None:
    s = Schedule.parse("* 08:00-12:00 pause; * 12:00-13:00 pause; * 13:00-14:00 rate=1Mbit")
    w = s.window(berlin(2026, 12, 2, 9))
    assert w.paused and w.next_change == berlin(2026, 12, 2, 12)  # labels differ, so it changes at 12:00
    assert s.window(berlin(2026, 12, 2, 12, 30)).next_change == berlin(2026, 12, 2, 13)


@settings(max_examples=80, deadline=None)
@given(st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2027, 12, 31),
                    timezones=st.just(BERLIN)))
def test_next_change_is_in_the_future_and_is_a_change(now: dt.datetime) -> None:
    s = Schedule.parse(SPEC + "; * 03:00-03:30 rate=5Mbit")
    w = s.window(now)
    assert w.next_change is not None and w.next_change > now
    assert w.next_change.utcoffset() is not None
    before = s.window(w.next_change - dt.timedelta(microseconds=1))
    after = s.window(w.next_change)
    assert (before.paused, before.rate, before.label) == (w.paused, w.rate, w.label)
    assert (after.paused, after.rate, after.label) != (w.paused, w.rate, w.label)


def test_dst_spring_forward_boundary_in_the_gap_is_the_first_instant_after() -> None:
    s = Schedule.parse("sun 02:30-04:00 pause")  # 2026-03-29: 02:00 CET -> 03:00 CEST
    w = s.window(utc(2026, 3, 29, 0, 59, 59).astimezone(BERLIN))  # 01:59:59 CET
    assert not w.paused and ts(w.next_change) == ts(utc(2026, 3, 29, 1, 0))  # 03:00 CEST
    assert s.window(utc(2026, 3, 29, 1, 0).astimezone(BERLIN)).paused
    assert s.window(berlin(2026, 3, 29, 3, 59)).next_change == berlin(2026, 3, 29, 4, 0)


def test_dst_fall_back_ambiguous_boundary_is_the_first_occurrence() -> None:
    s = Schedule.parse("sun 02:30-05:00 pause")  # 2026-10-25: 03:00 CEST -> 02:00 CET
    w = s.window(utc(2026, 10, 25, 0, 0).astimezone(BERLIN))  # 02:00 CEST
    assert not w.paused and ts(w.next_change) == ts(utc(2026, 10, 25, 0, 30))  # 02:30 CEST
    assert s.window(utc(2026, 10, 25, 1, 15).astimezone(BERLIN)).paused  # 02:15 CET, second pass
    assert ts(s.window(utc(2026, 10, 25, 0, 45).astimezone(BERLIN)).next_change) == ts(utc(2026, 10, 25, 4, 0))


def test_dst_day_is_23_hours_long_in_next_change() -> None:
    s = Schedule.parse("* 08:00-18:00 pause")
    w = s.window(berlin(2026, 3, 28, 18, 0))  # Sat 18:00 CET
    assert w.next_change == berlin(2026, 3, 29, 8, 0) == utc(2026, 3, 29, 6, 0)


def test_fixed_offset_now_uses_the_system_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """datetime.now().astimezone() has only a fixed offset; the DST rules come from the system zone."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    now = dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=1)))  # 01:30 CET
    assert ShipAt.parse("02:30").next_after(now) == utc(2026, 3, 29, 1, 0)
    w = Schedule.parse("sun 02:30-04:00 pause").window(now)
    assert w.next_change == utc(2026, 3, 29, 1, 0)


def test_text_is_normalised() -> None:
    s = Schedule.parse("  MON-FRI   08:00-18:00 rate=1Mbit ;  sat 00:00-24:00 PAUSE ; ")
    assert s.text == "mon-fri 08:00-18:00 rate=1Mbit; sat 00:00-24:00 pause"
    assert Schedule.parse(s.text).text == s.text


@pytest.mark.parametrize("spec,token", [
    ("tus 08:00-18:00 pause", "tus"),
    ("mon-xyz 08:00-18:00 pause", "xyz"),
    ("mon,,tue 08:00-18:00 pause", "mon,,tue"),
    ("mon 8am-18:00 pause", "8am"),
    ("mon 08:00-25:00 pause", "25:00"),
    ("mon 08:60-09:00 pause", "08:60"),
    ("mon 24:00-09:00 pause", "24:00"),
    ("mon 08:00 pause", "08:00"),
    ("mon 08:00-18:00 rate=2Mbitt", "2Mbitt"),
    ("mon 08:00-18:00 rate=0", "rate=0"),
    ("mon 08:00-18:00 stop", "stop"),
    ("mon 08:00-18:00 pause now", "now"),
    ("mon 08:00-18:00", "mon 08:00-18:00"),
    ("mon 08:00-18:00 pause;; tue 08:00-09:00 pause", ";;"),
])
def test_bad_specs_name_the_bad_token(spec: str, token: str) -> None:
    with pytest.raises(ValueError) as e:
        Schedule.parse(spec)
    msg = str(e.value)
    assert token in msg and "\n" not in msg and msg.startswith("invalid --schedule")


# --- ShipAt ---------------------------------------------------------------------------------------

def test_ship_at_next_after() -> None:
    s = ShipAt.parse("14:00, 02:00")
    assert s.text == "02:00,14:00"
    assert s.next_after(berlin(2026, 12, 2, 10)) == berlin(2026, 12, 2, 14)
    assert s.next_after(berlin(2026, 12, 2, 14)) == berlin(2026, 12, 3, 2)  # strictly after
    assert s.next_after(berlin(2026, 12, 2, 1, 59, 59)) == berlin(2026, 12, 2, 2)
    assert ShipAt.parse("00:00").next_after(berlin(2026, 12, 31, 23, 59)) == berlin(2027, 1, 1)


def test_ship_at_dst() -> None:
    s = ShipAt.parse("02:30")
    assert s.next_after(berlin(2026, 3, 28, 23)) == utc(2026, 3, 29, 1, 0)  # in the gap: 03:00 CEST
    assert s.next_after(berlin(2026, 3, 29, 3, 30)) == berlin(2026, 3, 30, 2, 30)
    first = s.next_after(berlin(2026, 10, 25, 0))
    assert ts(first) == ts(utc(2026, 10, 25, 0, 30))  # 02:30 CEST, the first occurrence
    assert ts(s.next_after(first)) == ts(utc(2026, 10, 26, 1, 30))  # not the second 02:30 the same night


@settings(max_examples=60, deadline=None)
@given(st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2027, 12, 31),
                    timezones=st.just(BERLIN)))
def test_ship_at_is_strictly_after_and_within_a_day(now: dt.datetime) -> None:
    nxt = ShipAt.parse("02:30,14:00").next_after(now)
    assert now < nxt <= now + dt.timedelta(hours=14)  # gaps between ship times: 11.5 h, 12.5 h, +-1 h DST


@pytest.mark.parametrize("text,token", [("2am", "2am"), ("24:61", "24:61"), ("24:00", "24:00"),
                                        ("25:00", "25:00"), ("02:00,", "''"), ("", "''"),
                                        ("02:00,14", "14"), ("2:0", "2:0")])
def test_ship_at_bad(text: str, token: str) -> None:
    with pytest.raises(ValueError) as e:
        ShipAt.parse(text)
    assert token in str(e.value) and "\n" not in str(e.value)


# --- rates ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("2Mbit", 250_000.0), ("512kbit", 64_000.0), ("100Mbit/s", 12_500_000.0), ("2mbps", 250_000.0),
    ("10MB/s", 10_000_000.0), ("10MiB/s", 10 * MIB), ("10KiB/s", 10 * KIB), ("1Gbit", 125_000_000.0),
    ("64kbit", 8000.0), ("10Gbit/s", 1.25e9), ("1.5Mbit", 187_500.0), ("100Mbps", 12_500_000.0),
    ("1000", 1000.0), ("8b", 1.0), ("1kB", 1000.0), ("3 bytes/s", 3.0), ("2Mbits", 250_000.0),
    ("unlimited", None), (" Unlimited ", None),
])
def test_parse_rate(text: str, value: float | None) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["2Mbitt", "0", "0Mbit", "-1Mbit", "", "fast", "10Xbit", "10ib", "1e6",
                                  "nan", "inf", "2 M bit", "Mbit", "10MiBB"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_rate(text)
    assert repr(text) in str(e.value)
    assert "unlimited" in str(e.value)


@pytest.mark.parametrize("value,text", [(None, "unlimited"), (250_000.0, "2.0 Mbit/s"), (64_000.0, "512.0 kbit/s"),
                                        (1.25e9, "10.0 Gbit/s"), (100.0, "800 bit/s"), (8000.0, "64.0 kbit/s")])
def test_format_rate(value: float | None, text: str) -> None:
    assert format_rate(value) == text
    if value is not None and value >= 125:
        assert parse_rate(text) == pytest.approx(value, rel=0.05)
