"""SQLite capture, one database at a time: what a pin records, the stopped database on a
read-only mount (read as immutable, checked unchanged afterwards), and the one-line
explanations an operator gets when a database cannot be captured.

A read-only mount is emulated with the immutable attribute (root, as CI runs) or with
permissions (any other user): SQLite and ``os.access`` see both as a read-only mount."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from engine.sources import sqlite as capture

from .test_sqlite_capture import _same_except_backup_header

STOPPED = "immutable: club stopped, read-only mount"


def _database(path: Path, journal: str = "wal", rows: int = 200) -> Path:
    """A small database, closed cleanly: in WAL mode its -wal and -shm are gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode={journal}")
    conn.execute("PRAGMA user_version=7")
    conn.execute("CREATE TABLE numbered(n INTEGER PRIMARY KEY, pad BLOB)")
    conn.executemany("INSERT INTO numbered VALUES (?, randomblob(500))", [(i,) for i in range(1, rows + 1)])
    conn.commit()
    conn.close()
    return path


def _in_another_process(db: Path, *statements: str) -> None:
    """Run statements and die without closing, as a crashed club does: its -wal (or hot
    journal) stays behind."""
    code = ("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('PRAGMA wal_autocheckpoint=0')\nc.execute('PRAGMA cache_size=1')\n"
            "for s in sys.argv[2:]: c.execute(s).fetchall()\nimport os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(db), *statements], check=True)


def _lock(path: Path, on: bool) -> None:
    if os.geteuid() == 0:  # root ignores permissions, not the immutable attribute
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    elif on:
        path.chmod(path.stat().st_mode & ~0o222)
    else:
        path.chmod(path.stat().st_mode | 0o200)


@contextmanager
def _unwritable(*paths: Path) -> Iterator[None]:
    """Make files or directories unwritable for this process, as a read-only mount is."""
    done: list[Path] = []
    try:
        for path in paths:
            _lock(path, True)
            done.append(path)
        yield
    finally:
        for path in reversed(done):
            _lock(path, False)


def _capture_error(db: Path) -> str:
    with pytest.raises(capture.CaptureError) as caught:
        with capture.pinned_image(str(db)):
            pass
    return str(caught.value)


def _rows(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM numbered").fetchone()[0])


# ---- what a pin records --------------------------------------------------------------------

def test_a_rollback_journal_database_is_pinned_and_described(tmp_path: Path) -> None:
    """The record says how the image was taken and what it is: an operator (and the
    restore) reads the journal mode and page geometry from it."""
    db = _database(tmp_path / "club.db", journal="delete")
    with capture.pinned_image(str(db)) as image:
        assert image.info == {"method": "page-read", "journal_mode": "rollback", "page_size": 4096,
                              "page_count": image.page_count, "freelist_count": 0, "user_version": 7,
                              "schema_version": image.info["schema_version"],
                              "sqlite_version": sqlite3.sqlite_version}
        assert image.page_count * 4096 == db.stat().st_size == image.size
        assert b"".join(image.pages()) == db.read_bytes()
        assert _rows(image.connection) == 200
        first = image.fingerprint
    with capture.pinned_image(str(db)) as again:
        assert again.fingerprint == first  # an untouched file: the same image


def test_a_wal_database_pin_records_its_wal_state(tmp_path: Path) -> None:
    db = _database(tmp_path / "club.db")
    holder = sqlite3.connect(db)  # keeps the WAL between pins, as a running club does
    try:
        holder.execute("INSERT INTO numbered VALUES (1000, NULL)")
        holder.commit()
        with capture.pinned_image(str(db)) as image:
            info = image.info
            assert (info["method"], info["journal_mode"], info["sealed"]) == ("page-read", "wal", False)
            assert info["wal_frames"] > info["wal_frames_checkpointed"] == 0
            assert info["wal_bytes"] == os.path.getsize(f"{db}-wal") > 0 and "seal_ms" not in info
            assert info["user_version"] == 7 and info["page_count"] == image.page_count
            assert _rows(image.connection) == 201
            # The pages the WAL holds are laid over the file's: the image SQLite reads.
            oracle = sqlite3.connect(":memory:")
            image.connection.backup(oracle)
            assert _same_except_backup_header(b"".join(image.pages()), oracle.serialize())
            first = image.fingerprint
        holder.execute("INSERT INTO numbered VALUES (1001, NULL)")  # only the WAL changes
        holder.commit()
        with capture.pinned_image(str(db)) as image:
            assert image.fingerprint != first and _rows(image.connection) == 202
    finally:
        holder.close()


def test_a_wal_rewritten_under_the_pin_fails_the_capture(tmp_path: Path) -> None:
    """Impossible for SQLite while the read transaction is held: a foreign program
    rewriting the WAL (its header's salt changes) must fail the capture, not tear it."""
    db = _database(tmp_path / "club.db")
    holder = sqlite3.connect(db)
    try:
        holder.execute("INSERT INTO numbered VALUES (1000, NULL)")
        holder.commit()
        with capture.pinned_image(str(db)) as image:
            fd = os.open(f"{db}-wal", os.O_RDWR)
            try:
                os.pwrite(fd, bytes(8), 16)  # the salt
            finally:
                os.close(fd)
            with pytest.raises(capture.CaptureError, match=r"^the WAL restarted during the capture \(impossible "
                                                            r"while pinned: not SQLite\?\)$"):
                b"".join(image.pages())
    finally:
        holder.close()


def test_a_database_file_cut_short_under_the_pin_fails_the_capture(tmp_path: Path) -> None:
    """Impossible under the read lock, unless another program truncates the file: the
    capture names the first page missing instead of storing a short image."""
    db = _database(tmp_path / "club.db", journal="delete")
    with capture.pinned_image(str(db)) as image:
        os.truncate(db, 10 * 4096)
        with pytest.raises(capture.CaptureError, match="^page 11 is neither in the database file nor in its WAL$"):
            b"".join(image.pages())


def test_a_journal_mode_that_keeps_changing_while_pinning_fails_after_three_tries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal mode is read again after pinning; a change means a new pin, three
    times at most (the flips are injected on the real header reads)."""
    db = _database(tmp_path / "club.db")
    real = capture._is_wal
    calls = 0

    def flipping(fd: int) -> bool:
        nonlocal calls
        calls += 1
        return real(fd) if calls > 6 else calls % 2 == 1  # WAL before each pin, rollback after

    monkeypatch.setattr(capture, "_is_wal", flipping)
    assert _capture_error(db) == "the journal mode keeps changing"
    assert calls == 6
    monkeypatch.undo()
    with capture.pinned_image(str(db)) as image:  # settled: pinned at once
        assert _rows(image.connection) == 200


def test_a_pin_that_a_commit_interrupted_is_tried_again_without_a_seal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit landing while the read transaction starts (injected: the first two tries
    see the header change) costs another try, not a seal."""
    db = _database(tmp_path / "club.db")
    real = capture._try_pin
    tries = 0

    def interrupted(conn: sqlite3.Connection, shm_fd: int):  # type: ignore[no-untyped-def]
        nonlocal tries
        tries += 1
        return None if tries <= 2 else real(conn, shm_fd)

    monkeypatch.setattr(capture, "_try_pin", interrupted)
    holder = sqlite3.connect(db)
    try:
        holder.execute("INSERT INTO numbered VALUES (1000, NULL)")
        holder.commit()
        with capture.pinned_image(str(db)) as image:
            assert image.info["sealed"] is False and tries == 3 and _rows(image.connection) == 201
    finally:
        holder.close()


def test_a_sealed_pin_records_how_long_it_held_the_writer_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture, "OPTIMISTIC_TRIES", 0)  # straight to the sealed pin
    db = _database(tmp_path / "club.db")
    holder = sqlite3.connect(db)
    try:
        holder.execute("INSERT INTO numbered VALUES (1000, NULL)")
        holder.commit()
        with capture.pinned_image(str(db)) as image:
            assert image.info["sealed"] is True and image.info["seal_ms"] >= 0
            assert _rows(image.connection) == 201
        holder.execute("INSERT INTO numbered VALUES (1001, NULL)")  # the seal is gone: club commits
        holder.commit()
    finally:
        holder.close()


@pytest.mark.parametrize("pages", [256, 257, 258])
def test_every_page_is_read_whatever_the_page_count(tmp_path: Path, pages: int) -> None:
    """Pages are read in blocks of 256: a count just past a block boundary still reads
    its last pages."""
    db = tmp_path / "club.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=delete")
    conn.execute("CREATE TABLE t(x BLOB)")
    while (count := conn.execute("PRAGMA page_count").fetchone()[0]) < pages:
        conn.execute("INSERT INTO t VALUES (randomblob(3000))")  # one overflowing row, one more page
        conn.commit()
    conn.close()
    assert count == pages
    with capture.pinned_image(str(db)) as image:
        assert image.page_count == pages and b"".join(image.pages()) == db.read_bytes()


