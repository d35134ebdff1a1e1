"""Local-directory backend: temp file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Iterator

from ..backend import Backend
from ..errors import BackendError, ObjectNotFound, RepositoryExists, from_os_error

TEMP_PREFIX = ".tmp-"


class FsBackend(Backend):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).expanduser().absolute()

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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
            directory.mkdir()
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
