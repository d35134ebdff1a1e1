"""Retention rules (engine/retention.py) on synthetic snapshot times.

Every expected kept set is worked out by hand from the calendar, never by calling the
code under test. Zones are explicit (UTC, Europe/Berlin, America/New_York); one test
sets TZ itself to check the "machine's local time" default and restores it.
"""

from __future__ import annotations

import itertools
import random
import time
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest

from engine.errors import UsageError
from engine.retention import Candidate, Decision, Duration, Policy, apply_policy

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def u(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def snaps(*times: datetime) -> list[Candidate]:
    """One candidate per time, keyed by its UTC ISO form (``2026-01-20T10:00``)."""
    return [Candidate(t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M"), t) for t in times]


def kept(decisions: list[Decision]) -> list[str]:
    return [d.candidate.key for d in decisions if d.keep]


def reasons(decisions: list[Decision]) -> dict[str, list[str]]:
    return {d.candidate.key: d.reasons for d in decisions if d.keep}


def run(policy: Policy, candidates: list[Candidate], zone: tzinfo | None = UTC) -> list[Decision]:
    return apply_policy(candidates, policy, zone)


# -- single rules ----------------------------------------------------------------------

FIVE = snaps(u(2026, 1, 20, 10, 5), u(2026, 1, 20, 10, 40), u(2026, 1, 20, 11, 10),
             u(2026, 1, 20, 11, 50), u(2026, 1, 20, 13))


def test_keep_last() -> None:
    got = run(Policy(last=2), FIVE)
    assert reasons(got) == {"2026-01-20T13:00": ["last 1"], "2026-01-20T11:50": ["last 2"]}
    assert len(kept(run(Policy(last=-1), FIVE))) == 5
    assert len(kept(run(Policy(last=9), FIVE))) == 5


def test_keep_hourly_n_and_all() -> None:
    assert reasons(run(Policy(hourly=2), FIVE)) == {
        "2026-01-20T13:00": ["hourly 2026-01-20 13h"], "2026-01-20T11:50": ["hourly 2026-01-20 11h"]}
    assert kept(run(Policy(hourly=-1), FIVE)) == ["2026-01-20T13:00", "2026-01-20T11:50", "2026-01-20T10:40"]


def test_keep_daily_weekly_monthly_yearly() -> None:
    cands = snaps(u(2026, 3, 10, 12), u(2026, 3, 10, 8), u(2026, 3, 9, 20),  # Tue, Tue, Mon of 2026-W11
                  u(2026, 3, 8, 10), u(2026, 3, 1, 10),                      # Sun W10, Sun W09
                  u(2026, 2, 27, 10), u(2026, 2, 10, 10), u(2025, 12, 20, 10))
    assert kept(run(Policy(daily=3), cands)) == ["2026-03-10T12:00", "2026-03-09T20:00", "2026-03-08T10:00"]
    assert reasons(run(Policy(weekly=3), cands)) == {
        "2026-03-10T12:00": ["weekly 2026-W11"], "2026-03-08T10:00": ["weekly 2026-W10"],
        "2026-03-01T10:00": ["weekly 2026-W09"]}
    assert reasons(run(Policy(monthly=-1), cands)) == {
        "2026-03-10T12:00": ["monthly 2026-03"], "2026-02-27T10:00": ["monthly 2026-02"],
        "2025-12-20T10:00": ["monthly 2025-12"]}
    assert reasons(run(Policy(yearly=1), cands)) == {"2026-03-10T12:00": ["yearly 2026"]}
    assert kept(run(Policy(yearly=-1), cands)) == ["2026-03-10T12:00", "2025-12-20T10:00"]


# newest 2026-03-10 12:00Z (a Tuesday, 2026-W11); the 11h bucket holds two snapshots
WITHIN_SET = snaps(u(2026, 3, 10, 12), u(2026, 3, 10, 11, 50), u(2026, 3, 10, 11, 30),
                   u(2026, 3, 10, 9, 30), u(2026, 3, 9, 20), u(2026, 3, 8, 10), u(2026, 3, 1, 10),
                   u(2026, 2, 27, 10), u(2026, 2, 10, 10), u(2025, 12, 20, 10))


@pytest.mark.parametrize(("period", "duration", "expected"), [
    ("hourly", "3h", {"2026-03-10T12:00": "2026-03-10 12h", "2026-03-10T11:50": "2026-03-10 11h",
                      "2026-03-10T09:30": "2026-03-10 09h"}),
    ("daily", "2d", {"2026-03-10T12:00": "2026-03-10", "2026-03-09T20:00": "2026-03-09"}),  # Mar 8 10:00 < cutoff
    ("weekly", "10d", {"2026-03-10T12:00": "2026-W11", "2026-03-08T10:00": "2026-W10",
                       "2026-03-01T10:00": "2026-W09"}),  # Feb 27 is before Feb 28 12:00
    ("monthly", "1m", {"2026-03-10T12:00": "2026-03", "2026-02-27T10:00": "2026-02"}),  # Feb 10 10:00 < cutoff
    ("yearly", "1y", {"2026-03-10T12:00": "2026", "2025-12-20T10:00": "2025"}),
])
def test_keep_within_period(period: str, duration: str, expected: dict[str, str]) -> None:
    got = run(Policy(within_periods={period: Duration.parse(duration)}), WITHIN_SET)
    assert reasons(got) == {k: [f"{period} within {duration} {v}"] for k, v in expected.items()}


def test_keep_within() -> None:
    got = run(Policy(within=Duration.parse("2d")), WITHIN_SET)  # cutoff 2026-03-08 12:00Z
    assert kept(got) == ["2026-03-10T12:00", "2026-03-10T11:50", "2026-03-10T11:30", "2026-03-10T09:30",
                         "2026-03-09T20:00"]
    assert all(d.reasons == ["within 2d"] for d in got if d.keep)


def test_keep_within_counts_from_the_newest_snapshot_not_now() -> None:
    days = [u(2020, 1, 1, 12) + timedelta(days=n) for n in range(366)]  # 2020 is a leap year
    got = run(Policy(within=Duration.parse("2d")), snaps(*days, u(2020, 12, 31, 20)))
    assert kept(got) == ["2020-12-31T20:00", "2020-12-31T12:00", "2020-12-30T12:00"]


def test_keep_tags() -> None:
    cands = [Candidate("a", u(2026, 1, 3), ("pin",)), Candidate("b", u(2026, 1, 2), ("x", "y")),
             Candidate("c", u(2026, 1, 1), ()), Candidate("d", u(2025, 1, 1), ("y", "pin"))]
    got = run(Policy(tags=("pin",)), cands)
    assert reasons(got) == {"a": ["tag pin"], "d": ["tag pin"]}
    assert kept(run(Policy(tags=("y", "nope")), cands)) == ["b", "d"]


def test_rules_combine_as_a_union_with_every_reason() -> None:
    cands = [Candidate("mon", u(2026, 1, 19, 9)), Candidate("tue-am", u(2026, 1, 20, 8)),
             Candidate("tue-pm", u(2026, 1, 20, 18)), Candidate("sun", u(2026, 1, 18, 9)),
             Candidate("old", u(2025, 11, 3, 9), ("pin",))]
    got = run(Policy(last=1, daily=2, weekly=2, monthly=1, tags=("pin",)), cands)
    assert reasons(got) == {
        "tue-pm": ["last 1", "daily 2026-01-20", "weekly 2026-W04", "monthly 2026-01"],
        "mon": ["daily 2026-01-19"],
        "sun": ["weekly 2026-W03"],
        "old": ["tag pin"],
    }
    assert [d.keep for d in got] == [True, False, True, True, True]  # tue-am kept by nothing


def test_empty_policy_and_bad_within_period() -> None:
    with pytest.raises(UsageError):
        run(Policy(), FIVE)
    with pytest.raises(UsageError):
        run(Policy(within_periods={"fortnightly": Duration(days=14)}), FIVE)
    assert run(Policy(last=1), []) == []


# -- calendar boundaries ---------------------------------------------------------------

def test_month_boundaries_in_a_leap_year() -> None:
    cands = snaps(u(2028, 1, 31, 23, 59), u(2028, 2, 1, 0, 1), u(2028, 2, 28, 12), u(2028, 2, 29, 8),
                  u(2028, 2, 29, 20), u(2028, 3, 1, 0, 30))
    assert reasons(run(Policy(monthly=-1), cands)) == {
        "2028-03-01T00:30": ["monthly 2028-03"], "2028-02-29T20:00": ["monthly 2028-02"],
        "2028-01-31T23:59": ["monthly 2028-01"]}
    assert reasons(run(Policy(daily=3), cands)) == {
        "2028-03-01T00:30": ["daily 2028-03-01"], "2028-02-29T20:00": ["daily 2028-02-29"],
        "2028-02-28T12:00": ["daily 2028-02-28"]}


def test_year_boundary_depends_on_the_zone() -> None:
    cands = snaps(u(2026, 6, 1, 12), u(2026, 12, 31, 23, 59), u(2027, 1, 1, 0, 1))
    assert kept(run(Policy(yearly=-1), cands)) == ["2027-01-01T00:01", "2026-12-31T23:59"]
    assert kept(run(Policy(yearly=1), cands)) == ["2027-01-01T00:01"]
    # in Berlin 23:59Z on Dec 31 is already 00:59 on Jan 1 2027
    assert kept(run(Policy(yearly=-1), cands, BERLIN)) == ["2027-01-01T00:01", "2026-06-01T12:00"]


def test_iso_week_53_spans_new_year() -> None:
    # 2026-12-28 is the Monday of 2026-W53; Jan 1-3 2027 still belong to it; Jan 4 2027 is 2027-W01
    cands = snaps(u(2026, 12, 27, 12), u(2026, 12, 28, 12), u(2026, 12, 31, 12), u(2027, 1, 1, 12),
                  u(2027, 1, 3, 12), u(2027, 1, 4, 12))
    assert reasons(run(Policy(weekly=-1), cands)) == {
        "2027-01-04T12:00": ["weekly 2027-W01"], "2027-01-03T12:00": ["weekly 2026-W53"],
        "2026-12-27T12:00": ["weekly 2026-W52"]}
    assert kept(run(Policy(weekly=2), cands)) == ["2027-01-04T12:00", "2027-01-03T12:00"]


# -- time zones and DST ----------------------------------------------------------------

@pytest.mark.parametrize(("zone", "expected"), [
    (UTC, ["2026-01-21T12:00", "2026-01-20T23:30"]),
    (BERLIN, ["2026-01-21T12:00", "2026-01-20T10:00"]),      # 23:30Z is Jan 21 00:30 there
    (NEW_YORK, ["2026-01-21T12:00", "2026-01-21T03:00"]),    # 03:00Z is Jan 20 22:00 there
])
def test_same_instants_bucket_by_the_zone(zone: tzinfo, expected: list[str]) -> None:
    cands = snaps(u(2026, 1, 20, 10), u(2026, 1, 20, 23, 30), u(2026, 1, 21, 3), u(2026, 1, 21, 12))
    assert kept(run(Policy(daily=-1), cands, zone)) == expected


def hourly_utc(start: datetime, end: datetime) -> list[Candidate]:
    return snaps(*(start + timedelta(hours=n) for n in range(int((end - start) / timedelta(hours=1)) + 1)))


def test_berlin_spring_forward_23_hour_day_keeps_one_per_local_day() -> None:
    # local Mar 29 2026 runs from 23:00Z Mar 28 to 21:59Z Mar 29 (CET -> CEST at 01:00Z)
    got = run(Policy(daily=-1), hourly_utc(u(2026, 3, 28), u(2026, 3, 31)), BERLIN)
    assert reasons(got) == {
        "2026-03-31T00:00": ["daily 2026-03-31"], "2026-03-30T21:00": ["daily 2026-03-30"],
        "2026-03-29T21:00": ["daily 2026-03-29"], "2026-03-28T22:00": ["daily 2026-03-28"]}


def test_berlin_fall_back_25_hour_day_keeps_one_per_local_day() -> None:
    # local Oct 25 2026 runs from 22:00Z Oct 24 to 22:59Z Oct 25 (CEST -> CET at 01:00Z)
    got = run(Policy(daily=-1), hourly_utc(u(2026, 10, 24), u(2026, 10, 26, 12)), BERLIN)
    assert reasons(got) == {
        "2026-10-26T12:00": ["daily 2026-10-26"], "2026-10-25T22:00": ["daily 2026-10-25"],
        "2026-10-24T21:00": ["daily 2026-10-24"]}


def test_berlin_fall_back_repeated_hour_is_one_hourly_bucket() -> None:
    # 00:30Z = 02:30 CEST and 01:30Z = 02:30 CET: two instants, one local hour
    cands = snaps(u(2026, 10, 24, 23, 30), u(2026, 10, 25, 0, 30), u(2026, 10, 25, 1, 30), u(2026, 10, 25, 2, 30))
    assert reasons(run(Policy(hourly=-1), cands, BERLIN)) == {
        "2026-10-25T02:30": ["hourly 2026-10-25 03h"], "2026-10-25T01:30": ["hourly 2026-10-25 02h"],
        "2026-10-24T23:30": ["hourly 2026-10-25 01h"]}
    assert len(kept(run(Policy(hourly=-1), cands, UTC))) == 4


def test_new_york_dst() -> None:
    # fall back Nov 1 2026 06:00Z (02:00 EDT -> 01:00 EST): 05:15Z..06:45Z are all 01:xx local
    fall = snaps(u(2026, 11, 1, 4, 45), u(2026, 11, 1, 5, 15), u(2026, 11, 1, 5, 45), u(2026, 11, 1, 6, 15),
                 u(2026, 11, 1, 6, 45), u(2026, 11, 1, 7, 15))
    assert kept(run(Policy(hourly=-1), fall, NEW_YORK)) == ["2026-11-01T07:15", "2026-11-01T06:45",
                                                            "2026-11-01T04:45"]
    # spring forward Mar 8 2026: local Mar 8 is 05:00Z Mar 8 .. 03:59Z Mar 9, 23 hours
    spring = snaps(u(2026, 3, 8, 4, 59), u(2026, 3, 8, 5), u(2026, 3, 9, 3, 59), u(2026, 3, 9, 4))
    assert kept(run(Policy(daily=-1), spring, NEW_YORK)) == ["2026-03-09T04:00", "2026-03-09T03:59",
                                                             "2026-03-08T04:59"]


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")
def test_no_zone_means_the_machine_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    cands = snaps(u(2026, 1, 20, 10), u(2026, 1, 20, 23, 30), u(2026, 1, 21, 3), u(2026, 1, 21, 12))
    try:
        monkeypatch.setenv("TZ", "America/New_York")
        time.tzset()
        assert kept(run(Policy(daily=-1), cands, None)) == ["2026-01-21T12:00", "2026-01-21T03:00"]
    finally:
        monkeypatch.undo()
        time.tzset()


# -- ties, ordering, completeness ------------------------------------------------------

def test_ties_resolve_by_key_whatever_the_input_order() -> None:
    same = u(2026, 5, 5, 12)
    cands = [Candidate("k1", same), Candidate("k3", same), Candidate("k2", same), Candidate("k0", u(2026, 5, 5, 1))]
    for order in itertools.permutations(cands):
        got = run(Policy(daily=1), list(order))
        assert [d.candidate.key for d in got] == ["k3", "k2", "k1", "k0"]
        assert reasons(got) == {"k3": ["daily 2026-05-05"]}


def test_output_is_newest_first_and_complete() -> None:
    rng = random.Random(20260120)
    cands = [Candidate(f"s{n:03d}", u(2026, 1, 1) + timedelta(minutes=rng.randrange(0, 60 * 24 * 90)))
             for n in range(200)]
    rng.shuffle(cands)
    got = run(Policy(last=3, daily=7, weekly=4, monthly=-1), cands)
    assert sorted(d.candidate.key for d in got) == sorted(c.key for c in cands)  # each exactly once
    assert all((a.candidate.time, a.candidate.key) > (b.candidate.time, b.candidate.key)
               for a, b in zip(got, got[1:]))
    assert len(kept(got)) <= 3 + 7 + 4 + 3  # three months of snapshots: Jan, Feb, Mar


# -- Duration ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("30d", Duration(days=30)), ("12h", Duration(hours=12)), ("2w", Duration(weeks=2)),
    ("6m", Duration(months=6)), ("1y", Duration(years=1)), ("1y6m2d", Duration(1, 6, 0, 2, 0)),
    (" 1Y2W ", Duration(years=1, weeks=2)),
])
def test_duration_parse(text: str, expected: Duration) -> None:
    assert Duration.parse(text) == expected


@pytest.mark.parametrize("text", ["", "  ", "5x", "d", "3 days", "-1d", "1d 2h", "1.5d", "12", "0d", "0y0m"])
def test_duration_parse_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        Duration.parse(text)


@pytest.mark.parametrize(("text", "moment", "expected"), [
    ("1m", u(2026, 3, 31, 12), u(2026, 2, 28, 12)),
    ("1m", u(2028, 3, 31, 12), u(2028, 2, 29, 12)),
    ("1y", u(2028, 2, 29, 12), u(2027, 2, 28, 12)),
    ("13m", u(2026, 1, 15), u(2024, 12, 15)),
    ("1y6m2d", u(2026, 8, 31), u(2025, 2, 26)),  # Feb 28 2025 (clamped), then 2 days
    ("2w12h", u(2026, 1, 15, 12), u(2026, 1, 1)),
])
def test_duration_before(text: str, moment: datetime, expected: datetime) -> None:
    assert Duration.parse(text).before(moment) == expected


# -- DST and boundaries of "within" ------------------------------------------------------

# Hours count in elapsed time, in every zone: on Berlin's 23-hour spring-forward day
# "within 12h" of 10:00Z still reaches back 12 real hours.
def test_within_hours_are_elapsed_time_across_dst() -> None:
    cands = snaps(u(2026, 3, 29, 10), u(2026, 3, 28, 22, 30))  # 12:00 CEST and 11.5 h earlier
    assert kept(run(Policy(within=Duration.parse("12h")), cands, UTC)) == ["2026-03-29T10:00", "2026-03-28T22:30"]
    assert kept(run(Policy(within=Duration.parse("12h")), cands, BERLIN)) == ["2026-03-29T10:00",
                                                                              "2026-03-28T22:30"]


# "less than D before the newest", as restic (cur.Time.After(cutoff)): a snapshot exactly
# D older than the newest is not kept.
def test_within_boundary_is_exclusive() -> None:
    cands = snaps(u(2026, 3, 10, 12), u(2026, 3, 9, 12, 1), u(2026, 3, 9, 12))
    assert kept(run(Policy(within=Duration.parse("1d")), cands)) == ["2026-03-10T12:00", "2026-03-09T12:01"]


# ---- forget through the CLI: the groups --------------------------------------------------

def test_forget_groups_by_host_and_data_dir_unless_told_otherwise(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    repo = tmp_path / "repo"
    assert cli("init", repo=repo).returncode == 0
    sources = []
    for name in ("one", "two"):
        source = tmp_path / name
        (source / "blobs").mkdir(parents=True)
        (source / "db").mkdir()
        (source / "blobs" / "x").write_text(name)
        sources.append(source)
    made: dict[tuple[str, str], list[str]] = {}
    for host, source in (("alpha", sources[0]), ("beta", sources[0]), ("alpha", sources[1])):
        for _ in range(2):
            result = cli("snapshot", str(source), "--host", host, "--json", repo=repo)
            assert result.returncode == 0, result.stderr
            made.setdefault((host, str(source)), []).append(json.loads(result.stdout)["id"])
    newest = {ids[-1] for ids in made.values()}
    every = {i for ids in made.values() for i in ids}

    def forget(*args: str) -> dict:  # type: ignore[type-arg]
        result = cli("forget", "--keep-last", "1", "--json", *args, repo=repo)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    default = forget("--dry-run")
    assert set(default["removed"]) == every - newest and default["kept"] == 3
    assert sorted((g["group"]["host"], g["group"]["source"]) for g in default["groups"]) == sorted(made)
    by_host = forget("--dry-run", "--group-by", "host")
    assert sorted(g["group"]["host"] for g in by_host["groups"]) == ["alpha", "beta"]
    assert set(by_host["removed"]) == every - {made[("alpha", str(sources[1]))][-1], made[("beta", str(sources[0]))][-1]}
    one_group = forget("--dry-run", "--group-by", "")
    assert [g["group"] for g in one_group["groups"]] == [{}]
    assert set(one_group["removed"]) == every - {made[("alpha", str(sources[1]))][-1]}  # the newest of all
    listed = {s["id"] for s in json.loads(cli("snapshots", "--json", repo=repo).stdout)}
    assert listed == every, "a dry run removes nothing"

    done = forget()
    assert set(done["removed"]) == every - newest
    assert {s["id"] for s in json.loads(cli("snapshots", "--json", repo=repo).stdout)} == newest


# -- what an operator reads: messages, reasons, the policy's own description --------------

def test_usage_errors_say_what_to_do() -> None:
    with pytest.raises(UsageError) as empty:
        run(Policy(), FIVE)
    assert str(empty.value) == "the retention policy keeps nothing: give at least one --keep-* rule"
    with pytest.raises(UsageError) as period:
        run(Policy(within_periods={"fortnightly": Duration(days=14)}), FIVE)
    assert str(period.value) == "unknown period 'fortnightly': use one of hourly, daily, weekly, monthly, yearly"
    with pytest.raises(UsageError) as unreadable:
        Duration.parse("5x")
    assert str(unreadable.value) == "cannot read duration '5x': use e.g. 30d, 12h, 2w, 6m (months), 1y, 1y6m"
    with pytest.raises(UsageError) as zero:
        Duration.parse("0d")
    assert str(zero.value) == "duration '0d' is zero: it would keep nothing"


def test_a_snapshot_kept_for_several_tags_names_them_all() -> None:
    cands = [Candidate("a", u(2026, 1, 3), ("y", "x", "pin")), Candidate("b", u(2026, 1, 2), ("x",))]
    assert reasons(run(Policy(tags=("pin", "y")), cands)) == {"a": ["tag pin, y"]}


@pytest.mark.parametrize(("text", "shown"), [("1y6m2d", "1y6m2d"), ("2w12h", "2w12h"), (" 36H ", "36h"),
                                             ("1d1d", "2d")])  # a unit given twice adds up
def test_durations_print_as_they_parse(text: str, shown: str) -> None:
    assert str(Duration.parse(text)) == shown
    assert Duration.parse(shown) == Duration.parse(text)


def test_a_zero_duration_still_prints_as_one() -> None:
    assert str(Duration()) == "0h"


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")
def test_a_duration_past_the_calendar_is_a_usage_error_on_every_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError) as far:
        Duration.parse("9999y").before(u(2026, 1, 1))
    assert str(far.value) == "duration 9999y reaches out of the calendar"
    # one hour before 0001-01-01 00:30 UTC: also out of range where local time is ahead of UTC
    try:
        monkeypatch.setenv("TZ", "Asia/Tokyo")
        time.tzset()
        with pytest.raises(UsageError):
            Duration.parse("2025y1h").before(u(2026, 1, 1, 0, 30))
    finally:
        monkeypatch.undo()
        time.tzset()


def test_policy_description() -> None:
    full = Policy(last=2, hourly=1, daily=7, monthly=-1, within=Duration.parse("1y6m"),
                  within_periods={"daily": Duration.parse("2w"), "weekly": Duration.parse("3m")}, tags=("pin", "release"))
    assert full.describe() == ("last 2, hourly 1, daily 7, monthly all, within 1y6m, within-daily 2w, "
                               "within-weekly 3m, tag pin, tag release")
    assert Policy(weekly=4).describe() == "weekly 4"
    assert Policy(tags=("pin",)).describe() == "tag pin"
    assert Policy().describe() == "(empty)"


def test_policy_record_round_trip() -> None:
    policy = Policy(last=3, hourly=24, daily=7, weekly=4, monthly=-1, yearly=2, within=Duration.parse("1y6m"),
                    within_periods={"daily": Duration.parse("2w"), "hourly": Duration.parse("2d")},
                    tags=("pin", "release"))
    record = policy.to_record()
    assert record == {"last": 3, "hourly": 24, "daily": 7, "weekly": 4, "monthly": -1, "yearly": 2,
                      "tags": ["pin", "release"], "within": "1y6m", "within_periods": {"daily": "2w", "hourly": "2d"}}
    assert Policy.from_record(record) == policy
    assert Policy(daily=7).to_record() == {"last": 0, "hourly": 0, "daily": 7, "weekly": 0, "monthly": 0,
                                           "yearly": 0, "tags": [], "within_periods": {}}  # no "within": none


def test_policy_records_of_other_writers() -> None:
    # keys a record lacks are zero or empty; strings are read as numbers and tags as text
    assert Policy.from_record({}) == Policy()
    assert Policy.from_record({"last": "2", "within": "", "tags": ["pin", 7]}) == Policy(last=2, tags=("pin", "7"))
    with pytest.raises(UsageError) as bad:
        Policy.from_record({"daily": "many"})
    assert str(bad.value).startswith("unreadable retention policy (")
    with pytest.raises(UsageError):
        Policy.from_record({"within_periods": ["daily"]})


def test_period_of_refuses_an_unknown_period() -> None:
    from engine.retention import period_of

    with pytest.raises(ValueError) as bad:
        period_of("fortnightly", u(2026, 1, 1), UTC)
    assert str(bad.value) == "fortnightly"


# -- the zone in "within" cutoffs ------------------------------------------------------------

@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")
def test_within_counts_days_on_the_calendar_of_the_given_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Berlin springs forward on Mar 29 2026: one calendar day before 12:00 CEST (10:00Z) is
    # 12:00 CET on Mar 28 (11:00Z), 23 hours. The machine runs on UTC here, so a cutoff
    # reckoned in the machine's zone instead (24 hours back, 10:00Z) would keep 10:30Z too.
    cands = snaps(u(2026, 3, 29, 10), u(2026, 3, 28, 23, 30), u(2026, 3, 28, 22, 30), u(2026, 3, 28, 11, 30),
                  u(2026, 3, 28, 10, 30))
    try:
        monkeypatch.setenv("TZ", "UTC")
        time.tzset()
        within = run(Policy(within=Duration.parse("1d")), cands, BERLIN)
        assert kept(within) == ["2026-03-29T10:00", "2026-03-28T23:30", "2026-03-28T22:30", "2026-03-28T11:30"]
        assert len(kept(run(Policy(within=Duration.parse("1d")), cands, UTC))) == 5
        # 23:30Z is 00:30 on Mar 29 in Berlin: the same local day as the newest
        assert reasons(run(Policy(within_periods={"daily": Duration.parse("1d")}), cands, BERLIN)) == {
            "2026-03-29T10:00": ["daily within 1d 2026-03-29"], "2026-03-28T22:30": ["daily within 1d 2026-03-28"]}
        assert reasons(run(Policy(within_periods={"hourly": Duration.parse("1d")}), cands, BERLIN)) == {
            "2026-03-29T10:00": ["hourly within 1d 2026-03-29 12h"],
            "2026-03-28T23:30": ["hourly within 1d 2026-03-29 00h"],
            "2026-03-28T22:30": ["hourly within 1d 2026-03-28 23h"],
            "2026-03-28T11:30": ["hourly within 1d 2026-03-28 12h"]}
    finally:
        monkeypatch.undo()
        time.tzset()


def test_within_period_boundary_is_exclusive() -> None:
    cands = snaps(u(2026, 3, 10, 12), u(2026, 3, 9, 12), u(2026, 3, 8, 18))
    assert kept(run(Policy(within_periods={"daily": Duration.parse("1d")}), cands)) == ["2026-03-10T12:00"]
