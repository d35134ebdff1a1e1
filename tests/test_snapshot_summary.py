"""Snapshot summaries (docs/format.md §6.8): a host with an empty catalog lists many
snapshots with a few GETs, and a damaged or stale summary costs requests, never records."""

from __future__ import annotations

from pathlib import Path

from engine import Repository, create_snapshot, open_backend
from engine.format import SUMMARY_PREFIX
from engine.snapshot import SnapshotOptions
from engine.verify import check

from .conftest import Clock

EVERY = 5


def _take(repo: Repository, data: Path, clock: Clock, count: int) -> None:
    for _ in range(count):
        clock.advance(minutes=5)
        create_snapshot(repo, SnapshotOptions(source=data, host="h", now=clock))


def _small_data_dir(root: Path) -> Path:
    (root / "blobs" / "pkg" / "1.0.0" / "artifacts").mkdir(parents=True)
    (root / "blobs" / "pkg" / "1.0.0" / "artifacts" / "package.tar.gz").write_bytes(b"tarball" * 100)
    (root / "db").mkdir()
    return root


def _cold_listing(repo_path: Path, cache: Path) -> tuple[list[dict[str, object]], int]:
    cold = Repository.open(open_backend(str(repo_path)), cache)
    try:
        before = cold.backend.snapshot()["get"]
        records = [s.record for s in cold.snapshots()]
        return records, cold.backend.snapshot()["get"] - before
    finally:
        cold.close()


def test_cold_listing_reads_the_summary_not_every_record(repo: Repository, tmp_path: Path, clock: Clock) -> None:
    data = _small_data_dir(tmp_path / "data")
    repo.summary_every = EVERY
    _take(repo, data, clock, 2 * EVERY + 2)
    repo_path = Path(repo.backend.location)
    summaries = list(repo.backend.list(SUMMARY_PREFIX))
    assert len(summaries) == 1  # the first was replaced by the second
    expected = [s.record for s in repo.snapshots()]

    records, gets = _cold_listing(repo_path, tmp_path / "cold-cache")
    assert records == expected
    assert gets == 1 + 2  # the summary, then the two records taken after it

    # A damaged summary: every record is read instead, and check warns without failing.
    (repo_path / summaries[0][0]).write_bytes(b"garbage")
    records, gets = _cold_listing(repo_path, tmp_path / "cold-cache-2")
    assert records == expected and gets == len(expected) + 1
    report = check(repo)
    assert report.ok and any("summary" in w for w in report.warnings)


def test_a_summary_does_not_resurrect_a_deleted_snapshot(repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """A record the summary holds but snapshots/ no longer has (forgotten) stays gone."""
    data = _small_data_dir(tmp_path / "data")
    repo.summary_every = EVERY
    _take(repo, data, clock, EVERY)
    repo_path = Path(repo.backend.location)
    keys = [key for _, _, key in repo.snapshot_keys()]
    repo.backend.delete(keys[0])  # as a later forget would
    records, gets = _cold_listing(repo_path, tmp_path / "cold-cache")
    assert len(records) == EVERY - 1 and gets == 1


def test_summary_entries_that_do_not_hash_to_their_id_are_read_from_the_records(
        repo: Repository, tmp_path: Path, clock: Clock) -> None:
    from engine.format import Kind, digest, open_object, seal_object

    data = _small_data_dir(tmp_path / "data")
    repo.summary_every = EVERY
    _take(repo, data, clock, EVERY)
    (key, _), = repo.backend.list(SUMMARY_PREFIX)
    entries = open_object(Kind.SNAPSHOT_SUMMARY, repo.backend.get(key), key)["snapshots"]
    entries[0][1], entries[1][1] = entries[1][1], entries[0][1]  # two records under the wrong keys
    forged = seal_object(Kind.SNAPSHOT_SUMMARY, {"snapshots": entries})
    repo.backend.put(f"{SUMMARY_PREFIX}99991231T000000.000000Z_{digest(forged).hex()}", forged)
    expected = [s.record for s in repo.snapshots()]
    records, gets = _cold_listing(Path(repo.backend.location), tmp_path / "cold-cache")
    assert records == expected and gets == 1 + 2
