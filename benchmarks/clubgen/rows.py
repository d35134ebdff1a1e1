"""Row builders shared by generate, one_day and LiveWriter.

Rows are dicts keyed by column name, so every writer inserts through one helper and a
column can never be silently misplaced; each builder always emits the same keys, which is
what lets ``executemany`` batch consecutive rows of a table.
"""

from __future__ import annotations

import json
import random
import sqlite3
from typing import NamedTuple, Protocol

from .model import Dep, ScoreRecord, VersionSpec
from .rand import uuid4
from .scores import DART_VERSION, FLUTTER_VERSION, PANA_VERSION
from .semver import is_prerelease

Row = dict[str, object]


class VersionContent(Protocol):
    """The built text and archive facts of a version (BuiltVersion or VersionRecord)."""

    @property
    def pubspec_json(self) -> str: ...
    @property
    def readme(self) -> str: ...
    @property
    def changelog(self) -> str: ...
    @property
    def example_path(self) -> str | None: ...
    @property
    def example_content(self) -> str | None: ...
    @property
    def screenshots_json(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...


class Timed(NamedTuple):
    """A row to insert at a simulated instant; generate sorts these to grow the DB in time order."""

    ts: int
    table: str
    row: Row


def insert(conn: sqlite3.Connection, table: str, rows: list[Row]) -> None:
    """INSERT rows that share one key set."""
    if not rows:
        return
    cols = list(rows[0])
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
    conn.executemany(sql, rows)


def compact(value: object) -> str:
    """JSON as Dart's jsonEncode writes it (no spaces)."""
    return json.dumps(value, separators=(",", ":"))


def audit(rng: random.Random, ts: int, kind: str, agent: str | None, summary: str, *,
          package: str | None = None, version: str | None = None, publisher: str | None = None,
          data: dict[str, object] | None = None) -> Timed:
    """One audit_log row (§1.6 kinds)."""
    row: Row = {"id": uuid4(rng), "created_at": ts, "kind": kind, "agent_id": agent,
                "package_name": package, "version": version, "publisher_id": publisher,
                "summary": summary, "data_json": compact(data or {})}
    return Timed(ts, "audit_log", row)


def tags_for(spec: VersionSpec) -> str:
    """Derived SDK/platform tags, e.g. ["sdk:dart","sdk:flutter","platform:android",...]."""
    tags = ["sdk:dart", "sdk:flutter"] if spec.flutter else ["sdk:dart"]
    tags += ["platform:android", "platform:ios"] + ([] if spec.flutter else ["platform:linux", "platform:web"])
    tags += ["is:null-safe", "is:dart3-compatible", "license:mit"]
    tags += [f"topic:{t}" for t in spec.topics]
    return compact(tags)


def version_row(spec: VersionSpec, rec: VersionContent, *, published_at: int, uploader_id: str | None,
                publisher_id: str | None, public_resolvable: bool, retracted_at: int | None) -> Row:
    """A package_versions row; archive size/sha come from the tarball actually written."""
    return {
        "package_name": spec.package, "version": spec.version, "pubspec_json": rec.pubspec_json,
        "readme_content": rec.readme, "changelog_content": rec.changelog,
        "libraries": compact(list(spec.libraries)), "bin_executables": compact(list(spec.executables)),
        "screenshots": rec.screenshots_json, "tags": tags_for(spec), "example_path": rec.example_path,
        "example_content": rec.example_content, "archive_size_bytes": rec.size,
        "archive_sha256": rec.sha256, "uploader_id": uploader_id, "publisher_id": publisher_id,
        "is_retracted": int(retracted_at is not None), "retracted_at": retracted_at,
        "is_prerelease": int(is_prerelease(spec.version)), "dart_sdk_min": "3.0.0", "dart_sdk_max": "4.0.0",
        "flutter_sdk_min": "3.10.0" if spec.flutter else None, "flutter_sdk_max": None,
        "published_at": published_at, "public_resolvable": int(public_resolvable),
    }


def public_resolvable(package_public: bool, deps: tuple[Dep, ...], public: set[str]) -> bool:
    """club's derived flag: the package is public and so is every club-hosted direct dep."""
    return package_public and all(d.name in public for d in deps if d.is_local and d.kind == "direct")


def dep_rows(spec: VersionSpec) -> list[Row]:
    """package_version_dependencies rows, one per declared dependency."""
    return [dep_row(spec.package, spec.version, dep) for dep in spec.deps]


def dep_row(package: str, version: str, dep: Dep) -> Row:
    """One dependency row; ``Dep`` fields map one to one onto the columns."""
    return {"package_name": package, "version": version, "dep_name": dep.name, "kind": dep.kind,
            "source": dep.source, "hosted_origin": dep.hosted_origin, "is_local": int(dep.is_local),
            "is_ambiguous": int(dep.is_ambiguous), "constraint_text": dep.constraint}


def score_row(package: str, version: str, score: ScoreRecord, created_at: int, scored_at: int) -> Row:
    """A package_scores row in its final state."""
    return {"package_name": package, "version": version, "status": score.status,
            "granted_points": score.granted, "max_points": score.max_points,
            "report_json": score.report_json, "pana_tags": score.pana_tags,
            "pana_version": PANA_VERSION, "dart_version": DART_VERSION,
            "flutter_version": FLUTTER_VERSION, "error_message": score.error,
            "scored_at": scored_at, "created_at": created_at, "updated_at": scored_at}


def fts_row(package: str, description: str, readme: str, tags: str, topics: tuple[str, ...]) -> Row:
    """package_fts row; the readme excerpt is capped at 500 characters like club's."""
    return {"package_name": package, "name": package, "description": description,
            "readme_excerpt": readme[:500], "tags": " ".join(json.loads(tags)), "topics": " ".join(topics)}


def upload_row(rng: random.Random, user_id: str, created_at: int, state: str) -> Row:
    """An upload_sessions row; temp files live in DATA_DIR/tmp/uploads/<id>.tar.gz."""
    upload_id = uuid4(rng)
    return {"id": upload_id, "user_id": user_id, "temp_path": f"/data/tmp/uploads/{upload_id}.tar.gz",
            "state": state, "created_at": created_at, "expires_at": created_at + 600_000}
