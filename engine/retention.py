"""Which snapshots a retention policy keeps, and why: a pure function of their times.

The rules are restic's, which borg and kopia share in substance:

- ``last N``: the N newest snapshots.
- ``hourly/daily/weekly/monthly/yearly N``: walking from the newest, the newest snapshot
  of each calendar period, for the N newest periods that have one (``-1``: all periods).
  Periods are calendar hours, days, ISO weeks, months and years in the operator's time
  zone (the machine's local time unless one is given), so "daily" follows the wall clock
  through DST changes: a day of 23 or 25 hours is still one day.
- ``within D``: every snapshot taken less than D before the newest one (not before now:
  a repository whose snapshots stopped does not empty itself). Years, months, weeks and
  days of D count on the calendar, hours in elapsed time.
- ``within-hourly/daily/… D``: the newest of each period, for periods within D of the
  newest snapshot.
- ``tag T``: every snapshot carrying one of the tags.

A snapshot is kept if any rule keeps it; the reasons are all the rules that did.
Snapshots with the same time are ordered by key, so a tie always resolves the same way.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Callable

from .errors import UsageError

PERIODS = ("hourly", "daily", "weekly", "monthly", "yearly")
_DURATION = re.compile(r"(\d+)([ymwdh])")


@dataclass(frozen=True)
class Duration:
    """A duration back from a moment: years, months, weeks and days on the calendar, hours
    in elapsed time."""

    years: int = 0
    months: int = 0
    weeks: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> "Duration":
        spec = text.strip().lower()
        parts = _DURATION.findall(spec)
        if not spec or "".join(n + u for n, u in parts) != spec:
            raise UsageError(f"cannot read duration {text!r}: use e.g. 30d, 12h, 2w, 6m (months), 1y, 1y6m")
        amounts = {"y": 0, "m": 0, "w": 0, "d": 0, "h": 0}
        for number, unit in parts:
            amounts[unit] += int(number)
        if not any(amounts.values()):
            raise UsageError(f"duration {text!r} is zero: it would keep nothing")
        return cls(amounts["y"], amounts["m"], amounts["w"], amounts["d"], amounts["h"])

    def before(self, moment: datetime) -> datetime:
        """``moment`` minus this duration: years, months, weeks and days on the calendar of
        ``moment``'s zone (a day across a DST change is a calendar day), hours in elapsed
        time. A month past the end of a shorter one clamps (Mar 31 - 1m = Feb 28)."""
        try:
            month_index = moment.year * 12 + moment.month - 1 - self.years * 12 - self.months
            year, month = divmod(month_index, 12)
            day = min(moment.day, calendar.monthrange(year, month + 1)[1])
            day_date = moment.replace(year=year, month=month + 1, day=day).date() - timedelta(weeks=self.weeks,
                                                                                            days=self.days)
            shifted = moment.replace(year=day_date.year, month=day_date.month, day=day_date.day)
            return shifted.astimezone(timezone.utc) - timedelta(hours=self.hours)
        except (ValueError, OverflowError) as exc:
            raise UsageError(f"duration {self} reaches out of the calendar") from exc

    def __str__(self) -> str:
        text = "".join(f"{n}{u}" for n, u in zip((self.years, self.months, self.weeks, self.days, self.hours),
                                                  "ymwdh") if n)
        return text or "0h"


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    within_periods: dict[str, Duration] = field(default_factory=dict)  # period -> duration
    tags: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.last or any(getattr(self, p) for p in PERIODS) or self.within
                    or self.within_periods or self.tags)

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"last": self.last, **{p: getattr(self, p) for p in PERIODS},
                                  "tags": list(self.tags)}
        if self.within:
            record["within"] = str(self.within)
        record["within_periods"] = {p: str(d) for p, d in self.within_periods.items()}
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Policy":
        try:
            counts = {p: int(record.get(p, 0)) for p in PERIODS}
            return cls(last=int(record.get("last", 0)), hourly=counts["hourly"], daily=counts["daily"],
                       weekly=counts["weekly"], monthly=counts["monthly"], yearly=counts["yearly"],
                       within=Duration.parse(record["within"]) if record.get("within") else None,
                       within_periods={str(p): Duration.parse(d) for p, d in record.get("within_periods", {}).items()},
                       tags=tuple(str(t) for t in record.get("tags", [])))
        except (TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"unreadable retention policy ({exc})") from exc

    def describe(self) -> str:
        parts = [f"last {self.last}" if self.last else ""]
        parts += [f"{p} {'all' if getattr(self, p) < 0 else getattr(self, p)}" for p in PERIODS if getattr(self, p)]
        parts += [f"within {self.within}" if self.within else ""]
        parts += [f"within-{p} {d}" for p, d in self.within_periods.items()]
        parts += [f"tag {t}" for t in self.tags]
        return ", ".join(p for p in parts if p) or "(empty)"


@dataclass(frozen=True)
class Candidate:
    """What a policy needs of a snapshot."""

    key: str  # unique; orders snapshots with equal times
    time: datetime  # aware
    tags: tuple[str, ...] = ()


@dataclass
class Decision:
    candidate: Candidate
    reasons: list[str] = field(default_factory=list)

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def period_of(period: str, moment: datetime, zone: tzinfo | None) -> tuple[int, ...]:
    """The calendar period holding ``moment`` on the wall clock of ``zone`` (None: this
    machine's local time, DST included, as the operator reads it)."""
    local = moment.astimezone(zone) if zone is not None else moment.astimezone()
    if period == "hourly":
        return (local.year, local.month, local.day, local.hour)
    if period == "daily":
        return (local.year, local.month, local.day)
    if period == "weekly":
        return tuple(local.isocalendar()[:2])
    if period == "monthly":
        return (local.year, local.month)
    if period == "yearly":
        return (local.year,)
    raise ValueError(period)


def label(period: str, bucket: tuple[int, ...]) -> str:
    if period == "weekly":
        return f"{bucket[0]}-W{bucket[1]:02d}"
    if period == "hourly":
        return f"{bucket[0]:04d}-{bucket[1]:02d}-{bucket[2]:02d} {bucket[3]:02d}h"
    return "-".join(f"{n:02d}" for n in bucket)


def apply_policy(candidates: list[Candidate], policy: Policy, zone: tzinfo | None = None) -> list[Decision]:
    """One decision per snapshot, newest first."""
    if policy.empty():
        raise UsageError("the retention policy keeps nothing: give at least one --keep-* rule")
    unknown = [p for p in policy.within_periods if p not in PERIODS]
    if unknown:
        raise UsageError(f"unknown period {unknown[0]!r}: use one of {', '.join(PERIODS)}")
    # Ordered in UTC: two local times in a DST fold compare by wall clock otherwise.
    decisions = [Decision(c) for c in sorted(candidates, key=lambda c: (c.time.astimezone(timezone.utc), c.key),
                                             reverse=True)]
    if not decisions:
        return decisions
    newest = decisions[0].candidate.time
    if policy.last:
        for number, decision in enumerate(decisions, 1):
            if policy.last < 0 or number <= policy.last:
                decision.reasons.append(f"last {number}")
    for period in PERIODS:
        _keep_periods(decisions, period, getattr(policy, period), zone, lambda _: True, period)
    if policy.within is not None:
        cutoff = _cutoff(policy.within, newest, zone)
        for decision in decisions:
            if decision.candidate.time > cutoff:
                decision.reasons.append(f"within {policy.within}")
    for period, duration in policy.within_periods.items():
        _keep_periods(decisions, period, -1, zone, _after(_cutoff(duration, newest, zone)),
                      f"{period} within {duration}")
    wanted = set(policy.tags)
    for decision in decisions:
        hit = sorted(wanted & set(decision.candidate.tags))
        if hit:
            decision.reasons.append(f"tag {', '.join(hit)}")
    return decisions


def _after(cutoff: datetime) -> Callable[[Candidate], bool]:
    return lambda candidate: candidate.time > cutoff


def _cutoff(duration: Duration, newest: datetime, zone: tzinfo | None) -> datetime:
    local = newest.astimezone(zone) if zone is not None else newest.astimezone()
    return duration.before(local)


def _keep_periods(decisions: list[Decision], period: str, count: int, zone: tzinfo | None,
                  eligible: Callable[[Candidate], bool], reason: str) -> None:
    if count == 0:
        return
    last_bucket: tuple[int, ...] | None = None
    kept = 0
    for decision in decisions:
        if not eligible(decision.candidate):
            continue
        bucket = period_of(period, decision.candidate.time, zone)
        if bucket == last_bucket:
            continue
        last_bucket = bucket
        if count < 0 or kept < count:
            decision.reasons.append(f"{reason} {label(period, bucket)}")
            kept += 1
