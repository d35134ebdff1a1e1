"""Restore: ``plan_restore`` decides, ``apply_restore`` writes.

The plan is computed before anything is touched and can be printed (``--dry-run``): the
files to write, the files already identical, the files ``--delete`` would remove, and
the bytes to fetch against the bytes reused from the target. Reuse is by content: every
existing file in the restored scope is cut with the chunker its snapshot entry used, so
unchanged chunks of a changed file (an older club.db, say) are copied locally instead of
fetched.

Writes are atomic per file: a temporary file in the same directory, made durable, then
renamed over the target; a final sync makes the renames durable. A
SQLite database's stale ``-wal``/``-shm`` are moved aside with the old file before the
restored one goes in, because SQLite would otherwise replay the old WAL over the restored
image and silently undo the restore (SQLITE_NOTES §5).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import sqlite3
import stat
import struct
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

from .chunker import CDC, chunk_stream, fixed_chunks
from .errors import (
    BackendError, IntegrityError, ObjectNotFound, StorageFull, TargetError, TargetInUse, UsageError,
)
from .format import ChunkId, PackId, display, pack_key
from .packs import BlobEntry, coalesce
from .pagemap import file_chunks
from .repository import Repository, SnapshotInfo
from .backends.fs import fsync_dir
from .sources.files import PRE_RESTORE_MARK, RESTORE_TEMP_MARK, SQLITE_SIDECARS
from .tree import Entry, load_tree

OPEN_TEMPS = 64
# SQLite's unix locking: the -shm "dead man switch" byte, and the database's SHARED range
# (PENDING_BYTE 0x40000000 + 2, 510 bytes). struct flock on Linux: type, whence, start, len, pid.
SHM_DMS_BYTE = 128
SQLITE_SHARED_FIRST, SQLITE_SHARED_SIZE = 0x40000002, 510
FLOCK = struct.Struct("hhqqi4x")
WRITE_RUN = 1 << 20  # contiguous chunks joined into one write, up to this many bytes
PENDING_RUNS = 8     # files with a run not yet written


@dataclass
class FilePlan:
    rel: bytes
    entry: Entry
    chunks: list[ChunkId]
    identical: bool = False  # the target already holds exactly this content


@dataclass
class RestorePlan:
    snapshot: SnapshotInfo
    target: Path
    dirs: list[tuple[bytes, Entry]] = field(default_factory=list)
    files: list[FilePlan] = field(default_factory=list)
    symlinks: list[tuple[bytes, Entry]] = field(default_factory=list)
    deletions: list[bytes] = field(default_factory=list)
    conflicts: list[bytes] = field(default_factory=list)  # a file where a dir goes, or back
    stale_temps: list[bytes] = field(default_factory=list)  # left by a killed restore
    local: dict[ChunkId, tuple[bytes, int, int]] = field(default_factory=dict)
    located: dict[ChunkId, BlobEntry] = field(default_factory=dict)  # chunks not in the target
    fetch: dict[PackId, list[BlobEntry]] = field(default_factory=dict)

    @property
    def to_write(self) -> list[FilePlan]:
        return [f for f in self.files if not f.identical]

    @property
    def bytes_to_fetch(self) -> int:
        return sum(end - start for blobs in self.fetch.values() for start, end, _ in coalesce(blobs))

    @property
    def bytes_reused(self) -> int:
        reused: int = sum(f.entry["size"] for f in self.files if f.identical)
        for plan in self.to_write:
            reused += sum(self.local[c][2] for c in plan.chunks if c in self.local)
        return reused

    def summary(self) -> dict[str, object]:
        return {"snapshot": self.snapshot.id.hex(), "time": self.snapshot.time.isoformat(),
                "target": str(self.target), "files": len(self.files),
                "files_to_write": len(self.to_write),
                "files_unchanged": len(self.files) - len(self.to_write),
                "bytes_total": sum(f.entry["size"] for f in self.files),
                "bytes_to_fetch": self.bytes_to_fetch, "bytes_reused": self.bytes_reused,
                "deletions": len(self.deletions)}


# ---- planning ----------------------------------------------------------------------------

def plan_restore(repo: Repository, snapshot: SnapshotInfo, target: Path,
                 includes: list[str] | None = None, delete: bool = False) -> RestorePlan:
    repo.sync_index()
    plan = RestorePlan(snapshot, target.absolute())
    wanted = [normalise_include(i) for i in includes or []]
    _select(repo, snapshot.tree, b"", wanted, plan)
    for include in wanted:
        if not any(_within(rel, include) for rel in _all_paths(plan)):
            raise UsageError(f"--include {display(include)} matches nothing in snapshot {snapshot.id.short()}")
    scopes = wanted or sorted({rel.split(b"/", 1)[0] for rel in _all_paths(plan)})
    plan.conflicts = _type_conflicts(plan)
    if plan.conflicts and not delete:
        raise UsageError(f"{display(plan.conflicts[0])} is a different kind of file in the target than in the "
                         f"snapshot; use --delete to replace it")
    _find_local_chunks(repo, plan, scopes)
    if delete:
        plan.deletions = _extra_paths(plan, scopes)
    plan.located = repo.locate_many(c for f in plan.to_write for c in f.chunks if c not in plan.local)
    fetch: dict[PackId, list[BlobEntry]] = defaultdict(list)
    for entry in plan.located.values():
        fetch[entry.pack].append(entry)
    plan.fetch = dict(fetch)
    return plan


def select_files(repo: Repository, snapshot: SnapshotInfo, includes: list[str] | None = None) -> list[FilePlan]:
    """The snapshot's files within ``includes`` (all when none), for restores elsewhere
    than a directory."""
    plan = RestorePlan(snapshot, Path("."))
    wanted = [normalise_include(i) for i in includes or []]
    _select(repo, snapshot.tree, b"", wanted, plan)
    for include in wanted:
        if not any(_within(rel, include) for rel in _all_paths(plan)):
            raise UsageError(f"--include {display(include)} matches nothing in snapshot {snapshot.id.short()}")
    return plan.files


def normalise_include(include: str) -> bytes:
    path = include.strip().strip("/")
    while path.startswith("./"):
        path = path[2:]
    if not path or ".." in path.split("/"):
        raise UsageError(f"invalid --include path {include!r}")
    return os.fsencode(path)


def _within(rel: bytes, scope: bytes) -> bool:
    return rel == scope or rel.startswith(scope + b"/")


def _all_paths(plan: RestorePlan) -> Iterator[bytes]:
    yield from (rel for rel, _ in plan.dirs)
    yield from (f.rel for f in plan.files)
    yield from (rel for rel, _ in plan.symlinks)


def _select(repo: Repository, tree: ChunkId, prefix: bytes, wanted: list[bytes], plan: RestorePlan) -> None:
    """Walk only the subtrees an include can reach."""
    for entry in load_tree(repo, tree):
        rel = prefix + entry["name"]
        inside = not wanted or any(_within(rel, w) for w in wanted)
        above = any(w.startswith(rel + b"/") for w in wanted)
        if not inside and not above:
            continue
        if entry["type"] == "dir":
            plan.dirs.append((rel, entry))
            _select(repo, ChunkId(entry["tree"]), rel + b"/", wanted, plan)
        elif inside and entry["type"] == "file":
            plan.files.append(FilePlan(rel, entry, file_chunks(repo, entry)))
        elif inside and entry["type"] == "symlink":
            plan.symlinks.append((rel, entry))


def _find_local_chunks(repo: Repository, plan: RestorePlan, scopes: list[bytes]) -> None:
    """Cut existing target files like the snapshot did and note where each chunk sits."""
    root = os.fsencode(plan.target)
    by_path = {f.rel: f for f in plan.files}
    for rel in _existing_files(plan, root, scopes):
        planned = by_path.get(rel)
        try:
            found = list(_cut(os.path.join(root, rel), planned.entry if planned else None, repo))
        except OSError:
            continue  # unreadable local file: nothing to reuse from it
        for chunk, offset, length in found:
            plan.local.setdefault(chunk, (rel, offset, length))
        if planned and [c for c, _, _ in found] == planned.chunks:
            # A database with a WAL beside it is not identical: SQLite would replay the WAL.
            planned.identical = "sqlite" not in planned.entry or not _has_sidecars(os.path.join(root, rel))


def _has_sidecars(path: bytes) -> bool:
    return any(os.path.exists(path + suffix) for suffix in SQLITE_SIDECARS)


def _cut(path: bytes, entry: Entry | None, repo: Repository) -> Iterator[tuple[ChunkId, int, int]]:
    """Chunks of a target file, cut the way ``entry`` (its snapshot entry) was: pages for a
    captured database, else the entry's chunker (CDC for files the snapshot lacks)."""
    offset = 0
    with open(path, "rb") as handle:
        stream = (fixed_chunks(handle, entry["sqlite"]["page_size"]) if entry is not None and "page_map" in entry
                  else chunk_stream(handle, entry["chunker"] if entry else CDC, repo.config.chunker))
        for data in stream:
            yield repo.chunk_id(data), offset, len(data)
            offset += len(data)


