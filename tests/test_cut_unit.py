"""The consistent cut on small, hand-made data dirs (engine/consistency.py): what a named
blob missing from the data dir becomes (carried forward, lost, dangling), what the record,
the warnings and ``--verify`` say about it, when the databases are pinned again, and how a
``db/club.db`` that is not SQLite is flagged. Each data dir holds a club.db with only the
``package_versions`` columns the cut reads, so every case is fast and exact."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from engine import Repository, apply_restore, create_snapshot, plan_restore
from engine import snapshot as snapshot_module
from engine.clubcheck import Expected
from engine.consistency import live_names
from engine.snapshot import SnapshotOptions, SnapshotResult

from .conftest import Clock

SCHEMA = ("CREATE TABLE package_versions (package_name TEXT NOT NULL, version TEXT NOT NULL, "
          "archive_size_bytes INTEGER, archive_sha256 TEXT, screenshots TEXT, readme_content TEXT)")


def tarball_key(package: str, version: str) -> str:
    return f"{package}/{version}/artifacts/package.tar.gz"


def make_club(root: Path, versions: dict[tuple[str, str], bytes], *, write_blobs: bool = True) -> Path:
    """A data dir: one row per version (in the order given) and, unless told not to, its tarball."""
    (root / "db").mkdir(parents=True)
    (root / "blobs").mkdir()
    conn = sqlite3.connect(root / "db" / "club.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")  # as club's: a pinned reader does not block its writes
        conn.execute(SCHEMA)
        for (package, version), tarball in versions.items():
            add_row(conn, package, version, tarball)
    finally:
        conn.close()
    if write_blobs:
        for (package, version), tarball in versions.items():
            write_blob(root, tarball_key(package, version), tarball)
    return root


def add_row(conn: sqlite3.Connection, package: str, version: str, tarball: bytes, *,
            screenshots: str = "[]", readme: str | None = None) -> None:
    conn.execute("INSERT INTO package_versions VALUES (?, ?, ?, ?, ?, ?)",
                 (package, version, len(tarball), hashlib.sha256(tarball).hexdigest(), screenshots, readme))


def execute(club: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(club / "db" / "club.db", isolation_level=None)
    try:
        conn.execute(sql, args)
    finally:
        conn.close()


def write_blob(club: Path, key: str, data: bytes) -> Path:
    path = club / "blobs" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def snap(repo: Repository, club: Path, clock: Clock, **options: object) -> SnapshotResult:
    clock.advance(minutes=1)
    return create_snapshot(repo, SnapshotOptions(source=club, host="h", now=clock, **options))  # type: ignore[arg-type]


def restored(repo: Repository, result: SnapshotResult, target: Path) -> Path:
    apply_restore(repo, plan_restore(repo, result.info, target))
    return target


@pytest.fixture(autouse=True)
def short_second_look(monkeypatch: pytest.MonkeyPatch) -> None:
    """A named blob that never arrives is waited for at most SECOND_LOOK_S: a tenth of a
    second keeps these cases fast without changing what they decide."""
    monkeypatch.setattr(snapshot_module, "SECOND_LOOK_S", 0.1)


@pytest.fixture
def club(tmp_path: Path) -> Path:
    return make_club(tmp_path / "data", {("alpha", "1.0.0"): b"alpha one" * 50, ("alpha", "2.0.0"): b"alpha two",
                                         ("beta", "1.0.0"): b"beta one" * 300})


LOST = "blobs/" + tarball_key("alpha", "1.0.0")


def test_a_lost_version_is_carried_forward_whole_with_its_directories(
        repo: Repository, club: Path, clock: Clock, tmp_path: Path) -> None:
    """club.db still names a version whose whole directory is gone from the data dir: the
    snapshot restores it (the parent's copy, its directories with their modes) and says,
    in the record and a warning, that it is lost and where the copy came from."""
    (club / "blobs" / "alpha" / "1.0.0").chmod(0o750)
    (club / "blobs" / "alpha" / "1.0.0" / "artifacts").chmod(0o700)
    original = (club / LOST).read_bytes()
    first = snap(repo, club, clock, verify=True)
    assert first.info.record["verified"] == {"consistent": True, "checked": 3, "problems": [], "problem_count": 0}
    assert not {"lost", "lost_count", "carried_forward", "dangling"} & set(first.info.record)
    assert first.warnings == []
    shutil.rmtree(club / "blobs" / "alpha" / "1.0.0")

    second = snap(repo, club, clock, verify=True)
    record = second.info.record
    assert not second.partial, second.errors
    assert record["lost"] == [LOST] and record["lost_count"] == 1
    assert record["carried_forward"] == [LOST] and record["parent"] == bytes(first.info.id)
    assert "dangling" not in record
    assert record["verified"]["consistent"], record["verified"]  # carried: the snapshot is whole
    assert second.warnings == [f"{LOST}: lost: club.db names it but the data dir lacks it; "
                               f"carried forward from snapshot {first.info.id.short()}"]
    target = restored(repo, second, tmp_path / "restored")
    assert (target / LOST).read_bytes() == original
    assert stat.S_IMODE((target / "blobs" / "alpha" / "1.0.0").stat().st_mode) == 0o750
    assert stat.S_IMODE((target / "blobs" / "alpha" / "1.0.0" / "artifacts").stat().st_mode) == 0o700
    assert (target / "blobs" / "alpha" / "2.0.0" / "artifacts" / "package.tar.gz").read_bytes() == b"alpha two"

    # Still lost the next time: carried again, from the snapshot that carried it.
    third = snap(repo, club, clock)
    assert third.info.record["carried_forward"] == [LOST] and third.info.record["lost"] == [LOST]
    assert third.warnings == [f"{LOST}: lost: club.db names it but the data dir lacks it; "
                              f"carried forward from snapshot {second.info.id.short()}"]
    assert (restored(repo, third, tmp_path / "third") / LOST).read_bytes() == original


def test_a_missing_tarball_without_an_earlier_copy_is_lost_and_dangling(
        repo: Repository, club: Path, clock: Clock) -> None:
    """The first snapshot of a data dir that lacks a named tarball cannot restore it: the
    record says lost and dangling, --verify names the problem, and the warning says there
    is no earlier copy."""
    (club / LOST).unlink()
    result = snap(repo, club, clock, verify=True)
    record = result.info.record
    assert not result.partial
    assert record["lost"] == [LOST] and record["lost_count"] == 1
    assert record["dangling"] == [tarball_key("alpha", "1.0.0")]
    assert "carried_forward" not in record
    assert record["verified"] == {"consistent": False, "checked": 3,
                                  "problems": [f"{tarball_key('alpha', '1.0.0')}: missing"], "problem_count": 1}
    assert result.warnings == [f"{LOST}: lost: club.db names it but the data dir lacks it; no earlier copy"]


def test_a_parent_copy_of_other_bytes_than_the_row_is_not_carried(
        repo: Repository, club: Path, clock: Clock, tmp_path: Path) -> None:
    """A version republished (its row now names a tarball of another size) whose new
    tarball is missing: the parent's old tarball is not what the row names, so it is not
    carried forward; the snapshot says lost and dangling instead of restoring wrong bytes."""
    snap(repo, club, clock)
    (club / LOST).unlink()
    execute(club, "UPDATE package_versions SET archive_size_bytes = 7 WHERE package_name = 'alpha' "
                  "AND version = '1.0.0'")
    result = snap(repo, club, clock, verify=True)
    record = result.info.record
    assert record["lost"] == [LOST] and record["dangling"] == [tarball_key("alpha", "1.0.0")]
    assert "carried_forward" not in record
    assert record["verified"]["problems"] == [f"{tarball_key('alpha', '1.0.0')}: missing"]
    assert result.warnings == [f"{LOST}: lost: club.db names it but the data dir lacks it; no earlier copy"]
    assert not (restored(repo, result, tmp_path / "restored") / LOST).exists()


def test_a_new_row_whose_tarball_never_came_is_dangling_despite_a_parent(
        repo: Repository, club: Path, clock: Clock) -> None:
    """The parent snapshot has no copy of a version published since (row only): nothing
    to carry, so it is dangling and lost, with no earlier copy."""
    snap(repo, club, clock)
    execute(club, "INSERT INTO package_versions VALUES ('gamma', '0.1.0', 5, 'x', '[]', NULL)")
    result = snap(repo, club, clock, verify=True)
    record = result.info.record
    key = tarball_key("gamma", "0.1.0")
    assert record["dangling"] == [key] and record["lost"] == ["blobs/" + key] and "carried_forward" not in record
    assert record["verified"]["problems"] == [f"{key}: missing"] and record["verified"]["checked"] == 4


def test_a_parent_copy_whose_chunks_are_gone_is_not_carried(
        repo: Repository, club: Path, clock: Clock) -> None:
    """A carried entry must name only stored chunks: when the parent's copy of a lost
    tarball refers to a chunk the repository no longer has, nothing is carried and the
    blob is dangling (a restore of a carried entry would fail later, silently until then)."""
    first = snap(repo, club, clock)
    (club / LOST).unlink()
    original = snapshot_module.consistent_cut

    def chunks_gone(repo_: Repository, *args: object, **kwargs: object) -> object:
        exists = repo_.which_exist
        repo_.which_exist = lambda ids: set(exists(ids)) - set(ids[:1])  # type: ignore[method-assign]
        try:
            return original(repo_, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            del repo_.which_exist

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(snapshot_module, "consistent_cut", chunks_gone)
        result = snap(repo, club, clock)
    assert result.info.record["dangling"] == [tarball_key("alpha", "1.0.0")]
    assert "carried_forward" not in result.info.record
    assert result.info.record["lost"] == [LOST]
    assert first.info.id.short() not in result.warnings[0]


def test_more_lost_blobs_than_a_record_lists_are_counted(repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """A data dir that lost everything: the record lists the first 100 by name (sorted)
    and counts them all, so an operator sees the size of the damage."""
    versions = {("pkg", f"1.0.{n}"): b"x" * n for n in reversed(range(101))}
    club = make_club(tmp_path / "data", versions, write_blobs=False)
    result = snap(repo, club, clock, verify=True)
    record = result.info.record
    keys = [tarball_key(p, v) for p, v in versions]  # the rows' order: newest first
    assert record["lost_count"] == 101
    assert record["lost"] == sorted("blobs/" + k for k in keys)[:100]
    assert record["dangling"] == keys[:100]
    verified = record["verified"]
    assert verified["consistent"] is False and verified["checked"] == 101 and verified["problem_count"] == 101
    assert verified["problems"] == [f"{k}: missing" for k in keys[:100]]
    assert len(result.warnings) == 101 and result.warnings == sorted(result.warnings)


def test_a_blob_at_another_size_than_its_row_is_a_problem_not_lost(
        repo: Repository, club: Path, clock: Clock) -> None:
    """The data dir holds a tarball, but not of the size its row records: it is stored as
    found (never carried over from elsewhere), not lost, and --verify names both sizes."""
    path = club / "blobs" / tarball_key("beta", "1.0.0")
    path.write_bytes(b"short")
    result = snap(repo, club, clock, verify=True)
    record = result.info.record
    assert not {"lost", "carried_forward", "dangling"} & set(record)
    assert record["verified"]["problems"] == [f"{tarball_key('beta', '1.0.0')}: size 5, database says 2400"]
    assert record["stats"]["blobs_looked_again"] == 0 and record["stats"]["pins"] == 1


def test_a_directory_where_a_tarball_belongs_is_missing(repo: Repository, club: Path, clock: Clock) -> None:
    """Something that is not a regular file at a tarball's path is not the tarball."""
    (club / LOST).unlink()
    (club / LOST).mkdir()
    result = snap(repo, club, clock, verify=True)
    assert result.info.record["lost"] == [LOST]
    assert result.info.record["verified"]["problems"] == [f"{tarball_key('alpha', '1.0.0')}: missing"]
    assert result.info.record["stats"]["blobs_looked_again"] == 0


def test_an_asset_of_unknown_size_is_held_to_presence_only(repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """A README asset's row records no size: any file there is the asset; none is lost."""
    club = make_club(tmp_path / "data", {})
    readme = "![x](/api/packages/alpha/versions/1.0.0/readme-assets/0.png)"
    conn = sqlite3.connect(club / "db" / "club.db", isolation_level=None)
    add_row(conn, "alpha", "1.0.0", b"tar", readme=readme)
    conn.close()
    write_blob(club, tarball_key("alpha", "1.0.0"), b"tar")
    asset = write_blob(club, "alpha/1.0.0/readme-assets/0.png", b"any bytes at all")
    record = snap(repo, club, clock, verify=True).info.record
    assert record["verified"] == {"consistent": True, "checked": 2, "problems": [], "problem_count": 0}
    assert "lost" not in record
    asset.unlink()
    record = snap(repo, club, clock, verify=True).info.record
    assert record["lost"] == ["blobs/alpha/1.0.0/readme-assets/0.png"]
    assert record["carried_forward"] == ["blobs/alpha/1.0.0/readme-assets/0.png"]
    assert record["verified"]["consistent"]


def test_a_publish_during_the_scan_is_read_with_its_new_directories(
        repo: Repository, club: Path, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """club publishes a new package while blobs/ is scanned (row first, then tarball):
    the second look reads the tarball, and the restore has it in directories with the
    modes the data dir gave them."""
    key = tarball_key("delta", "3.0.0")
    readme = "![logo](/api/packages/delta/versions/3.0.0/readme-assets/1.png)"
    original = snapshot_module.scan_tier

    def racing_scan(root: bytes, tier: str, scan: snapshot_module.Scan) -> None:
        original(root, tier, scan)
        if tier == "blobs":
            execute(club, "INSERT INTO package_versions VALUES ('delta', '3.0.0', 11, 'x', '[]', ?)", readme)
            write_blob(club, key, b"new tarball")
            execute(club, "INSERT INTO package_versions VALUES ('delta', '3.0.1', 3, 'x', '[]', NULL)")
            write_blob(club, tarball_key("delta", "3.0.1"), b"new")
            write_blob(club, "delta/3.0.0/readme-assets/1.png", b"an image")
            (club / "blobs" / "delta").chmod(0o751)
            (club / "blobs" / "delta" / "3.0.0").chmod(0o705)

    monkeypatch.setattr(snapshot_module, "scan_tier", racing_scan)
    result = snap(repo, club, clock, verify=True)
    record = result.info.record
    assert record["verified"]["consistent"] and record["verified"]["checked"] == 6
    assert not {"lost", "carried_forward", "dangling"} & set(record)
    assert record["stats"]["blobs_looked_again"] == 3 and record["stats"]["pins"] == 1  # each read once
    target = restored(repo, result, tmp_path / "restored")
    assert (target / "blobs" / key).read_bytes() == b"new tarball"
    assert (target / "blobs" / "delta" / "3.0.0" / "readme-assets" / "1.png").read_bytes() == b"an image"
    assert stat.S_IMODE((target / "blobs" / "delta").stat().st_mode) == 0o751
    assert stat.S_IMODE((target / "blobs" / "delta" / "3.0.0").stat().st_mode) == 0o705
    assert (target / "blobs" / "alpha" / "2.0.0" / "artifacts" / "package.tar.gz").read_bytes() == b"alpha two"


def test_a_tarball_landing_late_in_the_second_look_is_waited_for(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """club's order: the row before the tarball. A tarball that lands only after the
    live database was asked twice is still read, not reported lost."""
    monkeypatch.setattr(snapshot_module, "SECOND_LOOK_S", 30.0)  # the tarball decides, not the clock
    execute(club, "INSERT INTO package_versions VALUES ('delta', '3.0.0', 4, 'x', '[]', NULL)")
    original = snapshot_module.live_names
    calls: list[int] = []

    def lands_on_the_third_ask(database: str, items: list[Expected]) -> dict[str, Expected]:
        calls.append(len(items))
        if len(calls) == 2:
            write_blob(club, tarball_key("delta", "3.0.0"), b"late")
        return original(database, items)

    monkeypatch.setattr(snapshot_module, "live_names", lands_on_the_third_ask)
    result = snap(repo, club, clock, verify=True)
    record = result.info.record
    assert record["verified"]["consistent"] and "lost" not in record
    assert record["stats"]["blobs_looked_again"] == 1 and record["stats"]["pins"] == 1
    assert calls == [1, 1]


def _count_live_names(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many names each ask of the live database carries, in order."""
    original = snapshot_module.live_names
    calls: list[int] = []

    def counted(database: str, items: list[Expected]) -> dict[str, Expected]:
        calls.append(len(items))
        return original(database, items)

    monkeypatch.setattr(snapshot_module, "live_names", counted)
    return calls


def test_a_blob_lost_at_the_parent_is_not_waited_for(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob the parent already recorded as lost is not a publish in flight: the second
    look asks the live database once and moves on instead of waiting out its deadline."""
    (club / LOST).unlink()
    assert snap(repo, club, clock).info.record["lost"] == [LOST]
    monkeypatch.setattr(snapshot_module, "SECOND_LOOK_S", 30.0)
    calls = _count_live_names(monkeypatch)
    result = snap(repo, club, clock)
    assert result.info.record["lost"] == [LOST] and result.info.record["dangling"] == [tarball_key("alpha", "1.0.0")]
    assert calls == [1, 1]  # the second look's one ask, and the cut's


def test_a_delete_that_outran_the_last_pin_is_not_lost(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """club deletes the row of a version already lost after the second look asked about
    it: the live database no longer names it when the cut is judged, so it is a delete
    (dangling, no copy to carry), not a lost blob."""
    (club / LOST).unlink()
    assert snap(repo, club, clock).info.record["lost"] == [LOST]
    original = snapshot_module.live_names
    calls: list[int] = []

    def row_deleted_after_the_look(database: str, items: list[Expected]) -> dict[str, Expected]:
        calls.append(len(items))
        found = original(database, items)
        execute(club, "DELETE FROM package_versions WHERE package_name = 'alpha' AND version = '1.0.0'")
        return found

    monkeypatch.setattr(snapshot_module, "live_names", row_deleted_after_the_look)
    result = snap(repo, club, clock)
    record = result.info.record
    assert calls == [1, 1] and record["stats"]["pins"] == 1
    assert "lost" not in record and record["dangling"] == [tarball_key("alpha", "1.0.0")]
    assert result.warnings == []


def test_a_missing_blob_is_waited_for_then_reported(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A named blob not lost before is waited for (the live database asked again and
    again, until the deadline), then reported lost with the pins taken once."""
    (club / LOST).unlink()
    monkeypatch.setattr(snapshot_module, "SECOND_LOOK_S", 0.5)
    calls = _count_live_names(monkeypatch)
    result = snap(repo, club, clock)
    assert result.info.record["lost"] == [LOST] and result.info.record["stats"]["pins"] == 1
    assert len(calls) >= 3 and set(calls) == {1}


def test_pins_are_taken_again_at_most_four_times_and_warnings_said_once(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the live database keeps disowning a blob the pin names (club deleting it),
    the databases are pinned again, at most MAX_PINS times; what a released pin said (a
    row problem) is said once, as of the last pin. The blob ends up a delete that outran
    the pins: dangling, not lost."""
    (club / LOST).unlink()
    conn = sqlite3.connect(club / "db" / "club.db", isolation_level=None)
    add_row(conn, "beta", "2.0.0", b"b2", screenshots="not json")
    conn.close()
    write_blob(club, tarball_key("beta", "2.0.0"), b"b2")
    asked: list[list[str]] = []

    def deleting(database: str, items: list[Expected]) -> dict[str, Expected]:
        asked.append([i.key for i in items])
        return {}

    monkeypatch.setattr(snapshot_module, "live_names", deleting)
    result = snap(repo, club, clock)
    record = result.info.record
    assert record["stats"]["pins"] == 4
    assert len(asked) == 5  # one per pin, and the cut's
    assert result.warnings == ["db/club.db: package_versions beta 2.0.0: screenshots is not a list of objects"]
    assert "lost" not in record and record["dangling"] == [tarball_key("alpha", "1.0.0")]


def test_a_delete_straddling_the_pin_pins_again_and_ends_clean(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """club deletes a version's blobs before the pin and its row just after: the live
    database no longer names it, so the databases are pinned again, and the new pin does
    not name it either: nothing is lost, nothing dangles, the snapshot is consistent."""
    (club / LOST).unlink()
    original = snapshot_module.live_names

    def row_deleted_now(database: str, items: list[Expected]) -> dict[str, Expected]:
        execute(club, "DELETE FROM package_versions WHERE package_name = 'alpha' AND version = '1.0.0'")
        return original(database, items)

    monkeypatch.setattr(snapshot_module, "live_names", row_deleted_now)
    result = snap(repo, club, clock, verify=True)
    record = result.info.record
    assert record["stats"]["pins"] == 2
    assert record["verified"] == {"consistent": True, "checked": 2, "problems": [], "problem_count": 0}
    assert not {"lost", "carried_forward", "dangling"} & set(record) and result.warnings == []


def test_live_names_reads_the_newest_commit(club: Path) -> None:
    """The live database is asked on its newest commit, per version: a deleted row names
    nothing, a republished row names its new size, an untouched row names itself."""
    database = str(club / "db" / "club.db")
    pinned = [Expected(tarball_key("alpha", "1.0.0"), 450), Expected(tarball_key("alpha", "2.0.0"), 9),
              Expected(tarball_key("beta", "1.0.0"), 2400)]
    assert live_names(database, pinned) == {e.key: e for e in pinned} | {
        e.key: Expected(e.key, e.size, live_names(database, [e])[e.key].sha256) for e in pinned}
    execute(club, "DELETE FROM package_versions WHERE version = '2.0.0'")
    execute(club, "UPDATE package_versions SET archive_size_bytes = 1 WHERE package_name = 'beta'")
    live = live_names(database, pinned)
    assert set(live) == {tarball_key("alpha", "1.0.0"), tarball_key("beta", "1.0.0")}
    assert live[tarball_key("alpha", "1.0.0")].size == 450 and live[tarball_key("beta", "1.0.0")].size == 1


def test_live_names_of_a_database_it_cannot_read_names_all_as_pinned(tmp_path: Path) -> None:
    """A database that cannot be opened or read (a stopped club on a read-only mount, or
    not a database now): nothing can be deleting its blobs, so all count as still named."""
    items = [Expected("a/1/artifacts/package.tar.gz", 3), Expected("b/2/artifacts/package.tar.gz", 4)]
    assert live_names(str(tmp_path / "absent" / "club.db"), items) == {i.key: i for i in items}
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    assert live_names(str(garbage), items) == {i.key: i for i in items}
    empty_schema = tmp_path / "other.db"
    sqlite3.connect(empty_schema).close()
    assert live_names(str(empty_schema), items) == {i.key: i for i in items}


# ---- a db/club.db that is not SQLite (check_unsniffed, _header_problem) -------------------------

@pytest.mark.parametrize(("content", "reason"), [
    (b"", "empty, not a SQLite database"),
    (bytes(100), "its header is zeroed: not a SQLite database"),
    (bytes(100) + b"then some text", "its header is zeroed: not a SQLite database"),
    (bytes(99) + b"\x01", "its header is not SQLite's: not a SQLite database"),
    (b"\x00text", "its header is not SQLite's: not a SQLite database"),
    (b"PRAGMA nothing; this is a text file", "its header is not SQLite's: not a SQLite database"),
])
def test_a_club_db_that_is_not_sqlite_is_kept_and_flagged(
        repo: Repository, tmp_path: Path, clock: Clock, content: bytes, reason: str) -> None:
    """club's database replaced by zeros or foreign bytes is stored (it is all there is)
    but flagged in the record and a warning that says what is wrong with it; another
    non-SQLite file in db/ is just a file."""
    club = tmp_path / "data"
    (club / "db").mkdir(parents=True)
    (club / "db" / "club.db").write_bytes(content)
    (club / "db" / "notes.txt").write_bytes(b"")
    result = snap(repo, club, clock, verify=True)
    record = result.info.record
    assert result.warnings == [f"db/club.db: suspect: {reason}; stored as a plain file"]
    assert record["suspect_databases"] == ["db/club.db"]
    assert "verified" not in record  # no club.db to hold blobs to
    restored_db = restored(repo, result, tmp_path / "restored") / "db" / "club.db"
    assert restored_db.read_bytes() == content


def test_a_club_db_gone_before_its_header_is_read_is_flagged_unreadable(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    club = tmp_path / "data"
    (club / "db").mkdir(parents=True)
    (club / "db" / "club.db").write_bytes(b"plain")
    original = snapshot_module.scan_tier

    def then_deleted(root: bytes, tier: str, scan: snapshot_module.Scan) -> None:
        original(root, tier, scan)
        if tier == "blobs":
            (club / "db" / "club.db").unlink()

    monkeypatch.setattr(snapshot_module, "scan_tier", then_deleted)
    result = snap(repo, club, clock)
    assert result.warnings == ["db/club.db: suspect: unreadable (No such file or directory); stored as a plain file"]
    assert result.info.record["suspect_databases"] == ["db/club.db"]


def test_a_sqlite_club_db_is_not_flagged_and_unchanged_is_not_read_again(
        repo: Repository, club: Path, clock: Clock) -> None:
    """A healthy club.db is captured without a warning; the next snapshot pins it against
    the parent's capture and, finding it unchanged, reads none of its pages."""
    result = snap(repo, club, clock)
    assert result.warnings == [] and "suspect_databases" not in result.info.record
    assert [d["path"] for d in result.info.record["databases"]] == [b"db/club.db"]
    ctime = (club / "db" / "club.db").stat().st_ctime_ns
    while time.time_ns() - ctime <= snapshot_module.RACY_WINDOW_NS + 5_000_000:
        time.sleep(0.01)  # older than the racy window, so its fingerprint is trusted
    snap(repo, club, clock)  # trusted now: its fingerprint is recorded
    second = snap(repo, club, clock)
    assert second.info.record["databases"][0]["bytes_read"] == 0
    assert second.info.record["databases"][0]["pages_changed"] == 0


def test_a_capture_failing_quick_check_names_its_first_problems(
        repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """A club.db whose pages are damaged: kept, and flagged with what quick_check said
    (its first five problems at most, so the record stays small)."""
    club = make_club(tmp_path / "data", {})
    conn = sqlite3.connect(club / "db" / "club.db", isolation_level=None)
    conn.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("CREATE INDEX filler_body ON filler (body)")
    conn.executemany("INSERT INTO filler (body) VALUES (?)", [(f"row {n} " * 40,) for n in range(2000)])
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    with open(club / "db" / "club.db", "r+b") as handle:
        for page in range(pages // 3, pages - 2, 3):
            handle.seek(page * page_size + 8)
            handle.write(b"\xa5" * (page_size - 16))
    result = snap(repo, club, clock)
    record = result.info.record
    assert record["suspect_databases"] == ["db/club.db"]
    suspect = record["databases"][0]["suspect"]
    lines = suspect.splitlines()
    assert lines[0] == "quick_check at capture failed: *** in database main ***"
    assert len(lines) == 6 and all(line.startswith("On tree page ") for line in lines[1:]), suspect
    assert result.warnings[-1] == f"db/club.db: suspect: {suspect}"


def test_logs_are_taken_only_when_asked_for(repo: Repository, club: Path, clock: Clock, tmp_path: Path) -> None:
    """logs/ is an optional tier: left out by default, in the snapshot with include_logs."""
    (club / "logs").mkdir()
    (club / "logs" / "scoring.log").write_bytes(b"scored\n")
    without = snap(repo, club, clock)
    assert not (restored(repo, without, tmp_path / "without") / "logs").exists()
    with_logs = snap(repo, club, clock, include_logs=True)
    assert (restored(repo, with_logs, tmp_path / "with") / "logs" / "scoring.log").read_bytes() == b"scored\n"


def test_a_publish_into_the_blob_bucket_after_its_listing_is_read_by_the_second_look(
        repo: Repository, tmp_path: Path, clock: Clock, s3_env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """club on S3: a version published (row, then object) after the bucket was listed is
    read from the bucket by the second look and restores; an object at another size than
    its row is not taken for the row's (stored as listed, and named by --verify)."""
    from engine.backends.s3 import S3Backend, S3Settings

    from .conftest import s3_client

    versions = {("alpha", "1.0.0"): b"alpha one", ("beta", "1.0.0"): b"beta one"}
    club = make_club(tmp_path / "data", versions, write_blobs=False)
    shutil.rmtree(club / "blobs")
    bucket = f"club-cut-{os.getpid()}-{len(str(tmp_path))}"
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=f"store/{tarball_key('alpha', '1.0.0')}", Body=b"alpha one")
    client.put_object(Bucket=bucket, Key=f"store/{tarball_key('beta', '1.0.0')}", Body=b"beta  one, longer")
    original = snapshot_module.bucket.list_blob_store

    def publish_after_listing(store: S3Backend) -> object:
        listing = original(store)
        execute(club, "INSERT INTO package_versions VALUES ('gamma', '2.0.0', 9, 'x', '[]', NULL)")
        client.put_object(Bucket=bucket, Key=f"store/{tarball_key('gamma', '2.0.0')}", Body=b"published")
        return listing

    monkeypatch.setattr(snapshot_module.bucket, "list_blob_store", publish_after_listing)
    store = S3Backend(f"s3://{bucket}/store", S3Settings.from_environ(os.environ, "CLUBSNAP_BLOBS_S3_"))
    result = snap(repo, club, clock, verify=True, blob_store=store)
    record = result.info.record
    assert record["stats"]["blobs_looked_again"] == 1 and record["stats"]["pins"] == 1
    assert record["verified"]["problems"] == [f"{tarball_key('beta', '1.0.0')}: size 17, database says 8"]
    assert not {"lost", "carried_forward", "dangling"} & set(record)
    target = restored(repo, result, tmp_path / "restored")
    assert (target / "blobs" / tarball_key("gamma", "2.0.0")).read_bytes() == b"published"
    assert (target / "blobs" / tarball_key("beta", "1.0.0")).read_bytes() == b"beta  one, longer"


def test_progress_counts_every_file_and_database(repo: Repository, club: Path, clock: Clock) -> None:
    """The progress an operator watches ends at its total: every file and database."""
    seen: list[snapshot_module.Progress] = []
    snap(repo, club, clock, progress=seen.append)
    assert seen and {p.files_total for p in seen} == {4}  # three tarballs and club.db
    assert (seen[-1].files_done, seen[-1].bytes_done) == (4, seen[-1].bytes_total)


def test_a_tier_that_cannot_be_scanned_makes_the_snapshot_partial(
        repo: Repository, club: Path, clock: Clock) -> None:
    """A tier the scan cannot enter (here a symlink loop where logs/ belongs) is an error
    the snapshot reports: it is partial, never silently smaller."""
    os.symlink("logs", club / "logs")
    result = snap(repo, club, clock, include_logs=True)
    assert result.partial and result.errors == ["logs: Too many levels of symbolic links"]
    assert result.info.record["partial"] and result.info.record["errors"] == result.errors


def test_a_database_that_cannot_be_captured_is_one_error_across_pins(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A db/ file with SQLite's header that SQLite cannot open is an error (the snapshot is
    partial), said once even when the databases are pinned again and again; the other
    databases are still captured."""
    (club / "db" / "broken.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    (club / LOST).unlink()
    monkeypatch.setattr(snapshot_module, "live_names", lambda database, items: {})  # club deleting it
    result = snap(repo, club, clock)
    record = result.info.record
    assert record["stats"]["pins"] == 4
    assert len(result.errors) == 1 and result.errors[0].startswith("db/broken.db: cannot capture SQLite database (")
    assert result.partial and record["errors"] == result.errors
    assert [d["path"] for d in record["databases"]] == [b"db/club.db"]


def test_a_capture_breaking_its_own_constraints_lists_five_problems(
        repo: Repository, tmp_path: Path, clock: Clock) -> None:
    """Rows that break their table's NOT NULL (a schema edited behind SQLite's back):
    quick_check names each one; the record keeps the first five, one after another."""
    club = make_club(tmp_path / "data", {})
    conn = sqlite3.connect(club / "db" / "club.db", isolation_level=None)
    conn.execute("CREATE TABLE t (a)")
    conn.executemany("INSERT INTO t VALUES (NULL)", [()] * 8)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = 'CREATE TABLE t (a NOT NULL)' WHERE name = 't'")
    conn.close()
    result = snap(repo, club, clock)
    suspect = "quick_check at capture failed: " + "; ".join(["NULL value in t.a"] * 5)
    assert result.info.record["databases"][0]["suspect"] == suspect
    assert result.warnings == [f"db/club.db: suspect: {suspect}"]


def test_the_first_publish_into_a_data_dir_without_blobs_is_read_whole(
        repo: Repository, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """blobs/ itself appears during the scan (club's very first publish): the second look
    reads the tarball and the restore has it, blobs/ and all."""
    club = make_club(tmp_path / "data", {})
    shutil.rmtree(club / "blobs")
    key = tarball_key("first", "1.0.0")
    original = snapshot_module.scan_tier

    def first_publish(root: bytes, tier: str, scan: snapshot_module.Scan) -> None:
        original(root, tier, scan)
        if tier == "blobs":
            execute(club, "INSERT INTO package_versions VALUES ('first', '1.0.0', 5, 'x', '[]', NULL)")
            write_blob(club, key, b"first")

    monkeypatch.setattr(snapshot_module, "scan_tier", first_publish)
    result = snap(repo, club, clock, verify=True)
    assert result.info.record["verified"]["consistent"] and result.info.record["stats"]["blobs_looked_again"] == 1
    assert (restored(repo, result, tmp_path / "restored") / "blobs" / key).read_bytes() == b"first"


def test_a_database_new_since_the_parent_is_captured(repo: Repository, club: Path, clock: Clock) -> None:
    """A database the parent snapshot did not have (club added one) is captured like any."""
    snap(repo, club, clock)
    sqlite3.connect(club / "db" / "extra.db").execute("CREATE TABLE x (a)").connection.close()
    result = snap(repo, club, clock)
    assert [d["path"] for d in result.info.record["databases"]] == [b"db/club.db", b"db/extra.db"]
    assert not result.partial


def test_a_database_cut_short_after_its_pin_is_an_error(
        repo: Repository, club: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database truncated behind SQLite's back between the pin and the page reads
    cannot be captured: an error that names it, not a silently short copy."""
    extra = club / "db" / "extra.db"
    conn = sqlite3.connect(extra, isolation_level=None)
    conn.execute("CREATE TABLE x (a)")
    conn.executemany("INSERT INTO x VALUES (?)", [("y" * 500,)] * 50)
    conn.close()
    original = snapshot_module._SnapshotBuilder.second_look

    def truncate_then_look(self: snapshot_module._SnapshotBuilder, look: snapshot_module._Look) -> object:
        os.truncate(extra, 4096)
        return original(self, look)

    monkeypatch.setattr(snapshot_module._SnapshotBuilder, "second_look", truncate_then_look)
    result = snap(repo, club, clock)
    assert len(result.errors) == 1 and result.errors[0].startswith("db/extra.db: cannot capture SQLite database ("), \
        result.errors
    assert result.partial
