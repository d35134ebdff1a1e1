"""Deterministic tar.gz and gzip-member bytes.

Tar member headers carry mtime/uid/uname and a gzip header carries an mtime; all of them
are pinned here so the same content always gives the same archive bytes (and so the same
``archive_sha256``), run after run.
"""

from __future__ import annotations

import io
import tarfile
import zlib

from .rand import EPOCH_MS

TAR_MTIME = EPOCH_MS // 1000


def gzip_member(data: bytes, level: int = 6) -> bytes:
    """One gzip member with mtime 0, as Dart's ``gzip`` codec (zlib level 6) writes it."""
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


def build_tarball(files: list[tuple[str, bytes]]) -> bytes:
    """A ``package.tar.gz`` with the given members, in order, with pinned metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, data in files:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip_member(buf.getvalue())