def _type_conflicts(plan: RestorePlan) -> list[bytes]:
    """Target paths whose kind (directory or not) differs from the snapshot's."""
    root = os.fsencode(plan.target)
    conflicts = []
    wanted = [(rel, True) for rel, _ in plan.dirs] + [(f.rel, False) for f in plan.files]
    wanted += [(rel, False) for rel, _ in plan.symlinks]
    for rel, is_dir in wanted:
        path = os.path.join(root, rel)
        if os.path.lexists(path) and (os.path.isdir(path) and not os.path.islink(path)) != is_dir:
            conflicts.append(rel)
    return conflicts


def _existing_files(plan: RestorePlan, root: bytes, scopes: list[bytes]) -> Iterator[bytes]:
    for scope in scopes:
        top = os.path.join(root, scope)
        if os.path.isfile(top) and not os.path.islink(top):
            yield scope
            continue
        for dirpath, _dirs, names in os.walk(top):
            rel_dir = os.path.relpath(dirpath, root)
            for name in names:
                full = os.path.join(dirpath, name)
                if RESTORE_TEMP_MARK in name:
                    plan.stale_temps.append(os.path.join(rel_dir, name))
                elif os.path.isfile(full) and not os.path.islink(full):
                    yield os.path.join(rel_dir, name)


