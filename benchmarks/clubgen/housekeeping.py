"""Server housekeeping around a day: the boot-time temp cleanup and in-flight leftovers.

club deletes ``*.tmp.*`` blobs when it starts (§2.1), so a day begins with an overnight
restart; it ends with an upload still in tmp/uploads and a blob write caught mid-flight,
which a snapshot must skip (§6.4 item 10).
"""

from __future__ import annotations

import re

from . import text
from .archive import build_tarball
from .events import DayState
from .rows import insert, upload_row
from .server import Server

STRAY = re.compile(r"\.tmp\.\d+$")


def restart_cleanup(server: Server) -> None:
    """Overnight restart: club deletes ``*.tmp.*`` blobs at boot; stale uploads are failed."""
    for path in sorted(server.store.base.rglob("*")):
        if path.is_file() and STRAY.search(path.name):
            path.unlink()
    stale = server.query("SELECT id FROM upload_sessions WHERE state IN ('pending', 'received') ORDER BY id")
    with server.tx() as conn:
        for (upload_id,) in stale:
            conn.execute("UPDATE upload_sessions SET state = 'failed' WHERE id = ?", (upload_id,))
    for (upload_id,) in stale:
        (server.root / "tmp" / "uploads" / f"{upload_id}.tar.gz").unlink(missing_ok=True)


def leave_inflight(server: Server, state: DayState) -> None:
    """An upload received but not yet processed, and a blob write caught mid-flight."""
    user = server.rng.choice([r[0] for r in server.query("SELECT user_id FROM users WHERE role != 'viewer' "
                                                         "ORDER BY user_id")])
    row = upload_row(server.rng, user, server.clock.advance(60_000), "received")
    path = server.root / "tmp" / "uploads" / f"{row['id']}.tar.gz"
    path.write_bytes(build_tarball([("pubspec.yaml", b"name: in_flight\nversion: 0.0.1\n"),
                                    ("lib/in_flight.dart", text.dart_source(server.rng, 20_000).encode())]))
    with server.tx() as conn:
        insert(conn, "upload_sessions", [row])
    keys = sorted(k for k in server.store.keys_under("") if k.endswith(("/blob", "package.tar.gz")))
    key = server.rng.choice(keys)
    data = server.store.read(key)
    state.report["stray_tmp"] = server.store.leave_stray(key, data[: len(data) // 2])
    state.report["tmp_upload"] = path.relative_to(server.root).as_posix()