def test_a_read_error_while_reading_pages_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing disk (fault injected on the real reads): the capture fails with the
    system's words, never with a short image."""
    import errno

    db = _database(tmp_path / "club.db", journal="delete")
    with capture.pinned_image(str(db)) as image:
        def failing(fd: int, length: int, offset: int) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(capture.os, "pread", failing)
        with pytest.raises(capture.CaptureError, match=r"^reading failed \(Input/output error\)$"):
            b"".join(image.pages())
        monkeypatch.undo()


# ---- a stopped club's database on a read-only mount ---------------------------------------

@pytest.mark.parametrize("empty_wal", [False, True])
def test_a_stopped_database_on_a_read_only_mount_is_read_as_immutable(tmp_path: Path, empty_wal: bool) -> None:
    """club stopped cleanly (no -shm; no -wal, or an empty one): SQLite could not create
    the -shm on a read-only mount, yet the file alone holds every commit."""
    db = _database(tmp_path / "db" / "club.db")
    if empty_wal:
        Path(f"{db}-wal").write_bytes(b"")
    content = db.read_bytes()
    with _unwritable(db.parent):
        with capture.pinned_image(str(db)) as image:
            assert image.info == {"method": "page-read", "journal_mode": "wal", "read": STOPPED,
                                  "page_size": 4096, "page_count": len(content) // 4096, "freelist_count": 0,
                                  "user_version": 7, "schema_version": image.info["schema_version"],
                                  "sqlite_version": sqlite3.sqlite_version}
            assert b"".join(image.pages()) == content and image.size == len(content)
            assert _rows(image.connection) == 200
            first = image.fingerprint
        with capture.pinned_image(str(db)) as again:
            assert again.fingerprint == first
    assert not Path(f"{db}-shm").exists()  # nothing was created beside it


