"""Is the backup healthy? The newest snapshot's age, and what the last verify found.

An operator must learn that backups stopped before they need one. ``verify`` of a
snapshot records its result in the repository (``verifications/``, docs/format.md
§6.13), so any host can tell when the last one ran and whether it passed; ``status``
reads that and the snapshot listing, and fails when either is too old or bad, for
cron, a healthcheck or a monitoring probe.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgpack

from . import damage
from .clubcheck import ClubReport, check_club
from .errors import BackendError, EngineError, IntegrityError, ObjectNotFound, UnsupportedFormat
from .format import CONFIG_KEY, INDEX_PREFIX, SNAPSHOT_STAMP, VERIFICATION_PREFIX, Kind, digest, open_object, seal_object
from .repository import Repository, SnapshotFilter, SnapshotInfo
from .restore import apply_restore, plan_restore
from .timespec import recorded_time

KEEP_VERIFICATIONS = 30  # per registry: older records of its snapshots go when a new one is written
MAX_LISTED = 20
# What a restore of a snapshot meets when the repository cannot give it back, whoever tries:
# a verdict on the backup, unlike an unreachable bucket, a full scratch disk, or a format
# newer than this build (UnsupportedFormat: a verdict on the verifier).
DAMAGE = (IntegrityError, ObjectNotFound)
CLOCK_SKEW = timedelta(minutes=5)  # a snapshot dated further ahead than this is suspect


def verify_snapshot(repo: Repository, snap: SnapshotInfo, temp_dir: str | None, now: datetime) -> ClubReport:
    """Restore ``snap`` into a temporary directory, check it as club would need it, and
    record the result (under a read lock: a prune keeps what it reads)."""
    try:
        with repo.read_lock() or contextlib.nullcontext(), \
                tempfile.TemporaryDirectory(prefix="clubsnap-verify-", dir=temp_dir) as scratch:
            plan = plan_restore(repo, snap, Path(scratch) / "data")
            apply_restore(repo, plan, allow_in_use=True, set_owner=False)
            report = check_club(Path(scratch) / "data")
    except DAMAGE as exc:
        # A snapshot that does not even restore is the worst verify result: recorded too.
        # Not so a full scratch disk or unreachable storage: they say nothing of the backup.
        # Nor a repository gone as a whole (its disk unmounted midway, every object "missing").
        try:
            repo.backend.stat(CONFIG_KEY)
        except EngineError as gone:
            raise BackendError(f"{repo.backend.location}: the repository is not there any more "
                               f"({gone}); nothing recorded") from exc
        record_verification(repo, snap, ClubReport(database=[f"restore failed: {exc}"]), now)
        raise
    record_verification(repo, snap, report, now)
    return report


def record_verification(repo: Repository, snap: SnapshotInfo, report: ClubReport, now: datetime) -> str | None:
    """Store what a verify of ``snap`` found; returns the key, or None when the
    repository cannot be written (read-only credentials: the verify itself stands)."""
    # The snapshot's host, source and tags travel with the record: ``status --host/--path``
    # must find the last verify of its registry after retention has forgotten the snapshot.
    record = {"time": now.astimezone(timezone.utc).isoformat(), "host": socket.gethostname(),
              "snapshot": snap.id.hex(), "snapshot_time": snap.time.isoformat(),
              "snapshot_host": snap.record.get("host"), "snapshot_source": snap.record.get("source"),
              "snapshot_tags": snap.tags, "ok": report.ok,
              "checked": dict(report.checked), "missing": len(report.missing), "database": len(report.database),
              "problems": (report.missing + report.database)[:MAX_LISTED]}
    data = seal_object(Kind.VERIFICATION, record, repo.cipher)
    group = registry_group(repo, record["snapshot_host"], record["snapshot_source"])
    key = f"{VERIFICATION_PREFIX}{now.astimezone(timezone.utc).strftime(SNAPSHOT_STAMP)}_{group}_{digest(data).hex()}"
    try:
        repo.backend.put(key, data)
        same_group = [k for k, _ in repo.backend.list(VERIFICATION_PREFIX) if _group_of(k) == group]
        for old in sorted(same_group)[:-KEEP_VERIFICATIONS]:
            repo.backend.delete(old)
    except EngineError:
        return None
    return key


def registry_group(repo: Repository, host: Any, source: Any) -> str:
    """The key part that names whose snapshots a record verified (format §6.13), so
    retention keeps the newest records of each registry sharing a repository without
    reading any: a short hash of the snapshot's host and source, keyed in an encrypted
    repository (a plain hash would let anyone with the bucket confirm a guessed host)."""
    return repo.cipher.chunk_id(msgpack.packb([str(host), str(source)], use_bin_type=True))[:8].hex()


def _group_of(key: str) -> str:
    """A key's registry group; '' for keys of earlier versions (time and id only), which
    then share one group of their own."""
    parts = key[len(VERIFICATION_PREFIX):].split("_")
    return parts[1] if len(parts) == 3 else ""


def latest_verification(repo: Repository, select: SnapshotFilter | None = None,
                        known: frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """The newest readable verification record (keys begin with the verify's time) of a
    snapshot ``select`` matches (see ``verified_matches``; ``known``: the hex ids of the
    listed snapshots it matches). Given a host and a source, records of other registries
    are passed over by their key, unread."""
    wanted = registry_group(repo, select.host, select.source) if select and select.host and select.source else None
    for key in sorted((k for k, _ in repo.backend.list(VERIFICATION_PREFIX)), reverse=True):
        if wanted is not None and _group_of(key) not in ("", wanted):
            continue
        try:
            data = repo.backend.get(key)
            record = dict(open_object(Kind.VERIFICATION, data, key, repo.cipher))
            if key.rsplit("_", 1)[-1] == digest(data).hex() and verified_matches(record, select, known):
                return record
        except (ObjectNotFound, IntegrityError, UnsupportedFormat, ValueError, TypeError):
            continue  # deleted meanwhile, or damaged, or not a record: the one before tells something
    return None


def verified_matches(record: dict[str, Any], select: SnapshotFilter | None, known: frozenset[str]) -> bool:
    """Whether a verification record is of a snapshot ``select`` matches: judged by the
    snapshot's host, source and tags it names (as ``SnapshotFilter.matches`` judges a
    snapshot), not by the host that ran the verify, which may be another machine. A
    record older than those fields matches when its snapshot is among ``known``."""
    if select is None:
        return True
    if "snapshot_source" not in record:
        return str(record.get("snapshot")) in known
    return select.admits(record.get("snapshot_host"), record.get("snapshot_source"), record.get("snapshot_tags") or ())


@dataclass
class Status:
    snapshots: int
    newest: SnapshotInfo | None
    age: timedelta | None
    verification: dict[str, Any] | None
    verify_age: timedelta | None = None  # since the last verify ran
    problems: list[str] = field(default_factory=list)  # why the backup is not healthy
    check: dict[str, Any] | None = None  # the last check's record (format §6.15)

    @property
    def healthy(self) -> bool:
        return not self.problems


def repository_status(repo: Repository, now: datetime, max_age: timedelta | None = None,
                      select: SnapshotFilter | None = None, max_verify_age: timedelta | None = None) -> Status:
    """The newest snapshot (of those ``select`` matches) and the last verification of
    one, judged against ``max_age`` and ``max_verify_age``."""
    if select is None:  # one LIST, and the newest readable record
        keys = repo.snapshot_keys()
        newest = next(filter(None, map(repo.snapshot_if_readable, (key for _, _, key in reversed(keys)))), None)
        count, known = len(keys), frozenset[str]()
    else:
        matching = repo.snapshots(select)
        count, newest = len(matching), matching[-1] if matching else None
        known = frozenset(snap.id.hex() for snap in matching)
    verification = latest_verification(repo, select, known)
    verified_at = recorded_time(verification.get("time")) if verification else None
    status = Status(count, newest, now - newest.time if newest else None, verification,
                    now - verified_at if verified_at is not None else None)
    _judge_snapshot(status, max_age, select)
    _judge_verification(status, max_verify_age, select)
    _judge_repository(repo, status)
    return status


def _judge_repository(repo: Repository, status: Status) -> None:
    """Damage known and not yet repaired, a last check that failed, objects this status
    had to pass over: each makes the backup unhealthy until healed and checked clean."""
    repo.sync_index()  # damage records, and index objects no host has read (damaged ones are met)
    status.problems += repo.damage_warnings
    damaged = repo.catalog.damaged_packs()
    if damaged:
        unhealed = repo.catalog.unhealed_blobs()
        status.problems.append(f"{len(damaged)} pack(s) are recorded as damaged ({unhealed} blob(s) without an "
                               f"intact copy): take a snapshot, then run 'clubsnap repair packs'")
    status.check = damage.latest_check(repo.backend, repo.cipher)
    if status.check is not None and not status.check.get("ok"):
        first = (status.check.get("errors") or ["?"])[0]
        status.problems.append(f"the last check ({status.check.get('time')}) found {status.check.get('error_count')} "
                               f"error(s), first: {first}")
    for key in sorted(repo.damaged_objects):
        repair = "repair index" if key.startswith(INDEX_PREFIX) else "repair snapshots"
        status.problems.append(f"{key} is damaged: run 'clubsnap {repair}'")


def _judge_snapshot(status: Status, max_age: timedelta | None, select: SnapshotFilter | None) -> None:
    newest, age = status.newest, status.age
    if max_age is not None:
        if newest is None:
            status.problems.append(f"there is no snapshot{_of(select)}")
        elif age is not None and age > max_age:
            status.problems.append(f"the newest snapshot is {span(age)} old (bound {span(max_age)})")
    if age is not None and age < -CLOCK_SKEW:
        status.problems.append(f"the newest snapshot ({newest.id.short() if newest else '?'}) is dated "
                               f"{span(-age)} in the future: a clock is wrong, and its age proves nothing")
    if newest is not None and newest.record.get("partial"):
        status.problems.append(f"the newest snapshot ({newest.id.short()}) is partial: some files were unreadable")
    if newest is not None and newest.record.get("verified", {}).get("consistent") is False:
        status.problems.append(f"the newest snapshot ({newest.id.short()}) lacks blobs club.db names")
    lost = newest.record.get("lost") if newest is not None else None
    if newest is not None and lost:
        count = newest.record.get("lost_count", len(lost))
        status.problems.append(f"the newest snapshot ({newest.id.short()}) found {count} blob(s) club.db names "
                               f"missing from the data dir: {', '.join(lost[:3])}{', ...' if count > 3 else ''}")
    suspect = newest.record.get("suspect_databases") if newest is not None else None
    if newest is not None and suspect:
        status.problems.append(f"the newest snapshot ({newest.id.short()}) captured a database that looks "
                               f"damaged: {', '.join(suspect)} (see the snapshot's warnings)")


def _judge_verification(status: Status, max_verify_age: timedelta | None, select: SnapshotFilter | None) -> None:
    verification = status.verification
    if verification is not None and not verification.get("ok"):
        status.problems.append(f"the last verify (snapshot {str(verification.get('snapshot'))[:8]}, "
                               f"{verification.get('time')}) found {verification.get('missing', 0)} missing or "
                               f"wrong blob(s) and {verification.get('database', 0)} database problem(s)")
    if max_verify_age is None:
        return
    if verification is None:
        status.problems.append(f"no verify of a snapshot{_of(select)} is recorded")
    elif status.verify_age is None:
        status.problems.append("the last verify record has no valid time")
    elif status.verify_age > max_verify_age:
        status.problems.append(f"the last verify ran {span(status.verify_age)} ago (bound {span(max_verify_age)})")


def _of(select: SnapshotFilter | None) -> str:
    """What ``select`` picks, for a message (' of host h of /data'), or nothing."""
    described = select.describe() if select else ""
    return f" {described}" if described else ""


def span(delta: timedelta) -> str:
    """A duration for people: 45s, 12m, 3h05m, 2d4h."""
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600}h"