def _extra_paths(plan: RestorePlan, scopes: list[bytes]) -> list[bytes]:
    """Paths in the restored scopes that the snapshot does not have, deepest first."""
    keep = set(_all_paths(plan)) | set(plan.stale_temps)
    # Sidecars of restored databases are moved aside, not deleted, and earlier restores'
    # safety copies are never removed.
    keep |= {f.rel + s for f in plan.files if "sqlite" in f.entry for s in SQLITE_SIDECARS}
    root = os.fsencode(plan.target)
    extra = []
    for scope in scopes:
        for dirpath, dirs, names in os.walk(os.path.join(root, scope)):
            rel_dir = os.path.relpath(dirpath, root)
            extra += [p for p in (os.path.join(rel_dir, n) for n in dirs + names)
                      if p not in keep and PRE_RESTORE_MARK not in p]
    return sorted(set(extra), key=lambda p: (-p.count(b"/"), p))


# ---- applying ------------------------------------------------------------------------------

@dataclass
class RestoreResult:
    files_written: int = 0
    files_unchanged: int = 0
    bytes_written: int = 0
    bytes_fetched: int = 0
    bytes_reused: int = 0
    deleted: int = 0
    moved_aside: list[str] = field(default_factory=list)


def apply_restore(repo: Repository, plan: RestorePlan, *, allow_in_use: bool = False,
                  set_owner: bool | None = None,
                  progress: Callable[[int, int], None] | None = None) -> RestoreResult:
    root = os.fsencode(plan.target)
    if not allow_in_use:
        _refuse_if_open(root, plan)
    owner = os.geteuid() == 0 if set_owner is None else set_owner
    before = repo.backend.bytes_read
    try:
        result = _Writer(repo, plan, root, owner, progress).run()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"restoring into {plan.target}: no space left on device") from exc
        raise TargetError(f"restoring into {plan.target}: {exc.strerror or exc}"
                          f"{': ' + display(os.fsencode(exc.filename)) if exc.filename else ''}") from exc
    result.bytes_fetched = repo.backend.bytes_read - before
    return result


