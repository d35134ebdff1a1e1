from datetime import datetime, timedelta, timezone

import pytest

from engine.errors import UsageError
from engine.timespec import parse_time, recorded_time

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text,expected", [
    ("2026-04-09T14:00+02:00", datetime(2026, 4, 9, 12, 0, tzinfo=timezone.utc)),
    ("2026-04-09T12:00:30Z", datetime(2026, 4, 9, 12, 0, 30, tzinfo=timezone.utc)),
    ("2h ago", NOW - timedelta(hours=2)),
    ("3 days ago", NOW - timedelta(days=3)),
    ("90m ago", NOW - timedelta(minutes=90)),
    ("1 week ago", NOW - timedelta(weeks=1)),
    ("now", NOW),
])
def test_absolute_and_relative_forms(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


def test_naive_time_is_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert parse_time("2026-04-09T14:00", NOW) == datetime(2026, 4, 9, 12, 0, tzinfo=timezone.utc)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_date_alone_means_end_of_that_day() -> None:
    parsed = parse_time("2026-04-09", NOW)
    local = parsed.astimezone(datetime(2026, 4, 9).astimezone().tzinfo)
    assert (local.date().isoformat(), local.hour, local.minute) == ("2026-04-09", 23, 59)


@pytest.mark.parametrize("text", ["yesterday-ish", "5 fortnights ago", "2026-13-01", "99999999 days ago",
                                  "0001-01-01T00:00"])
def test_bad_times_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_time(text, NOW)


def test_a_lower_case_z_is_utc_too() -> None:
    assert parse_time("2026-04-09T12:00:30z", NOW) == datetime(2026, 4, 9, 12, 0, 30, tzinfo=timezone.utc)


@pytest.mark.parametrize("text,says", [
    ("5 fortnights ago", "unknown time unit in '5 fortnights ago'"),
    ("99999999 days ago", "time '99999999 days ago' is out of range"),
    ("2026-13-01", "cannot read time '2026-13-01': use ISO 8601"),
])
def test_a_bad_time_says_what_was_wrong(text: str, says: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_time(text, NOW)
    assert str(raised.value).startswith(says)


@pytest.mark.parametrize("value,expected", [
    ("2026-04-09T12:00:30+00:00", datetime(2026, 4, 9, 12, 0, 30, tzinfo=timezone.utc)),
    ("2026-04-09T12:00:30", None),   # naive: whose clock?
    ("not a time", None),
    (None, None),
    (1775736030, None),               # a number is not an ISO time, and no error either
])
def test_recorded_times_read_as_unknown_unless_whole(value: object, expected: datetime | None) -> None:
    assert recorded_time(value) == expected


def test_a_given_offset_is_kept_for_the_messages(repo, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """'no snapshot at or before T' repeats T as the operator wrote it, offset included,
    not converted to this machine's zone (New York here)."""
    import time

    from engine.errors import SnapshotNotFound

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        with pytest.raises(SnapshotNotFound) as none:
            repo.snapshot_at(parse_time("2026-04-09T14:00+02:00", NOW))
        assert str(none.value) == "no snapshot at or before 2026-04-09T14:00:00+02:00 (oldest: none)"
        assert parse_time("2026-04-09T12:00Z", NOW).isoformat() == "2026-04-09T12:00:00+00:00"
    finally:
        monkeypatch.undo()
        time.tzset()
