"""Forget (engine/forget.py) in process: groups, ids, zones and the stored policy.

The snapshot records are real ones, written with ``save_snapshot`` into a real repository
(no data behind them: forget reads records only). The stored policy goes through the
repository's own objects, plain and encrypted. The end-to-end forget through the CLI is in
tests/test_retention.py.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from zoneinfo import ZoneInfo

import pytest

from engine import Repository, open_backend
from engine.backends.metered import MeteredBackend
from engine.errors import IntegrityError, SnapshotNotFound, UsageError
from engine.forget import (
    DEFAULT_GROUP_BY, StoredPolicy, check_group_by, load_policy, plan_forget, remove_snapshots, save_policy,
    snapshots_by_ids, zone_named,
)
from engine.format import POLICY_PREFIX, SUMMARY_PREFIX, Kind, SnapshotId, digest, open_object, seal_object
from engine.repository import SnapshotInfo
from engine.retention import Duration, Policy
from engine.timespec import recorded_time

from .conftest import TEST_PASSWORD, Clock, reopen

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def u(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def utc_machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This machine's local time is UTC for the test: a zone the operator gave that is lost
    on the way (local time used instead) then shows in which snapshots are kept."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


def record(when: datetime, host: str = "alpha", source: str = "/srv/one", tags: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"time": when.isoformat(), "tree": bytes(32), "host": host, "source": source, "tags": list(tags)}


def save(repo: Repository, when: datetime, **fields: Any) -> SnapshotInfo:
    return repo.save_snapshot(record(when, **fields), when)


def by_key(snaps: list[SnapshotInfo]) -> dict[str, SnapshotInfo]:
    return {s.key: s for s in snaps}


# ---- groups ----------------------------------------------------------------------------

def test_each_host_and_source_is_a_group_of_its_own(repo: Repository) -> None:
    # beta's snapshot is the oldest, so the groups come out sorted by key, not by first seen
    b1 = save(repo, u(2026, 1, 1, 9), host="beta")
    a1 = save(repo, u(2026, 1, 2, 9))
    a2 = save(repo, u(2026, 1, 3, 9))
    o1 = save(repo, u(2026, 1, 4, 9), source="/srv/two")
    o2 = save(repo, u(2026, 1, 5, 9), source="/srv/two")
    groups = plan_forget(repo.snapshots(), StoredPolicy(Policy(last=1)))
    assert [g.key for g in groups] == [{"host": "alpha", "source": "/srv/one"},
                                       {"host": "alpha", "source": "/srv/two"},
                                       {"host": "beta", "source": "/srv/one"}]
    assert [[d.candidate.key for d in g.decisions] for g in groups] == [[a2.key, a1.key], [o2.key, o1.key], [b1.key]]
    assert [[d.reasons for d in g.decisions] for g in groups] == [[["last 1"], []], [["last 1"], []], [["last 1"]]]
    assert [[s.id for s in g.removed] for g in groups] == [[a1.id], [o1.id], []]
    assert [g.snapshots[s.key].time for g in groups for s in g.removed] == [u(2026, 1, 2, 9), u(2026, 1, 4, 9)]


def test_group_by_tags_and_by_nothing(repo: Repository) -> None:
    old_pin = save(repo, u(2026, 1, 1, 9), tags=("pin",))
    nightly1 = save(repo, u(2026, 1, 2, 9), host="beta", tags=("nightly",))
    nightly2 = save(repo, u(2026, 1, 3, 9), tags=("nightly",))
    new_pin = save(repo, u(2026, 1, 4, 9), host="beta", tags=("pin",))
    snaps = repo.snapshots()
    by_tags = plan_forget(snaps, StoredPolicy(Policy(last=1), ("tags",)))
    assert [g.key for g in by_tags] == [{"tags": ("nightly",)}, {"tags": ("pin",)}]
    assert [[s.id for s in g.removed] for g in by_tags] == [[nightly1.id], [old_pin.id]]
    # no group field: one group of every snapshot, whatever host made it
    (everything,) = plan_forget(snaps, StoredPolicy(Policy(last=2), ()))
    assert everything.key == {}
    assert [d.candidate.key for d in everything.decisions] == [new_pin.key, nightly2.key, nightly1.key, old_pin.key]
    assert [s.id for s in everything.removed] == [nightly1.id, old_pin.id]


def test_a_tag_rule_sees_each_snapshots_tags(repo: Repository) -> None:
    pinned = save(repo, u(2026, 1, 1, 9), tags=("pin", "release"))
    save(repo, u(2026, 1, 2, 9), tags=("nightly",))
    newest = save(repo, u(2026, 1, 3, 9))
    (group,) = plan_forget(repo.snapshots(), StoredPolicy(Policy(last=1, tags=("release",))))
    assert {group.snapshots[d.candidate.key].id: d.reasons for d in group.decisions if d.keep} == {
        newest.id: ["last 1"], pinned.id: ["tag release"]}


def test_the_stored_zone_sets_the_calendar_days(repo: Repository, utc_machine: None) -> None:
    # 23:30Z on Jan 20 is 00:30 on Jan 21 in Berlin: the same local day as the newest
    save(repo, u(2026, 1, 20, 10))
    late = save(repo, u(2026, 1, 20, 23, 30))
    newest = save(repo, u(2026, 1, 21, 12))
    snaps = repo.snapshots()
    (berlin,) = plan_forget(snaps, StoredPolicy(Policy(daily=2), timezone="Europe/Berlin"))
    assert [d.reasons for d in berlin.decisions] == [["daily 2026-01-21"], [], ["daily 2026-01-20"]]
    (utc,) = plan_forget(snaps, StoredPolicy(Policy(daily=2), timezone="UTC"))
    assert [s.id for s in utc.removed] == [snaps[0].id]
    assert {utc.snapshots[d.candidate.key].id for d in utc.decisions if d.keep} == {late.id, newest.id}


# ---- ids -------------------------------------------------------------------------------

def test_forget_by_id_prefix(repo: Repository) -> None:
    first = save(repo, u(2026, 1, 1, 9))
    second = save(repo, u(2026, 1, 2, 9))
    snaps = repo.snapshots()
    assert snapshots_by_ids(snaps, [second.id.short(), first.id.hex()]) == [second, first]
    assert snapshots_by_ids(snaps, [first.id.short().upper()]) == [first], "ids are hex: case does not matter"
    with pytest.raises(SnapshotNotFound) as missing:
        snapshots_by_ids(snaps, [first.id.short(), "nothere"])
    assert str(missing.value) == "snapshot id 'nothere' matches no snapshot"


def test_an_ambiguous_id_prefix_removes_nothing() -> None:
    # two ids that share their first byte
    snaps = [SnapshotInfo(SnapshotId(bytes([0xAB, n]) + bytes(30)), f"snapshots/{n}", u(2026, 1, n), {})
             for n in (1, 2)]
    with pytest.raises(SnapshotNotFound) as ambiguous:
        snapshots_by_ids(snaps, ["ab"])
    assert str(ambiguous.value) == "snapshot id 'ab' is ambiguous"
    assert snapshots_by_ids(snaps, ["ab02"]) == [snaps[1]]


# ---- removing records ----------------------------------------------------------------------

def _summarised(repo: Repository) -> list[list[str]]:
    """The snapshot keys each stored summary holds."""
    return [[key for key, _ in open_object(Kind.SNAPSHOT_SUMMARY, repo.backend.get(k), k, repo.cipher)["snapshots"]]
            for k, _ in repo.backend.list(SUMMARY_PREFIX)]


def test_forgotten_records_leave_the_summary_too(repo: Repository, tmp_path: Path) -> None:
    doomed = [save(repo, u(2026, 1, n, 9)) for n in (1, 2)]
    kept = [save(repo, u(2026, 1, n, 9)) for n in (3, 4, 5)]
    repo.write_summary()
    remove_snapshots(repo, doomed)
    assert _summarised(repo) == [[s.key for s in kept]], "the summary would keep forgotten records readable"
    other = reopen(repo, tmp_path / "fresh-cache")  # reads the summary, not this process's catalog
    try:
        assert [s.id for s in other.snapshots()] == [s.id for s in kept]
    finally:
        other.close()
    assert [s.id for s in repo.snapshots()] == [s.id for s in kept]
    remove_snapshots(repo, [])
    assert _summarised(repo) == [[s.key for s in kept]]
    remove_snapshots(repo, kept)
    assert repo.snapshots() == [] and _summarised(repo) == [], "nothing left to summarise: no summary"


def test_forgetting_the_newest_snapshot_leaves_no_summary_holding_it(repo: Repository) -> None:
    """The new summary is stamped with the newest kept snapshot, earlier than the one it
    replaces: that one must go too, or the forgotten record stays readable in it."""
    kept = [save(repo, u(2026, 1, n, 9)) for n in (1, 2, 3)]
    newest = save(repo, u(2026, 1, 4, 9))
    repo.write_summary()
    remove_snapshots(repo, [newest])
    assert _summarised(repo) == [[s.key for s in kept]]


def test_forget_writes_no_summary_where_there_was_none(repo: Repository) -> None:
    snaps = [save(repo, u(2026, 1, n, 9)) for n in (1, 2, 3)]
    remove_snapshots(repo, snaps[:1])
    assert _summarised(repo) == []
    assert [s.id for s in repo.snapshots()] == [s.id for s in snaps[1:]]


# ---- zones and group fields --------------------------------------------------------------

def test_zone_names() -> None:
    assert zone_named(None) is None, "no zone: the machine's local time"
    assert zone_named("UTC") is timezone.utc
    assert zone_named("utc") is timezone.utc, "UTC in any case (IANA names are case-sensitive)"
    assert zone_named("Europe/Berlin") == BERLIN
    assert StoredPolicy(Policy(last=1), timezone="Europe/Berlin").zone() == BERLIN
    assert StoredPolicy(Policy(last=1)).zone() is None
    with pytest.raises(UsageError) as unknown:
        zone_named("Mars/Olympus_Mons")
    assert str(unknown.value) == ("unknown time zone 'Mars/Olympus_Mons' (use an IANA name such as "
                                  "Europe/Berlin, or UTC)")


def test_group_fields_are_checked() -> None:
    assert check_group_by(("host", "tags")) == ("host", "tags")
    assert check_group_by(()) == ()
    with pytest.raises(UsageError) as bad:
        check_group_by(("host", "colour", "size"))
    assert str(bad.value) == "cannot group by colour, size: use any of host, source, tags, or ''"


# ---- the stored policy -------------------------------------------------------------------

FULL = StoredPolicy(Policy(last=3, hourly=24, daily=7, weekly=4, monthly=-1, yearly=2, within=Duration.parse("1y6m"),
                           within_periods={"daily": Duration.parse("2w"), "hourly": Duration.parse("2d")},
                           tags=("pin", "release")),
                    ("host", "tags"), "Europe/Berlin")


def test_stored_policy_record_follows_the_format() -> None:
    record = FULL.to_record()
    assert {k: v for k, v in record.items() if k != "set"} == {
        "policy": {"last": 3, "hourly": 24, "daily": 7, "weekly": 4, "monthly": -1, "yearly": 2,
                   "tags": ["pin", "release"], "within": "1y6m", "within_periods": {"daily": "2w", "hourly": "2d"}},
        "group_by": ["host", "tags"], "timezone": "Europe/Berlin"}
    stored_at = recorded_time(record["set"])  # docs/format.md §6.12: an ISO 8601 UTC time
    assert stored_at is not None and stored_at.utcoffset() == timedelta(0)
    assert abs(stored_at - datetime.now(UTC)) < timedelta(hours=1)
    assert StoredPolicy.from_record(record) == FULL
    # keys a record lacks take their defaults
    assert StoredPolicy.from_record({"policy": {"daily": 7}}) == StoredPolicy(Policy(daily=7), DEFAULT_GROUP_BY, None)
    assert StoredPolicy.from_record({}) == StoredPolicy(Policy())


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_stored_policy_is_replaced_and_cleared(tmp_path: Path, cache_dir: Path, clock: Clock,
                                                 encrypted: bool) -> None:
    repo = Repository.init(open_backend(str(tmp_path / "repo")), cache_dir, clock,
                           password=TEST_PASSWORD.encode() if encrypted else None, kdf_log2_n=10)
    try:
        assert load_policy(repo) is None
        save_policy(repo, FULL)
        other = reopen(repo, cache_dir) if not encrypted else Repository.open(
            open_backend(repo.backend.location), cache_dir, lambda: TEST_PASSWORD.encode())
        assert load_policy(other) == FULL
        first = [key for key, _ in repo.backend.list(POLICY_PREFIX)]
        replacement = StoredPolicy(Policy(daily=7), ())
        save_policy(repo, replacement)
        now = [key for key, _ in repo.backend.list(POLICY_PREFIX)]
        assert len(first) == 1 and len(now) == 1 and now != first, "the new policy replaces the old object"
        assert load_policy(other) == replacement
        save_policy(repo, None)
        assert list(repo.backend.list(POLICY_PREFIX)) == []
        assert load_policy(other) is None
        other.close()
    finally:
        repo.close()


def _put_policy(repo: Repository, stored: StoredPolicy, set_at: str | None) -> str:
    """A policy object as ``save_policy`` writes it, with a chosen ``set`` time (None: no
    such key): two exist after a crash between writing the new policy and deleting the old."""
    record = {k: v for k, v in stored.to_record().items() if k != "set"}
    data = seal_object(Kind.POLICY, record if set_at is None else {**record, "set": set_at}, repo.cipher)
    key = f"{POLICY_PREFIX}{digest(data).hex()}"
    repo.backend.put(key, data)
    return key


def _load_listed(location: str, cache_dir: Path, order: list[str]) -> StoredPolicy | None:
    """``load_policy`` in a new process whose backend lists the policies in ``order``."""
    other = Repository.open(_ListedInOrder(open_backend(location), order), cache_dir)
    try:
        return load_policy(other)
    finally:
        other.close()


class _ListedInOrder(MeteredBackend):
    """The real backend, but policies are listed in the order given (a ghost key that is
    gone by the time it is read, as after a concurrent 'policy set', first if given)."""

    def __init__(self, inner: Any, order: list[str]) -> None:
        super().__init__(inner)
        self.order = order

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        if prefix != POLICY_PREFIX:
            yield from super().list(prefix)
            return
        for key in self.order:
            yield key, 100


def test_after_a_crash_the_newest_policy_wins(repo: Repository, cache_dir: Path) -> None:
    older = StoredPolicy(Policy(last=1))
    newer = StoredPolicy(Policy(daily=7), ("host",))
    k_old = _put_policy(repo, older, "2026-04-09T10:00:00+00:00")
    k_new = _put_policy(repo, newer, "2026-04-09T11:00:00+00:00")
    location = repo.backend.location
    for order in ([k_old, k_new], [k_new, k_old]):
        assert _load_listed(location, cache_dir, order) == newer
    # a policy deleted between the listing and the read is passed over, not the end of the search
    ghost = f"{POLICY_PREFIX}{'0' * 64}"
    assert _load_listed(location, cache_dir, [ghost, k_new]) == newer
    # equal times (a tie no clock makes in practice): the first listed stays
    k_twin = _put_policy(repo, older, "2026-04-09T11:00:00+00:00")
    assert _load_listed(location, cache_dir, [k_new, k_twin]) == newer
    assert _load_listed(location, cache_dir, [k_twin, k_new]) == older
    # a record without a time loses to any that has one, in either order
    k_timeless = _put_policy(repo, StoredPolicy(Policy(weekly=2)), None)
    for order in ([k_new, k_timeless], [k_timeless, k_new]):
        assert _load_listed(location, cache_dir, order) == newer
    assert _load_listed(location, cache_dir, [k_timeless]) == StoredPolicy(Policy(weekly=2))


def test_a_damaged_policy_names_its_object(repo: Repository) -> None:
    save_policy(repo, FULL)
    ((key, _),) = repo.backend.list(POLICY_PREFIX)
    repo.backend.put(key, b"CSNP")
    with pytest.raises(IntegrityError) as damaged:
        load_policy(repo)
    assert str(damaged.value).startswith(f"{key}: truncated object")