class _Writer:
    def __init__(self, repo: Repository, plan: RestorePlan, root: bytes, owner: bool,
                 progress: Callable[[int, int], None] | None) -> None:
        self.repo, self.plan, self.root, self.owner, self.progress = repo, plan, root, owner, progress
        self.temps: dict[bytes, bytes] = {}
        self.writer = _TempWriter()
        self.result = RestoreResult()
        self.total = sum(f.entry["size"] for f in plan.to_write)

    def run(self) -> RestoreResult:
        os.makedirs(self.root, exist_ok=True)
        for rel in self.plan.stale_temps:
            os.unlink(os.path.join(self.root, rel))
        for rel in self.plan.conflicts:
            path = os.path.join(self.root, rel)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        for rel, _entry in self.plan.dirs:
            os.makedirs(os.path.join(self.root, rel), exist_ok=True)
        try:
            self._prepare_temps()
            missing = self._copy_local()
            self._fetch(missing)
            self._install_files()
        finally:
            self.writer.abort()  # after a failure: close, write nothing more
            for temp in self.temps.values():
                if os.path.exists(temp):
                    os.unlink(temp)
        self._install_symlinks()
        self._delete_extras()
        self._finish_dirs()
        self.result.files_unchanged = len(self.plan.files) - len(self.plan.to_write)
        self.result.bytes_reused += sum(f.entry["size"] for f in self.plan.files if f.identical)
        return self.result

    def _prepare_temps(self) -> None:
        for plan in self.plan.to_write:
            directory, name = os.path.split(os.path.join(self.root, plan.rel))
            temp = os.path.join(directory, b"." + name + RESTORE_TEMP_MARK + secrets.token_hex(4).encode())
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self.temps[plan.rel] = temp  # removed on failure from here on, even by ftruncate's
            try:
                os.ftruncate(fd, plan.entry["size"])
            finally:
                os.close(fd)

    def _positions(self) -> dict[ChunkId, list[tuple[bytes, int]]]:
        """Where every needed chunk goes: (temp file, offset)."""
        where: dict[ChunkId, list[tuple[bytes, int]]] = defaultdict(list)
        for plan in self.plan.to_write:
            offset = 0
            for chunk, raw in zip(plan.chunks, _chunk_sizes(self.plan, plan)):
                where[chunk].append((self.temps[plan.rel], offset))
                offset += raw
        return where

    def _copy_local(self) -> dict[ChunkId, list[tuple[bytes, int]]]:
        """Copy reusable chunks from target files (before any is replaced); returns the rest."""
        missing: dict[ChunkId, list[tuple[bytes, int]]] = {}
        by_source: dict[bytes, list[tuple[ChunkId, list[tuple[bytes, int]]]]] = defaultdict(list)
        for chunk, places in self._positions().items():
            source = self.plan.local.get(chunk)
            if source is None:
                missing[chunk] = places
            else:
                by_source[source[0]].append((chunk, places))
        for rel, chunks in by_source.items():  # one open per file: a database has a chunk per page
            try:
                fd = os.open(os.path.join(self.root, rel), os.O_RDONLY)
            except OSError:
                missing.update(chunks)
                continue
            try:
                for chunk, places in chunks:
                    _, offset, length = self.plan.local[chunk]
                    try:
                        data = os.pread(fd, length, offset)
                    except OSError:
                        data = b""
                    if self.repo.chunk_id(data) != chunk:  # unreadable or changed since the plan: fetch it
                        missing[chunk] = places
                        continue
                    self._place(data, places)
                    self.result.bytes_reused += len(data) * len(places)
            finally:
                os.close(fd)
        return missing

    def _fetch(self, missing: dict[ChunkId, list[tuple[bytes, int]]]) -> None:
        located = self.plan.located
        located |= self.repo.locate_many(c for c in missing if c not in located)  # local copy failed
        by_pack: dict[PackId, list[BlobEntry]] = defaultdict(list)
        for chunk in missing:
            by_pack[located[chunk].pack].append(located[chunk])
        ranges = [(pack_key(pack), start, end, members) for pack, blobs in sorted(by_pack.items())
                  for start, end, members in coalesce(blobs)]
        for (key, start, end, members), data in self._download(ranges):
            for blob in members:
                stored = memoryview(data)[blob.offset - start:blob.offset - start + blob.length]
                try:
                    raw = self.repo.decode_or_note(stored, blob, key)
                except IntegrityError as exc:
                    raise IntegrityError(f"{exc}; needed by {self._users([blob])}") from exc
                self._place(raw, missing[blob.id])

    def _download(self, ranges: list[tuple[str, int, int, list[BlobEntry]]]
                  ) -> Iterator[tuple[tuple[str, int, int, list[BlobEntry]], bytes]]:
        """Fetch the ranges, yielding them in order. With a backend that serves parallel
        requests, up to twice its concurrency are in flight (bounded memory); the writes
        stay on this thread."""
        width = self.repo.backend.concurrency
        if width == 1:
            for item in ranges:
                yield item, self._get_range(*item)
            return
        with ThreadPoolExecutor(width, thread_name_prefix="fetch") as pool:
            window: deque[tuple[tuple[str, int, int, list[BlobEntry]], Future[bytes]]] = deque()
            try:
                for item in ranges:
                    window.append((item, pool.submit(self._get_range, *item)))
                    if len(window) >= 2 * width:
                        first, future = window.popleft()
                        yield first, future.result()
                while window:
                    first, future = window.popleft()
                    yield first, future.result()
            finally:
                for _, future in window:
                    future.cancel()

    def _get_range(self, key: str, start: int, end: int, members: list[BlobEntry]) -> bytes:
        try:
            return self.repo.backend.get(key, start, end - start)
        except ObjectNotFound as exc:
            raise IntegrityError(f"{key}: pack missing, needed by {self._users(members)}") from exc
        except BackendError as exc:
            if self._pack_size(key) >= end:
                raise
            raise IntegrityError(f"{key}: pack truncated, needed by {self._users(members)}") from exc

    def _pack_size(self, key: str) -> int:
        try:
            return self.repo.backend.stat(key)
        except ObjectNotFound:
            return 0

    def _users(self, blobs: list[BlobEntry]) -> str:
        ids = {b.id for b in blobs}
        names = [display(f.rel) for f in self.plan.to_write if ids & set(f.chunks)]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    def _place(self, data: bytes, places: list[tuple[bytes, int]]) -> None:
        for temp, offset in places:
            self.writer.write(temp, offset, data)
            self.result.bytes_written += len(data)
            if self.progress:
                self.progress(self.result.bytes_written, self.total)

    def _install_files(self) -> None:
        self.writer.close()
        # Every temporary file's data is made durable before any rename: one sync(2)
        # (which on Linux waits for writeback) instead of thousands of fsyncs.
        os.sync()
        for plan in self.plan.files:
            path = os.path.join(self.root, plan.rel)
            if plan.identical:
                _apply_meta(path, plan.entry, self.owner)
                continue
            temp = self.temps[plan.rel]
            _apply_meta(temp, _replacing(path, plan.entry), self.owner)
            if "sqlite" in plan.entry:
                _fsync(temp)  # sync(2) reports no write errors; a database gets its own fsync
                self._move_sqlite_set_aside(path)
            os.replace(temp, path)
            self.result.files_written += 1

    def _move_sqlite_set_aside(self, path: bytes) -> None:
        """Keep the database being replaced, with its WAL or journal, as a set under a new
        name (hard links: no copy), and take the sidecars away from the name the restored
        file will have: a restore over the wrong database must not be the end of it.

        Hard links first, removals after: a crash at any step leaves either the old set
        intact or a complete copy of it aside.
        """
        if not os.path.exists(path) and not _has_sidecars(path):
            return  # (a WAL without its database must still go: SQLite would replay it)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ").encode()
        aside = path + PRE_RESTORE_MARK + stamp
        for suffix in (b"", b"-wal", b"-journal"):
            if os.path.exists(path + suffix):
                os.link(path + suffix, aside + suffix)
                self.result.moved_aside.append(display(aside + suffix))
        fsync_dir(os.path.dirname(path))
        for suffix in SQLITE_SIDECARS:
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)

    def _install_symlinks(self) -> None:
        for rel, entry in self.plan.symlinks:
            path = os.path.join(self.root, rel)
            temp = path + RESTORE_TEMP_MARK + secrets.token_hex(4).encode()
            os.symlink(entry["target"], temp)
            os.replace(temp, path)

    def _delete_extras(self) -> None:
        for rel in self.plan.deletions:
            path = os.path.join(self.root, rel)
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            elif os.path.lexists(path):
                os.unlink(path)
            else:
                continue  # already gone (a database sidecar moved aside above)
            self.result.deleted += 1

    def _finish_dirs(self) -> None:
        for rel, entry in sorted(self.plan.dirs, key=lambda d: -d[0].count(b"/")):
            _apply_meta(os.path.join(self.root, rel), entry, self.owner)
        os.sync()  # the renames and directory entries, durable in one go


