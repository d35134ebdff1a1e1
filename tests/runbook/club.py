"""A stand-in for club's server, for the runbook test.

What the runbook relies on, and nothing else: at boot it reads ``club_schema`` and
refuses a database stamped newer than it supports (CLUB_DATA §1.2), or migrates an older
one up inside ``BEGIN IMMEDIATE``; it keeps writing to ``club.db`` the way club does (a
real writer process, ``benchmarks.clubgen.LiveWriter``: requests and publishes); it
answers ``GET /api/v1/health`` after probing the metadata and blob stores (CLUB_DATA §4);
and on SIGTERM it closes its connections, which checkpoints and removes the WAL.

    python -m tests.runbook.club DATA_DIR --port 8080 [--supports 3] [--ready FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.clubgen import LiveWriter

MIGRATION_4 = "ALTER TABLE packages ADD COLUMN standin_v4 INTEGER"  # what a "club 4" adds at boot


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM club_schema WHERE key = 'schema_version'").fetchone()[0])


def boot(database: Path, supports: int) -> int | None:
    """club's boot-time schema step; returns the version, or None after a refusal (printed)."""
    conn = sqlite3.connect(database, timeout=5, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        version = schema_version(conn)
        if version > supports:
            print(f"club: database schema version {version} is newer than this server supports ({supports}); "
                  f"restore the database taken before the upgrade, or run the newer server", file=sys.stderr)
            return None
        if version < supports:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(MIGRATION_4)
            conn.execute("UPDATE club_schema SET value = ? WHERE key = 'schema_version'", (supports,))
            conn.execute(f"PRAGMA user_version = {supports}")
            conn.execute("COMMIT")
            version = supports
        return version
    finally:
        conn.close()


def _handler(data: Path, version: int) -> type[BaseHTTPRequestHandler]:
    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/api/v1/health":
                self.send_error(404)
                return
            checks, healthy = {}, True
            for name, probe in (("metadata_store", lambda: _probe_db(data)), ("blob_store", lambda: _probe_blobs(data))):
                started = time.monotonic()
                try:
                    probe()
                    checks[name] = {"status": "ok", "latencyMs": round((time.monotonic() - started) * 1000)}
                except (OSError, sqlite3.Error) as exc:
                    healthy, checks[name] = False, {"status": "error", "error": str(exc)}
            body = json.dumps({"status": "ok" if healthy else "degraded", "checks": checks,
                               "version": f"stand-in (schema {version})", "timestamp": time.time()}).encode()
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Health


def _probe_db(data: Path) -> None:
    conn = sqlite3.connect(data / "db" / "club.db", timeout=5)
    try:
        conn.execute("SELECT name FROM packages LIMIT 1").fetchall()
    finally:
        conn.close()


def _probe_blobs(data: Path) -> None:
    os.listdir(data / "blobs")


def serve(data: Path, port: int, supports: int, ready: Path | None) -> int:
    version = boot(data / "db" / "club.db", supports)
    if version is None:
        return 1
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(data, version))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LiveWriter(data, interval=0.02, publish_every=60):
        threading.Thread(target=server.serve_forever, daemon=True).start()
        if ready:
            ready.write_text(str(os.getpid()))
        stop.wait()
        server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="club")
    parser.add_argument("data", type=Path)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--supports", type=int, default=3, help="the newest schema this server knows")
    parser.add_argument("--ready", type=Path, help="written with the pid once serving")
    args = parser.parse_args(argv)
    return serve(args.data, args.port, args.supports, args.ready)


if __name__ == "__main__":
    sys.exit(main())
