"""Forget: remove snapshot records by a retention policy (or by id); the data goes at prune.

Snapshots are grouped (by host and source unless told otherwise) and the policy applies
to each group alone, so a second machine's snapshots never push out the first's. The
policy an operator wants every time can be stored in the repository (``policies/``,
docs/format.md §6.11): then cron runs ``clubsnap forget --prune`` and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import ObjectNotFound, SnapshotNotFound, UsageError
from .format import POLICY_PREFIX, SUMMARY_PREFIX, Kind, digest, open_object, seal_object
from .repository import Repository, SnapshotInfo
from .retention import Candidate, Decision, Policy, apply_policy

GROUP_FIELDS = ("host", "source", "tags")
DEFAULT_GROUP_BY = ("host", "source")


@dataclass(frozen=True)
class StoredPolicy:
    policy: Policy
    group_by: tuple[str, ...] = DEFAULT_GROUP_BY
    timezone: str | None = None  # an IANA zone name; None: the local time of the machine running forget

    def zone(self) -> tzinfo | None:
        return zone_named(self.timezone)

    def to_record(self) -> dict[str, Any]:
        return {"policy": self.policy.to_record(), "group_by": list(self.group_by), "timezone": self.timezone,
                "set": datetime.now(timezone.utc).isoformat()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "StoredPolicy":
        return cls(Policy.from_record(record.get("policy", {})), tuple(record.get("group_by", DEFAULT_GROUP_BY)),
                   record.get("timezone"))


def zone_named(name: str | None) -> tzinfo | None:
    if name is None:
        return None
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise UsageError(f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin, or UTC)") from exc


def check_group_by(fields: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [f for f in fields if f not in GROUP_FIELDS]
    if unknown:
        raise UsageError(f"cannot group by {', '.join(unknown)}: use any of {', '.join(GROUP_FIELDS)}, or ''")
    return fields


@dataclass
class Group:
    key: dict[str, Any]
    decisions: list[Decision] = field(default_factory=list)
    snapshots: dict[str, SnapshotInfo] = field(default_factory=dict)  # by key

    @property
    def removed(self) -> list[SnapshotInfo]:
        return [self.snapshots[d.candidate.key] for d in self.decisions if not d.keep]


def plan_forget(snapshots: list[SnapshotInfo], stored: StoredPolicy) -> list[Group]:
    """Decisions per group, each group's newest snapshot first."""
    groups: dict[tuple[Any, ...], Group] = {}
    for snap in snapshots:
        values = {f: (tuple(snap.tags) if f == "tags" else snap.record.get(f)) for f in stored.group_by}
        group = groups.setdefault(tuple(values.values()), Group(values))
        group.snapshots[snap.key] = snap
    for group in groups.values():
        candidates = [Candidate(s.key, s.time, tuple(s.tags)) for s in group.snapshots.values()]
        group.decisions = apply_policy(candidates, stored.policy, stored.zone())
    return sorted(groups.values(), key=lambda g: [str(v) for v in g.key.values()])


def snapshots_by_ids(snapshots: list[SnapshotInfo], refs: list[str]) -> list[SnapshotInfo]:
    chosen = []
    for ref in refs:
        matches = [s for s in snapshots if s.id.hex().startswith(ref.lower())]
        if len(matches) != 1:
            raise SnapshotNotFound(f"snapshot id {ref!r} {'matches no snapshot' if not matches else 'is ambiguous'}")
        chosen.append(matches[0])
    return chosen


def remove_snapshots(repo: Repository, doomed: list[SnapshotInfo]) -> None:
    """Delete the records, then bring the snapshot summary up to date: it holds a copy
    of every record and would otherwise keep the forgotten ones readable."""
    for snap in doomed:
        repo.backend.delete(snap.key)
    repo.catalog.remove_snapshots(s.key for s in doomed)
    summaries = [key for key, _ in repo.backend.list(SUMMARY_PREFIX)]
    if not summaries or not doomed:
        return
    # The new summary replaces the older ones itself; one stamped later (the newest
    # snapshot was forgotten, so the new one is stamped earlier) holds a forgotten record
    # too and goes here.
    written = repo.write_summary() if repo.snapshot_keys() else None
    stamp = written.rsplit("_", 1)[0] if written else ""
    for key in summaries:
        if key != written and key.rsplit("_", 1)[0] > stamp:
            repo.backend.delete(key)


# ---- the stored policy ---------------------------------------------------------------

def load_policy(repo: Repository) -> StoredPolicy | None:
    """The newest stored policy (two exist only after a crash while replacing one)."""
    newest: tuple[str, StoredPolicy] | None = None
    for key, _ in repo.backend.list(POLICY_PREFIX):
        try:
            record = open_object(Kind.POLICY, repo.backend.get(key), key, repo.cipher)
        except ObjectNotFound:
            continue
        if newest is None or str(record.get("set", "")) > newest[0]:
            newest = (str(record.get("set", "")), StoredPolicy.from_record(record))
    return newest[1] if newest else None


def save_policy(repo: Repository, stored: StoredPolicy | None) -> None:
    """Store ``stored`` as the policy (None: remove it); the new one is written before the old goes."""
    old = [key for key, _ in repo.backend.list(POLICY_PREFIX)]
    new_key = None
    if stored is not None:
        data = seal_object(Kind.POLICY, stored.to_record(), repo.cipher)
        new_key = f"{POLICY_PREFIX}{digest(data).hex()}"
        repo.backend.put(new_key, data)
    for key in old:
        if key != new_key:
            repo.backend.delete(key)