class _TempWriter:
    """Writes chunks into temporary files, joining writes that continue one another (a
    database arrives page by page, mostly in order) and keeping a few files open at a
    time, so that a restore of many files never runs out of descriptors."""

    def __init__(self) -> None:
        self.fds: dict[bytes, int] = {}  # least recently used first
        self.runs: dict[bytes, tuple[int, bytearray]] = {}  # temp -> (offset, bytes not yet written)

    def write(self, temp: bytes, offset: int, data: bytes) -> None:
        run = self.runs.get(temp)
        if run is not None and run[0] + len(run[1]) == offset and len(run[1]) < WRITE_RUN:
            run[1].extend(data)
            return
        self._flush(temp)
        self.runs[temp] = (offset, bytearray(data))
        if len(self.runs) > PENDING_RUNS:  # bounds memory: flush the oldest run
            self._flush(next(iter(self.runs)))

    def close(self) -> None:
        try:
            for temp in list(self.runs):
                self._flush(temp)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop what is not written yet and close every file."""
        self.runs.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _flush(self, temp: bytes) -> None:
        run = self.runs.pop(temp, None)
        if run is not None:
            os.pwrite(self._fd(temp), run[1], run[0])

    def _fd(self, temp: bytes) -> int:
        fd = self.fds.pop(temp, None)
        if fd is None:
            if len(self.fds) >= OPEN_TEMPS:
                oldest = next(iter(self.fds))
                os.close(self.fds.pop(oldest))  # its run, if any, is flushed before it is needed again
            fd = os.open(temp, os.O_WRONLY)
        self.fds[temp] = fd
        return fd


def _chunk_sizes(plan: RestorePlan, file: FilePlan) -> Iterator[int]:
    for chunk in file.chunks:
        local = plan.local.get(chunk)
        yield local[2] if local else plan.located[chunk].raw_length


def _replacing(path: bytes, entry: Entry) -> Entry:
    """A database keeps the owner, group and mode of the file it replaces: club runs as
    its own user, and a database it cannot write (or whose directory it cannot create a
    WAL in) turns club read-only (SQLITE_NOTES §5.3)."""
    if "sqlite" not in entry:
        return entry
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return entry
    return {**entry, "uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode)}


def check_databases(plan: RestorePlan, thorough: bool = True) -> dict[str, str]:
    """``integrity_check`` (or ``quick_check``) of every restored database, by path:
    "ok" or SQLite's first complaints. Opened immutable, so no sidecar is created."""
    results = {}
    for file in plan.files:
        if "sqlite" not in file.entry:
            continue
        path = os.fsdecode(os.path.join(os.fsencode(plan.target), file.rel))
        try:
            conn = sqlite3.connect(f"file:{quote(path)}?mode=ro&immutable=1", uri=True)
            try:
                rows = [r[0] for r in conn.execute(f"PRAGMA {'integrity_check' if thorough else 'quick_check'}")]
            finally:
                conn.close()
        except sqlite3.Error as exc:
            rows = [str(exc)]
        results[display(file.rel)] = "ok" if rows == ["ok"] else "; ".join(rows[:5])
    return results