@pytest.mark.parametrize("change", ["file times", "a -wal", "an -shm"])
def test_club_starting_while_its_stopped_database_is_read_fails_the_capture(tmp_path: Path, change: str) -> None:
    """Immutable is a promise nobody writes the file: a change seen afterwards (club
    started through its own read-write mount) means the pages read may be torn."""
    db = _database(tmp_path / "db" / "club.db")
    with _unwritable(db.parent):
        with pytest.raises(capture.CaptureError, match="^club started while its stopped database was read from "
                                                        "the read-only mount: snapshot again$"):
            with capture.pinned_image(str(db)) as image:
                b"".join(image.pages())
                if change == "file times":
                    os.utime(db, ns=(1, 1))
                else:
                    _lock(db.parent, False)  # club's mount is writable
                    Path(f"{db}{'-wal' if change == 'a -wal' else '-shm'}").write_bytes(b"x" * 32)
                    _lock(db.parent, True)


def test_a_stopped_database_that_vanishes_as_it_is_opened_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted between the read-only probe and the open (fault injected on the open)."""
    import errno

    db = _database(tmp_path / "db" / "club.db")
    real_open = os.open

    def vanishing(path: str, flags: int, *args: int) -> int:
        if path == str(db):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        return real_open(path, flags, *args)

    with _unwritable(db.parent):
        monkeypatch.setattr(capture.os, "open", vanishing)
        assert _capture_error(db) == "No such file or directory"
        monkeypatch.undo()


def test_a_running_club_with_an_empty_wal_on_a_read_only_mount_is_not_taken_for_stopped(tmp_path: Path) -> None:
    """club runs (its -shm is there) and just checkpointed its WAL to nothing: the pin
    goes through SQLite's locks, for club may commit at any moment."""
    db = _database(tmp_path / "db" / "club.db")
    holder = sqlite3.connect(db)
    try:
        holder.execute("INSERT INTO numbered VALUES (1000, NULL)")
        holder.commit()
        holder.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert os.path.getsize(f"{db}-wal") == 0 and Path(f"{db}-shm").exists()
        with _unwritable(db.parent):
            with capture.pinned_image(str(db)) as image:
                assert "read" not in image.info and image.info["wal_frames"] == 0
                assert _rows(image.connection) == 201
    finally:
        holder.close()


