"""club's schema v3 (CLUB_DATA §1.4, packages/club_db/lib/src/sql/schema.dart) and connections.

The DDL is club's canonical fresh-install schema restricted to the tables §1.4 lists, so
CHECKs and FKs are the fresh-install ones (a migrated DB would lack two of them, §1.2).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 3

TABLES = (
    """CREATE TABLE club_schema (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
)""",
    """CREATE TABLE users (
    user_id              TEXT PRIMARY KEY NOT NULL,
    email                TEXT NOT NULL UNIQUE,
    password_hash        TEXT NOT NULL,
    display_name         TEXT NOT NULL,
    role                 TEXT NOT NULL DEFAULT 'member',
    must_change_password INTEGER NOT NULL DEFAULT 0,
    avatar               TEXT,
    has_avatar           INTEGER NOT NULL DEFAULT 0,
    is_active            INTEGER NOT NULL DEFAULT 1,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
)""",
    """CREATE TABLE api_tokens (
    token_id             TEXT PRIMARY KEY NOT NULL,
    user_id              TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    kind                 TEXT NOT NULL CHECK (kind IN ('session', 'pat')),
    name                 TEXT NOT NULL,
    token_hash           TEXT NOT NULL UNIQUE,
    prefix               TEXT NOT NULL,
    scopes               TEXT NOT NULL DEFAULT '[]',
    expires_at           INTEGER,
    absolute_expires_at  INTEGER,
    user_agent           TEXT,
    client_ip            TEXT,
    client_city          TEXT,
    client_region        TEXT,
    client_country       TEXT,
    client_country_code  TEXT,
    last_used_at         INTEGER,
    revoked_at           INTEGER,
    created_at           INTEGER NOT NULL
)""",
    """CREATE TABLE user_invites (
    invite_id   TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    token_hash  TEXT NOT NULL UNIQUE,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    created_by  TEXT REFERENCES users(user_id) ON DELETE SET NULL,
    created_at  INTEGER NOT NULL
)""",
    """CREATE TABLE publishers (
    id            TEXT PRIMARY KEY NOT NULL,
    display_name  TEXT NOT NULL,
    description   TEXT,
    website_url   TEXT,
    contact_email TEXT,
    verified      INTEGER NOT NULL DEFAULT 0,
    created_by    TEXT NOT NULL REFERENCES users(user_id),
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
)""",
    """CREATE TABLE publisher_verifications (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    domain      TEXT NOT NULL,
    token_hash  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    UNIQUE (user_id, domain)
)""",
    "CREATE INDEX idx_pub_verif_expires ON publisher_verifications (expires_at)",
    """CREATE TABLE publisher_members (
    publisher_id TEXT NOT NULL REFERENCES publishers(id) ON DELETE CASCADE,
    user_id      TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    role         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (publisher_id, user_id)
)""",
    """CREATE TABLE packages (
    name                  TEXT PRIMARY KEY NOT NULL,
    publisher_id          TEXT REFERENCES publishers(id) ON DELETE SET NULL,
    latest_version        TEXT,
    latest_prerelease     TEXT,
    likes_count           INTEGER NOT NULL DEFAULT 0,
    is_discontinued       INTEGER NOT NULL DEFAULT 0,
    replaced_by           TEXT,
    is_unlisted           INTEGER NOT NULL DEFAULT 0,
    visibility            TEXT NOT NULL DEFAULT 'private'
                            CHECK (visibility IN ('private','public')),
    visibility_changed_at INTEGER,
    visibility_changed_by TEXT REFERENCES users(user_id) ON DELETE SET NULL,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL
)""",
    """CREATE TABLE package_versions (
    package_name       TEXT NOT NULL REFERENCES packages(name) ON DELETE CASCADE,
    version            TEXT NOT NULL,
    pubspec_json       TEXT NOT NULL,
    readme_content     TEXT,
    changelog_content  TEXT,
    libraries          TEXT NOT NULL DEFAULT '[]',
    bin_executables    TEXT NOT NULL DEFAULT '[]',
    screenshots        TEXT NOT NULL DEFAULT '[]',
    tags               TEXT NOT NULL DEFAULT '[]',
    example_path       TEXT,
    example_content    TEXT,
    archive_size_bytes INTEGER NOT NULL,
    archive_sha256     TEXT NOT NULL,
    uploader_id        TEXT REFERENCES users(user_id) ON DELETE SET NULL,
    publisher_id       TEXT,
    is_retracted       INTEGER NOT NULL DEFAULT 0,
    retracted_at       INTEGER,
    is_prerelease      INTEGER NOT NULL DEFAULT 0,
    dart_sdk_min       TEXT,
    dart_sdk_max       TEXT,
    flutter_sdk_min    TEXT,
    flutter_sdk_max    TEXT,
    published_at       INTEGER NOT NULL,
    public_resolvable  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (package_name, version)
)""",
    """CREATE TABLE package_version_dependencies (
    package_name    TEXT NOT NULL,
    version         TEXT NOT NULL,
    dep_name        TEXT NOT NULL,
    kind            TEXT NOT NULL
                      CHECK (kind IN ('direct','dev','override')),
    source          TEXT NOT NULL
                      CHECK (source IN ('hosted','bare','sdk','path','git')),
    hosted_origin   TEXT,
    is_local        INTEGER NOT NULL DEFAULT 0,
    is_ambiguous    INTEGER NOT NULL DEFAULT 0,
    constraint_text TEXT,
    PRIMARY KEY (package_name, version, dep_name, kind),
    FOREIGN KEY (package_name, version)
      REFERENCES package_versions(package_name, version) ON DELETE CASCADE
)""",
    """CREATE TABLE package_uploaders (
    package_name TEXT NOT NULL REFERENCES packages(name) ON DELETE CASCADE,
    user_id      TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (package_name, user_id)
)""",
    """CREATE TABLE package_likes (
    user_id      TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    package_name TEXT NOT NULL REFERENCES packages(name) ON DELETE CASCADE,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (user_id, package_name)
)""",
    """CREATE TABLE upload_sessions (
    id         TEXT PRIMARY KEY NOT NULL,
    user_id    TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
    temp_path  TEXT NOT NULL,
    state      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
)""",
    """CREATE TABLE audit_log (
    id           TEXT PRIMARY KEY NOT NULL,
    created_at   INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    agent_id     TEXT,
    package_name TEXT,
    version      TEXT,
    publisher_id TEXT,
    summary      TEXT NOT NULL,
    data_json    TEXT NOT NULL DEFAULT '{}'
)""",
    """CREATE VIRTUAL TABLE package_fts USING fts5(
    package_name UNINDEXED,
    name,
    description,
    readme_excerpt,
    tags,
    topics
)""",
    """CREATE TABLE package_scores (
    package_name    TEXT NOT NULL,
    version         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    granted_points  INTEGER,
    max_points      INTEGER,
    report_json     TEXT,
    pana_tags       TEXT,
    pana_version    TEXT,
    dart_version    TEXT,
    flutter_version TEXT,
    error_message   TEXT,
    scored_at       INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (package_name, version),
    FOREIGN KEY (package_name, version)
      REFERENCES package_versions(package_name, version) ON DELETE CASCADE
)""",
    """CREATE TABLE server_settings (
    key        TEXT PRIMARY KEY NOT NULL,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
)""",
    """CREATE TABLE sdk_installs (
    id              TEXT PRIMARY KEY NOT NULL,
    channel         TEXT NOT NULL,
    version         TEXT NOT NULL,
    dart_version    TEXT,
    install_path    TEXT NOT NULL,
    size_bytes      INTEGER,
    status          TEXT NOT NULL DEFAULT 'cloning',
    error_message   TEXT,
    is_default      INTEGER NOT NULL DEFAULT 0,
    installed_at    INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
)""",
    """CREATE TABLE dartdoc_status (
    package_name    TEXT PRIMARY KEY NOT NULL
                      REFERENCES packages(name) ON DELETE CASCADE,
    version         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    error_message   TEXT,
    generated_at    INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
)""",
    """CREATE TABLE package_download_counts (
    package_name  TEXT NOT NULL REFERENCES packages(name) ON DELETE CASCADE,
    version       TEXT NOT NULL,
    date_utc      TEXT NOT NULL,
    count         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (package_name, version, date_utc)
)""",
)

INDEXES = (
    "CREATE INDEX idx_users_email ON users(email)",
    "CREATE INDEX idx_api_tokens_user_id ON api_tokens(user_id)",
    "CREATE INDEX idx_api_tokens_token_hash ON api_tokens(token_hash)",
    "CREATE INDEX idx_user_invites_user_id ON user_invites(user_id)",
    "CREATE INDEX idx_user_invites_token_hash ON user_invites(token_hash)",
    "CREATE INDEX idx_packages_publisher_id ON packages(publisher_id)",
    "CREATE INDEX idx_packages_updated_at ON packages(updated_at DESC)",
    "CREATE INDEX idx_packages_visibility ON packages(visibility)",
    "CREATE INDEX idx_pvd_dep_name ON package_version_dependencies(dep_name, is_local)",
    "CREATE INDEX idx_pvd_package ON package_version_dependencies(package_name, version)",
    "CREATE INDEX idx_package_versions_package_name ON package_versions(package_name)",
    "CREATE INDEX idx_package_versions_published_at ON package_versions(published_at DESC)",
    "CREATE INDEX idx_package_likes_package_name ON package_likes(package_name)",
    "CREATE INDEX idx_audit_log_created_at ON audit_log(created_at DESC)",
    "CREATE INDEX idx_audit_log_package_name ON audit_log(package_name)",
    "CREATE INDEX idx_audit_log_agent_id ON audit_log(agent_id)",
    "CREATE INDEX idx_package_scores_status ON package_scores(status)",
    "CREATE INDEX idx_sdk_installs_status ON sdk_installs(status)",
    "CREATE UNIQUE INDEX idx_sdk_installs_version ON sdk_installs(version, channel)",
    "CREATE INDEX idx_dartdoc_status_status ON dartdoc_status(status)",
    "CREATE INDEX idx_download_counts_package ON package_download_counts(package_name, date_utc DESC)",
    "CREATE INDEX idx_download_counts_version ON package_download_counts(package_name, version, date_utc DESC)",
)


def create_database(path: Path) -> sqlite3.Connection:
    """A fresh club.db stamped v3, opened for a fast bulk load.

    The bulk load runs without a journal (a failed generate is simply rerun); the file is
    switched to WAL at the end by ``finish_database``, which is the state club leaves.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("BEGIN")
    for statement in (*TABLES, *INDEXES):
        conn.execute(statement)
    conn.execute("INSERT INTO club_schema (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("COMMIT")
    return conn


def finish_database(conn: sqlite3.Connection) -> None:
    """Switch to WAL (club's mode) and close, which checkpoints and removes the -wal."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()


def open_club(path: Path, timeout_ms: int = 5000) -> sqlite3.Connection:
    """A connection set up exactly as club's (WAL, foreign keys, busy_timeout 5000).

    Autocommit mode, so callers issue ``BEGIN IMMEDIATE`` themselves like club's writer.
    """
    conn = sqlite3.connect(path, isolation_level=None, timeout=timeout_ms / 1000)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")
    return conn
