"""Local-directory backend: temp file, fsync, rename, fsync of the directory.

Everything it creates is private to the user running clubsnap, as restic does: files
0600, directories 0700. Key slots, locks (host names) and, in an unencrypted repository,
everything else would otherwise be readable by every local user. A repository made
before that, or copied with looser modes, is tightened when opened: the top directory,
``config``, ``keys/`` and its slots, and the directories one level down (``data/``,
``index/``... and the ``data/<hh>/`` prefix dirs); not every pack, which would cost a
walk of the whole repository on every command, and which directories 0700 hide anyway.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

from ..backend import Backend
from ..errors import BackendError, ObjectNotFound, RepositoryExists, from_os_error

TEMP_PREFIX = ".tmp-"
FILE_MODE, DIR_MODE = 0o600, 0o700
CONFIG_KEY = "config"  # the file whose presence says a repository is here (docs/format.md)
KEYS_DIR, DATA_DIR = "keys", "data"


class FsBackend(Backend):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).expanduser().absolute()
        if (self._root / CONFIG_KEY).is_file():
            self._tighten()

    def prepare_for_init(self) -> None:
        """The top directory becomes private too when ``init`` is given an existing one."""
        tighten(self._root, DIR_MODE)

    def _tighten(self) -> None:
        """Make an existing repository's modes at most 0600/0700 (module docstring): only
        where a ``config`` says a repository is, so a mistyped ``--repo`` pointing at a
        home directory changes nothing."""
        tighten(self._root, DIR_MODE)
        tighten(self._root / CONFIG_KEY, FILE_MODE)
        for top in _entries(self._root):
            if top.is_dir(follow_symlinks=False):
                tighten(Path(top.path), DIR_MODE)
                if top.name == KEYS_DIR:
                    for slot in _entries(Path(top.path)):
                        tighten(Path(slot.path), FILE_MODE)
                elif top.name == DATA_DIR:
                    for prefix in _entries(Path(top.path)):
                        if prefix.is_dir(follow_symlinks=False):
                            tighten(Path(prefix.path), DIR_MODE)

    @property
    def location(self) -> str:
        return str(self._root)

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise BackendError(f"invalid object key {key!r}")
        return self._root / key

    def put(self, key: str, data: bytes | bytearray, *, exclusive: bool = False) -> None:
        path = self._path(key)
        try:
            self._ensure_dir(path.parent)
            temp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
            try:
                self._write_synced(temp, data)
                if exclusive:
                    # link() refuses an existing name: an atomic create-if-absent.
                    os.link(temp, path)
                    os.unlink(temp)
                else:
                    os.replace(temp, path)
            finally:
                # A failed write must not leave its temporary behind (on a full disk it
                # would keep the disk full).
                if temp.exists():
                    temp.unlink()
            fsync_dir(path.parent)
        except FileExistsError as exc:
            raise RepositoryExists(f"{path} already exists") from exc
        except OSError as exc:
            raise from_os_error(exc, f"writing {path}") from exc

    @staticmethod
    def _write_synced(path: Path, data: bytes | bytearray) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        self._ensure_dir(directory.parent)
        try:
            directory.mkdir(DIR_MODE)
        except FileExistsError:
            return
        fsync_dir(directory.parent)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                want = size - offset if length is None else length
                if offset < 0 or want < 0 or offset + want > size:
                    raise BackendError(f"{path}: range {offset}+{want} beyond size {size}")
                handle.seek(offset)
                data = handle.read(want)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{path}: no such object") from exc
        except OSError as exc:
            raise from_os_error(exc, f"reading {path}") from exc
        if len(data) != want:
            raise BackendError(f"{path}: short read")
        return data

    def stat(self, key: str) -> int:
        path = self._path(key)
        try:
            return path.stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{path}: no such object") from exc
        except OSError as exc:
            raise from_os_error(exc, f"inspecting {path}") from exc

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self._root / prefix.rsplit("/", 1)[0] if "/" in prefix else self._root
        if not base.is_dir():
            return
        try:
            for dirpath, _dirs, files in os.walk(base, onerror=_raise):
                rel_dir = os.path.relpath(dirpath, self._root)
                for name in files:
                    if name.startswith(TEMP_PREFIX):
                        continue
                    key = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if not key.startswith(prefix):
                        continue
                    try:
                        size = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue  # deleted since the directory was read (a prune): not listed
                    yield key, size
        except OSError as exc:
            raise from_os_error(exc, f"listing {base}") from exc

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise from_os_error(exc, f"deleting {path}") from exc
        fsync_dir(path.parent)


def tighten(path: Path, mode: int) -> None:
    """Clear the permission bits of ``path`` beyond ``mode`` (group and other ones), if it
    is ours. Best effort: a read-only mount or a file of another user keeps its mode, and
    the command goes on (it reads and writes as before; only the modes could not change)."""
    try:
        status = os.lstat(path)
        if stat.S_ISLNK(status.st_mode) or status.st_uid != os.geteuid():
            return
        current = stat.S_IMODE(status.st_mode)
        if current & ~mode:
            os.chmod(path, current & mode)
    except OSError:
        pass


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return [entry for entry in entries if not entry.name.startswith(TEMP_PREFIX)]
    except OSError:
        return []


def _raise(exc: OSError) -> None:
    """os.walk swallows errors by default; a listing that silently skips an unreadable
    directory would make snapshots or index objects look deleted."""
    raise exc


def fsync_dir(directory: str | bytes | os.PathLike[str]) -> None:
    """Make a rename or create in ``directory`` durable (POSIX needs the dir fsynced)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