def test_a_rollback_database_on_a_read_only_mount_is_read_normally(tmp_path: Path) -> None:
    """Only a WAL database needs an -shm: a rollback-journal one is read with its lock."""
    db = _database(tmp_path / "db" / "club.db", journal="delete")
    with _unwritable(db.parent):
        with capture.pinned_image(str(db)) as image:
            assert image.info["journal_mode"] == "rollback" and "read" not in image.info
            assert b"".join(image.pages()) == db.read_bytes()


def test_a_missing_database_on_a_read_only_mount_is_named(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    with _unwritable(tmp_path / "db"):
        assert _capture_error(tmp_path / "db" / "club.db") == "No such file or directory"


# ---- why a database cannot be captured -----------------------------------------------------

def test_a_crashed_clubs_wal_without_its_index_on_a_read_only_mount_is_explained(tmp_path: Path) -> None:
    db = _database(tmp_path / "db" / "club.db")
    _in_another_process(db, "INSERT INTO numbered VALUES (1000, NULL)")
    Path(f"{db}-shm").unlink()
    assert os.path.getsize(f"{db}-wal") > 0
    with _unwritable(db.parent):
        assert _capture_error(db) == (
            "unable to open database file: its -wal holds transactions but there is no -shm index, and a "
            "read-only mount cannot rebuild it (club crashed?): start club once, or mount the data dir read-write")


def test_a_missing_database_is_named(tmp_path: Path) -> None:
    assert _capture_error(tmp_path / "club.db") == "No such file or directory"


@pytest.mark.parametrize("journal", ["crash", "one byte"])
def test_a_hot_journal_is_explained(tmp_path: Path, journal: str) -> None:
    """A crashed rollback-journal writer left a hot journal: a read-only reader cannot
    roll it back, and the operator is told what to do."""
    db = _database(tmp_path / "club.db", journal="delete")
    if journal == "crash":
        _in_another_process(db, "BEGIN", "UPDATE numbered SET pad = randomblob(500)")
    else:
        Path(f"{db}-journal").write_bytes(b"\x01")  # however short, SQLite takes it as hot
    assert os.path.getsize(f"{db}-journal") > 0
    assert _capture_error(db) == (
        "attempt to write a readonly database: a hot journal (club.db-journal) needs recovery by a writer; "
        "start club once so that it rolls the interrupted transaction back")


def test_an_empty_journal_is_no_hot_journal(tmp_path: Path) -> None:
    db = _database(tmp_path / "club.db", journal="delete")
    Path(f"{db}-journal").write_bytes(b"")
    with capture.pinned_image(str(db)) as image:
        assert _rows(image.connection) == 200


@pytest.mark.parametrize("unwritable", ["wal", "database and wal"])
def test_a_seal_that_needs_write_access_is_explained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unwritable: str) -> None:
    """Commits kept landing (no optimistic pin), and the seal's write lock cannot be
    taken: on a read-only mount the operator learns why; otherwise SQLite's words."""
    monkeypatch.setattr(capture, "OPTIMISTIC_TRIES", 0)
    db = _database(tmp_path / "club.db")
    Path(f"{db}-journal").write_bytes(b"")  # a stale empty journal is no hot journal
    holder = sqlite3.connect(db)
    try:
        holder.execute("INSERT INTO numbered VALUES (1000, NULL)")
        holder.commit()
        wal = Path(f"{db}-wal")  # unwritable: SQLite cannot take the seal's write lock
        if unwritable != "wal":
            # On a read-only mount the database is unwritable too. (A database made
            # immutable here would let SQLite "begin" a seal it never holds, so the
            # access probe alone is told what the mount would tell it.)
            real_access = os.access
            monkeypatch.setattr(capture.os, "access", lambda path, mode, **kw: (
                False if (str(path), mode) == (str(db), os.W_OK) else real_access(path, mode, **kw)))
        with _unwritable(wal):
            message = _capture_error(db)
    finally:
        holder.close()
    if unwritable == "wal":
        assert message == "attempt to write a readonly database"
    else:
        assert message == ("attempt to write a readonly database: commits kept landing while the read transaction "
                           "was pinned, and sealing it (a sub-millisecond write lock) needs write access, which a "
                           "read-only mount does not give")


