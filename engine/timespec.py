"""Parsing "as of" times for restore: ISO 8601 dates and date-times, and relative forms.

- ``2026-04-09T14:00``, ``2026-04-09 14:00:00+02:00``, ``2026-04-09T12:00Z``: a moment;
  without an offset it is the machine's local time.
- ``2026-04-09``: the end of that day (local time), so "the state of April 9th" is the
  last snapshot taken that day.
- ``2h ago``, ``3 days ago``, ``90m ago``, ``1 week ago``, ``now``.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from typing import Any

from .errors import UsageError

_UNITS = {
    "s": "seconds", "sec": "seconds", "secs": "seconds", "second": "seconds", "seconds": "seconds",
    "m": "minutes", "min": "minutes", "mins": "minutes", "minute": "minutes", "minutes": "minutes",
    "h": "hours", "hr": "hours", "hrs": "hours", "hour": "hours", "hours": "hours",
    "d": "days", "day": "days", "days": "days",
    "w": "weeks", "week": "weeks", "weeks": "weeks",
}
_RELATIVE = re.compile(r"^\s*(\d+)\s*([a-z]+)\s+ago\s*$")


def parse_time(text: str, now: datetime) -> datetime:
    """An aware datetime for ``text``; ``now`` must be aware (it anchors relative forms)."""
    spec = text.strip().lower()
    if spec == "now":
        return now
    relative = _RELATIVE.match(spec)
    if relative:
        unit = _UNITS.get(relative.group(2))
        if unit is None:
            raise UsageError(f"unknown time unit in {text!r} (use s, m, h, d or w)")
        try:
            return now - timedelta(**{unit: int(relative.group(1))})
        except OverflowError as exc:
            raise UsageError(f"time {text!r} is out of range") from exc
    return _parse_absolute(text.strip())


def _parse_absolute(text: str) -> datetime:
    candidate = text[:-1] + "+00:00" if text.upper().endswith("Z") else text
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", candidate):
            return datetime.combine(date.fromisoformat(candidate), time.max).astimezone()
        moment = datetime.fromisoformat(candidate)
        return moment if moment.tzinfo else moment.astimezone()
    except (ValueError, OverflowError) as exc:
        raise UsageError(f"cannot read time {text!r}: use ISO 8601 (2026-04-09, "
                         f"2026-04-09T14:00, 2026-04-09T14:00+02:00) or '2h ago'") from exc


def recorded_time(value: Any) -> datetime | None:
    """A time a record or state file stored (ISO 8601 with an offset), or None when it is
    absent, malformed or naive: such files outlive the code that wrote them, and a wrong
    time must read as "unknown", never as an error that stops a status or a scheduler."""
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return when if when is None or when.tzinfo is not None else None
