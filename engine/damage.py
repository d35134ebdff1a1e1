"""Damage records: what a read found broken, where every host sees it (docs/format.md §6.14).

A check that reads a pack back, or a restore whose blob fails authentication, learns
that a blob's stored copy is gone. Printing it is not enough: a chunk id is a content
address, so the next snapshot would find the id "stored" and never store the intact
bytes it has at hand again, and every later backup would be as broken as the first.
So the finding is written into the repository as a record naming the damaged locations
(blob id and pack). The catalog loads these with the index, and a damaged location does
not count as stored: the next snapshot stores those chunks again from the source, which
also makes every older snapshot that needs them restorable. ``repair packs`` deletes a
record once the packs it names are gone.

Check records (kind 12) keep the last check's verdict, for ``status``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .backend import Backend
from .catalog import Catalog
from .crypto import Cipher
from .errors import EngineError, IntegrityError, ObjectNotFound, UnsupportedFormat
from .format import (
    CHECK_PREFIX, DAMAGE_PREFIX, DATA_PREFIX, SNAPSHOT_STAMP, ChunkId, Kind, PackId, digest, open_object, seal_object,
)

KEEP_CHECKS = 30  # check records kept: the newest decides
MAX_LISTED = 20


@dataclass
class Finding:
    """What one read found of a pack: its damaged blobs, or that it is missing whole."""

    blobs: set[ChunkId] = field(default_factory=set)
    missing: bool = False  # gone or truncated: every blob the index places there is lost


def _stamped_key(prefix: str, now: datetime, data: bytes) -> str:
    """``<prefix><UTC time>_<hash>``: a LIST orders the records by time, and a reader
    checks the bytes against the name."""
    return f"{prefix}{now.astimezone(timezone.utc).strftime(SNAPSHOT_STAMP)}_{digest(data).hex()}"


def record_damage(backend: Backend, cipher: Cipher, catalog: Catalog, findings: dict[PackId, Finding],
                  found_by: str, now: datetime) -> tuple[str | None, bool]:
    """Write a damage record for what the catalog does not know already, and catalog it;
    returns its key (None when there was nothing new or the repository cannot be written:
    read-only credentials, and the read that found it still fails, as it should), and
    whether the catalog's index was cleared (``Catalog.add_damage``)."""
    new = {pack: Finding({b for b in f.blobs if not catalog.damage_known(b, pack)}, f.missing)
           for pack, f in findings.items()}
    known = catalog.damaged_packs()
    new = {pack: f for pack, f in new.items() if f.blobs or pack not in known or (f.missing and not known[pack])}
    if not new:
        return None, False
    record = {"time": now.astimezone(timezone.utc).isoformat(), "host": socket.gethostname(), "found_by": found_by,
              "packs": [{"id": bytes(pack), "missing": f.missing, "blobs": sorted(bytes(b) for b in f.blobs)}
                        for pack, f in sorted(new.items())]}
    data = seal_object(Kind.DAMAGE, record, cipher)
    key = _stamped_key(DAMAGE_PREFIX, now, data)
    try:
        backend.put(key, data)
    except EngineError:
        return None, False
    return key, catalog.add_damage(key[len(DAMAGE_PREFIX):], _findings(record))


def read_damage(backend: Backend, cipher: Cipher, name: str) -> dict[str, Any]:
    key = DAMAGE_PREFIX + name
    data = backend.get(key)
    record = dict(open_object(Kind.DAMAGE, data, key, cipher))
    if name.rsplit("_", 1)[-1] != digest(data).hex():
        raise IntegrityError(f"{key}: content does not match its name (corrupted)")
    return record


def _findings(record: dict[str, Any]) -> dict[PackId, tuple[list[ChunkId], bool]]:
    return {PackId(p["id"]): ([ChunkId(b) for b in p.get("blobs", [])], bool(p.get("missing")))
            for p in record["packs"]}


def sync_damage(backend: Backend, cipher: Cipher, catalog: Catalog) -> list[str]:
    """Bring the catalog's damaged locations up to date with ``damage/``; returns warnings
    about records that cannot be read (passed over: ``check --read-data`` finds the
    damage again)."""
    present = {key[len(DAMAGE_PREFIX):] for key, _ in backend.list(DAMAGE_PREFIX)}
    known = catalog.damage_names()
    catalog.remove_damage(known - present)
    warnings = []
    for name in sorted(present - known):
        try:
            catalog.add_damage(name, _findings(read_damage(backend, cipher, name)))
        except ObjectNotFound:
            continue  # healed and removed meanwhile
        except (IntegrityError, UnsupportedFormat, KeyError, TypeError, ValueError) as exc:
            warnings.append(f"{DAMAGE_PREFIX}{name}: unreadable damage record ({exc}); 'clubsnap check "
                            f"--read-data' finds that damage again")
    return warnings


def remove_settled(backend: Backend, catalog: Catalog) -> list[str]:
    """Delete the damage records all of whose packs are gone from storage and from the
    index (a repair or a prune removed them): what they said is now said by the index
    itself, which places those blobs nowhere, so snapshots store them again. A missing
    pack the index still names stays recorded. Returns the names deleted."""
    present = {PackId.from_hex(key.rsplit("/", 1)[-1]) for key, _ in backend.list(DATA_PREFIX)}
    present |= set(catalog.packs())
    settled = []
    for name, packs in catalog.damage_by_record().items():
        if packs & present:
            continue
        try:
            backend.delete(DAMAGE_PREFIX + name)
        except ObjectNotFound:
            pass  # another process removed it
        except EngineError:
            continue  # read-only credentials: it stays, and says only what the index says too
        settled.append(name)
    catalog.remove_damage(settled)
    return settled


# ---- check records ------------------------------------------------------------------------

def record_check(backend: Backend, cipher: Cipher, now: datetime, read_data: float | None,
                 errors: list[str]) -> str | None:
    """Store a check's verdict (``read_data``: the fraction of packs read back, None for
    a structural check); the newest ``KEEP_CHECKS`` stay. None when it cannot be written."""
    record = {"time": now.astimezone(timezone.utc).isoformat(), "host": socket.gethostname(),
              "read_data": read_data, "ok": not errors, "error_count": len(errors), "errors": errors[:MAX_LISTED]}
    data = seal_object(Kind.CHECK, record, cipher)
    key = _stamped_key(CHECK_PREFIX, now, data)
    try:
        backend.put(key, data)
        for old in sorted(k for k, _ in backend.list(CHECK_PREFIX))[:-KEEP_CHECKS]:
            backend.delete(old)
    except EngineError:
        return None
    return key


def latest_check(backend: Backend, cipher: Cipher) -> dict[str, Any] | None:
    """The newest readable check record."""
    for key in sorted((k for k, _ in backend.list(CHECK_PREFIX)), reverse=True):
        try:
            data = backend.get(key)
            record = dict(open_object(Kind.CHECK, data, key, cipher))
            if key.rsplit("_", 1)[-1] == digest(data).hex():
                return record
        except (ObjectNotFound, IntegrityError, UnsupportedFormat, ValueError, TypeError):
            continue
    return None