def _fsync(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply_meta(path: bytes, entry: Entry, owner: bool) -> None:
    if owner:
        os.chown(path, entry["uid"], entry["gid"], follow_symlinks=False)
    os.chmod(path, entry["mode"])
    os.utime(path, ns=(entry["mtime"], entry["mtime"]))


def _refuse_if_open(root: bytes, plan: RestorePlan) -> None:
    """Refuse to replace a database some process has open (a running club): the process
    would keep writing into the unlinked inode and new connections see a broken file."""
    databases = {os.path.realpath(os.path.join(root, f.rel)) for f in plan.to_write if "sqlite" in f.entry}
    databases = {d for d in databases if os.path.exists(d)}
    if not databases:
        return
    for database in sorted(databases):
        holder = _sqlite_lock_holder(database)
        if holder is not None:
            raise TargetInUse(f"{os.fsdecode(database)} is in use: process {holder} ({_command(str(holder))}) "
                              f"holds a SQLite lock on it (found with fcntl F_GETLK): stop club first, "
                              f"or pass --force")
    # Also catch a process that has the file open without a lock at this moment (a
    # rollback-journal connection between transactions); only our own user's processes
    # (or all, as root) can be seen this way.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.fsencode(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if link in databases:
                raise TargetInUse(f"{os.fsdecode(link)} is open by process {pid} ({_command(pid)}; found in "
                                  f"/proc/{pid}/fd): stop club first, or pass --force")


def _sqlite_lock_holder(database: bytes) -> int | None:
    """The pid of a process holding a SQLite lock on ``database``, or None. Works across
    users (unlike /proc/<pid>/fd): every connection to a WAL database holds a shared lock
    on the ``-shm`` file's DMS byte for as long as it is open; a rollback-journal
    connection holds the database's SHARED range while in a transaction."""
    probes = [(database + b"-shm", SHM_DMS_BYTE, 1), (database, SQLITE_SHARED_FIRST, SQLITE_SHARED_SIZE)]
    for path, start, length in probes:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            probe = FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
            lock_type, _, _, _, pid = FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, probe))
        except OSError:
            continue
        finally:
            os.close(fd)  # safe: this process has no connection to the target database
        if lock_type != fcntl.F_UNLCK:
            return int(pid)
    return None


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown command"
