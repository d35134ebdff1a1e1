"""The filesystem blob store, written the way club writes it (CLUB_DATA §2.1, §2.2).

Every put goes to ``<final>.tmp.<µs>`` and is renamed over the target, so a concurrent
scanner only ever sees whole files or stray temp files; deletes remove a version
directory and its package directory only when that becomes empty. A ledger remembers
which keys existed before the first touch, so one_day can report what it added,
replaced and removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from .rand import iso_utc, sha256_hex


class BlobStore:
    """Blob keys are paths relative to ``<root>/blobs`` such as ``pkg/1.0.0/artifacts/package.tar.gz``."""

    def __init__(self, root: Path, clock_us: Callable[[], int]) -> None:
        self.base = root / "blobs"
        self._clock_us = clock_us
        self._before: dict[str, bool] = {}

    def path(self, key: str) -> Path:
        return self.base / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        """Temp file then rename, exactly club's FilesystemBlobStore write path."""
        self._note(key)
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f"{target.name}.tmp.{self._clock_us()}")
        temp.write_bytes(data)
        os.replace(temp, target)

    def put_sidecar(self, package: str, version: str, data: bytes, created_ms: int) -> None:
        """S3/GCS mirror only: ``artifacts/package.json`` {size, sha256, createdAt}."""
        body = f'{{"size":{len(data)},"sha256":"{sha256_hex(data)}","createdAt":"{iso_utc(created_ms)}"}}'
        self.put(f"{package}/{version}/artifacts/package.json", body.encode())

    def delete(self, key: str) -> None:
        """Remove one object (a republish drops stale screenshot indices this way)."""
        self._note(key)
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under a key prefix (a republish wipes ``readme-assets/``)."""
        folder = self.path(prefix)
        for key in self.keys_under(prefix):
            self._note(key)
        shutil.rmtree(folder, ignore_errors=True)

    def delete_version(self, package: str, version: str) -> None:
        """club's filesystem delete: the whole ``<pkg>/<ver>/`` dir, then ``<pkg>/`` if empty."""
        self.delete_prefix(f"{package}/{version}")
        package_dir = self.path(package)
        if package_dir.is_dir() and not any(package_dir.iterdir()):
            package_dir.rmdir()

    def keys_under(self, prefix: str) -> list[str]:
        """Sorted keys below a prefix ("" lists the whole store)."""
        folder = self.path(prefix)
        if not folder.is_dir():
            return []
        return sorted(p.relative_to(self.base).as_posix() for p in folder.rglob("*") if p.is_file())

    def leave_stray(self, key: str, data: bytes) -> str:
        """A ``*.tmp.<µs>`` file as an interrupted write leaves it; returns its blob-relative path."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f"{target.name}.tmp.{self._clock_us()}")
        temp.write_bytes(data)
        return temp.relative_to(self.base).as_posix()

    def changes(self) -> dict[str, list[str]]:
        """Keys added, replaced and removed since this store was opened."""
        out: dict[str, list[str]] = {"added": [], "replaced": [], "removed": []}
        for key, existed in sorted(self._before.items()):
            now = self.exists(key)
            if existed and now:
                out["replaced"].append(key)
            elif now:
                out["added"].append(key)
            elif existed:
                out["removed"].append(key)
        return out

    def _note(self, key: str) -> None:
        if key not in self._before:
            self._before[key] = self.exists(key)