def test_a_file_that_is_not_sqlite_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "club.db"
    junk.write_bytes(b"not a database at all " * 200)
    assert _capture_error(junk) == "file is not a database"


def test_a_relative_database_name_in_a_writable_directory_is_pinned_normally(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare file name means the current directory: writable here, so SQLite makes
    its -shm as for any reader, and this is no stopped read-only database."""
    _database(tmp_path / "club.db")
    monkeypatch.chdir(tmp_path)
    with capture.pinned_image("club.db") as image:
        assert "read" not in image.info and _rows(image.connection) == 200


def test_a_stopped_database_that_is_not_sqlite_on_a_read_only_mount_is_named(tmp_path: Path) -> None:
    db = _database(tmp_path / "db" / "club.db")
    raw = bytearray(db.read_bytes())
    raw[:16] = bytes(16)  # SQLite's magic gone, the WAL flag (bytes 18-19) kept
    db.write_bytes(bytes(raw))
    with _unwritable(db.parent):
        assert _capture_error(db) == "file is not a database"


# ---- what a snapshot makes of a captured database ------------------------------------------

from engine import Repository, apply_restore, check, create_snapshot, plan_restore  # noqa: E402
from engine.format import DATA_PREFIX, pack_key  # noqa: E402
from engine.snapshot import ENTRY_SQLITE_FIELDS, SnapshotOptions  # noqa: E402
from engine.tree import lookup  # noqa: E402

from .conftest import Clock, reopen  # noqa: E402


class Club:
    """A data dir with one database, snapshotted again and again."""

    def __init__(self, repo: Repository, clock: Clock, root: Path, journal: str = "wal", rows: int = 200) -> None:
        self.repo, self.clock, self.data = repo, clock, root / "data"
        self.db = _database(self.data / "db" / "club.db", journal=journal, rows=rows)
        (self.data / "blobs").mkdir()
        self.snapshots: list[object] = []

    def snap(self) -> tuple[dict, dict]:  # type: ignore[type-arg]
        """A snapshot: its `databases` record and the database's tree entry."""
        self.clock.advance(minutes=1)
        result = create_snapshot(self.repo, SnapshotOptions(source=self.data, host="h", now=self.clock))
        self.snapshots.append(result)
        (record,) = result.info.record["databases"]
        entry = lookup(self.repo, result.info.tree, b"db/club.db")[-1]  # type: ignore[index]
        return record, entry

    def write(self, sql: str = "UPDATE numbered SET pad = randomblob(500) WHERE n = 100") -> None:
        conn = sqlite3.connect(self.db)
        conn.execute(sql)
        conn.commit()
        conn.close()

    def restored_rows(self, tmp_path: Path, index: int = -1) -> list[tuple[int, bytes]]:
        target = tmp_path / f"restored-{len(os.listdir(tmp_path))}"
        info = self.snapshots[index].info  # type: ignore[attr-defined]
        apply_restore(self.repo, plan_restore(self.repo, info, target))
        conn = sqlite3.connect(f"file:{target / 'db' / 'club.db'}?mode=ro&immutable=1", uri=True)
        try:
            return conn.execute("SELECT n, pad FROM numbered ORDER BY n").fetchall()
        finally:
            conn.close()

    def rows(self) -> list[tuple[int, bytes]]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT n, pad FROM numbered ORDER BY n").fetchall()
        finally:
            conn.close()


def _settle() -> None:
    """Past the racy window (50 ms): a database changed within it is read, never trusted."""
    import time
    time.sleep(0.1)


def test_a_captured_database_is_recorded_with_what_it_cost(repo: Repository, clock: Clock, tmp_path: Path) -> None:
    club = Club(repo, clock, tmp_path, rows=2500)  # more pages than one batch of page lookups
    _settle()
    record, entry = club.snap()
    pages, size = club.db.stat().st_size // 4096, club.db.stat().st_size
    assert pages > 256
    assert record["path"] == b"db/club.db" and record["method"] == "page-read" and record["journal_mode"] == "wal"
    assert (record["page_count"], record["pages_changed"], record["bytes_read"]) == (pages, pages, size)
    assert 0 < record["pages_stored"] <= pages and record["page_bytes_stored"] > 0 < record["map_bytes_stored"]
    assert isinstance(record["fingerprint"], str) and "suspect" not in record
    assert entry["type"] == "file" and entry["size"] == size and entry["name"] == b"club.db"
    assert entry["sqlite"] == {k: record[k] for k in ENTRY_SQLITE_FIELDS} and entry["sqlite"]["user_version"] == 7
    assert entry["mode"] == club.db.stat().st_mode & 0o777 and entry["mtime"] == club.db.stat().st_mtime_ns
    stats = club.snapshots[-1].stats  # type: ignore[attr-defined]
    assert (stats["files_new"], stats["files_changed"], stats["files_unmodified"]) == (1, 0, 0)
    assert stats["bytes_read"] == size == stats["bytes_total"]
    assert record["page_bytes_stored"] == stats["data_bytes_stored"]  # the database is all the data there is
    from engine.format import unpack_record
    map_record = unpack_record(repo.read_blob(entry["page_map"]), "page map")  # docs/format.md: page map records
    assert (map_record["page_map"], map_record["page_size"], map_record["pages"]) == ("base", 4096, pages)
    assert record["map_bytes_stored"] <= stats["metadata_bytes_stored"]
    assert club.restored_rows(tmp_path) == club.rows()


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_an_unchanged_database_reuses_its_parents_map_and_a_change_is_read(
        repo: Repository, clock: Clock, tmp_path: Path, journal: str) -> None:
    """Unchanged: not a page read, nothing stored, the same map. Changed (same page
    count): read, and only the changed pages stored."""
    club = Club(repo, clock, tmp_path, journal)
    (club.data / "blobs" / "x.tgz").write_bytes(b"x" * 1000)
    _settle()
    first, first_entry = club.snap()
    second, second_entry = club.snap()
    assert (second["bytes_read"], second["pages_changed"], second["pages_stored"], second["page_bytes_stored"],
            second["map_bytes_stored"]) == (0, 0, 0, 0, 0)
    assert second_entry["page_map"] == first_entry["page_map"] and second["fingerprint"] == first["fingerprint"]
    stats = club.snapshots[-1].stats  # type: ignore[attr-defined]
    assert (stats["files_new"], stats["files_changed"], stats["files_unmodified"], stats["bytes_read"]) == (0, 0, 2, 0)
    assert stats["bytes_total"] == club.db.stat().st_size + 1000
    club.write()
    _settle()
    third, third_entry = club.snap()
    assert third["page_count"] == first["page_count"] and third["bytes_read"] == club.db.stat().st_size
    assert 0 < third["pages_changed"] < 5 and third["pages_stored"] == third["pages_changed"]
    assert third["fingerprint"] != first["fingerprint"] and third_entry["page_map"] != first_entry["page_map"]
    assert 0 < third["map_bytes_stored"] < first["map_bytes_stored"] / 2  # a delta on the parent's map
    stats = club.snapshots[-1].stats  # type: ignore[attr-defined]
    assert (stats["files_new"], stats["files_changed"], stats["files_unmodified"]) == (0, 1, 1)
    assert club.restored_rows(tmp_path) == club.rows() != club.restored_rows(tmp_path, 0)


def test_a_stopped_database_on_a_read_only_mount_is_snapshotted_and_a_change_seen(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    club = Club(repo, clock, tmp_path)
    _settle()
    with _unwritable(club.db.parent):
        first, _ = club.snap()
        second, _ = club.snap()
    assert first["read"] == STOPPED and first["bytes_read"] > 0 and "fingerprint" in first
    assert second["bytes_read"] == 0
    club.write()  # club ran for a while, then stopped again
    _settle()
    with _unwritable(club.db.parent):
        third, _ = club.snap()
    assert third["bytes_read"] > 0 and third["pages_changed"] > 0
    assert club.restored_rows(tmp_path) == club.rows()


def test_club_started_idle_after_a_stopped_snapshot_is_not_read_again(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    """Read as immutable while club was stopped; then club starts (an empty -wal and an
    -shm appear) and commits nothing: the image is the file alone, as before."""
    club = Club(repo, clock, tmp_path)
    _settle()
    with _unwritable(club.db.parent):
        stopped, _ = club.snap()
    assert stopped["read"] == STOPPED
    running = sqlite3.connect(club.db)
    try:
        running.execute("SELECT count(*) FROM numbered").fetchall()
        assert os.path.getsize(f"{club.db}-wal") == 0
        idle, _ = club.snap()
    finally:
        running.close()
    assert "read" not in idle and idle["wal_frames"] == 0
    assert idle["bytes_read"] == 0 and idle["fingerprint"] == stopped["fingerprint"]


def test_a_database_whose_times_are_recent_is_read_and_given_no_fingerprint(
        repo: Repository, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system with whole-second times a change in the last 2 s may share its
    ctime with an earlier state: such a file is read and not trusted."""
    from dataclasses import replace
    from engine import snapshot

    real = capture.pinned_image

    @contextmanager
    def coarse(database: str, seconds_ago: int) -> Iterator[capture.PinnedImage]:
        import time
        with real(database) as image:
            yield replace(image, file_ctime_ns=(time.time_ns() // 10**9 - seconds_ago) * 10**9)

    club = Club(repo, clock, tmp_path)
    _settle()
    for seconds_ago, trusted in ((1, False), (3, True)):
        monkeypatch.setattr(snapshot.sqlite_source, "pinned_image", lambda db, s=seconds_ago: coarse(db, s))
        record, _ = club.snap()
        assert ("fingerprint" in record) == trusted and record["bytes_read"] > 0


def test_a_suspect_database_is_flagged_and_an_unchanged_one_keeps_the_verdict(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    club = Club(repo, clock, tmp_path, journal="delete")
    raw = bytearray(club.db.read_bytes())
    page = len(raw) // 4096 // 2
    raw[page * 4096 + 8:page * 4096 + 40] = b"\xff" * 32  # cell pointers of a table page
    club.db.write_bytes(bytes(raw))
    _settle()
    first, _ = club.snap()
    second, _ = club.snap()
    assert first["suspect"].startswith("quick_check at capture failed: ")
    assert second["suspect"] == first["suspect"] and second["bytes_read"] == 0
    for result in club.snapshots:
        assert f"db/club.db: suspect: {first['suspect']}" in result.warnings  # type: ignore[attr-defined]
        assert result.info.record["suspect_databases"] == ["db/club.db"]  # type: ignore[attr-defined]


def test_damage_to_a_page_is_healed_by_the_next_snapshot_of_an_unchanged_database(
        repo: Repository, clock: Clock, tmp_path: Path) -> None:
    """check --read-data records a damaged page chunk; the next snapshot must not reuse
    the parent's map (a page of it is lost): it reads the database and stores it again."""
    club = Club(repo, clock, tmp_path)
    _settle()
    _, entry = club.snap()
    page_pack = max(repo.backend.list(DATA_PREFIX), key=lambda item: item[1])[0]
    path = Path(repo.backend.location) / page_pack
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.chmod(0o600)
    path.write_bytes(bytes(raw))
    assert not check(repo, read_data=True).ok
    record, again = club.snap()
    assert record["bytes_read"] == club.db.stat().st_size and record["pages_stored"] > 0
    assert record["pages_changed"] == 0  # the same image, stored again
    assert club.restored_rows(tmp_path) == club.rows()


def test_a_parent_map_that_cannot_be_read_costs_a_new_base_not_the_snapshot(
        repo: Repository, clock: Clock, cache_dir: Path, tmp_path: Path) -> None:
    club = Club(repo, clock, tmp_path)
    _settle()
    _, entry = club.snap()
    holder = repo.catalog.lookup(entry["page_map"])
    assert holder is not None
    path = Path(repo.backend.location) / pack_key(holder.pack)
    raw = bytearray(path.read_bytes())
    raw[holder.offset + holder.length // 2] ^= 0xFF
    path.chmod(0o600)
    path.write_bytes(bytes(raw))
    fresh = reopen(repo, tmp_path / "other-host")  # no local copy of the map
    club.repo = fresh
    record, new_entry = club.snap()
    warnings = club.snapshots[-1].warnings  # type: ignore[attr-defined]
    (warning,) = [w for w in warnings if "parent page map" in w]
    assert warning.startswith("db/club.db: parent page map unreadable (") and warning.endswith(
        "); stored as a new base")
    assert record["bytes_read"] > 0 and record["map_bytes_stored"] > 0  # the map stored again, whole
    assert club.restored_rows(tmp_path) == club.rows()
    fresh.close()
