"""The day's steady traffic: archive downloads and authenticated requests (§6.4 items 5-6).

It runs last, with automatic checkpoints off, so the writes stay in ``club.db-wal`` when
the process dies: the state a crashed or still-running server leaves on disk.
"""

from __future__ import annotations

from typing import Any

from .events import DayState
from .rand import DAY_MS, date_utc, zipf_weights
from .server import Server

MIN_WAL_FRAMES = 1100  # "about 1,000+ page writes" left un-checkpointed
WAL_HEADER, FRAME = 32, 4096 + 24
UPSERT = ("INSERT INTO package_download_counts (package_name, version, date_utc, count) VALUES (?, ?, ?, 1) "
          "ON CONFLICT (package_name, version, date_utc) DO UPDATE SET count = count + 1")


def wal_frames(server: Server) -> int:
    """Frames in the -wal, from its size: a stat only, never an open (see SQLITE_NOTES §1.2 trap)."""
    wal = server.root / "db" / "club.db-wal"
    return max(0, (wal.stat().st_size - WAL_HEADER) // FRAME) if wal.exists() else 0


def hold_wal(server: Server) -> None:
    """Start the WAL afresh and stop checkpointing, so the tail's frames stay in it."""
    server.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    server.conn.execute("PRAGMA wal_autocheckpoint = 0")


def run_traffic(server: Server, state: DayState) -> None:
    """Downloads and token touches interleaved, then padding until the WAL is big enough."""
    day = server.meta.profile.day
    pairs = _download_pairs(server, day.download_rows)
    hits = _spread_hits(server, pairs, day.downloads)
    touches = _touch_targets(server, day.token_touches)
    ops: list[tuple[str, Any]] = [("download", hit) for hit in hits] + [("touch", t) for t in touches]
    server.rng.shuffle(ops)
    day_end = (server.clock.now() // DAY_MS + 1) * DAY_MS - 60_000
    step = max(1, (day_end - server.clock.now()) // (len(ops) + MIN_WAL_FRAMES + 1))
    before = server.query("SELECT count(*) FROM package_download_counts WHERE date_utc = ?",
                          (date_utc(server.clock.now()),))[0][0]
    for kind, target in ops:
        server.clock.advance(step)
        _download(server, target) if kind == "download" else _touch(server, target)
    padding = 0
    while wal_frames(server) < MIN_WAL_FRAMES and pairs:
        server.clock.advance(step)
        _download(server, server.rng.choice(pairs))
        padding += 1
    after = server.query("SELECT count(*) FROM package_download_counts WHERE date_utc = ?",
                         (date_utc(server.clock.now()),))[0][0]
    state.report |= {"downloads": len(hits) + padding, "download_rows_new": after - before,
                     "token_touches": len(touches)}


def _download_pairs(server: Server, wanted: int) -> list[tuple[str, str]]:
    """Distinct (package, version) pairs: Zipf by past downloads, latest 1-3 versions."""
    ranked = [r[0] for r in server.query(
        "SELECT p.name FROM packages p LEFT JOIN package_download_counts d ON d.package_name = p.name "
        "WHERE p.latest_version IS NOT NULL GROUP BY p.name ORDER BY coalesce(sum(d.count), 0) DESC, p.name")]
    recent: dict[str, list[str]] = {}
    for name, version in server.query("SELECT package_name, version FROM package_versions "
                                      "ORDER BY package_name, published_at DESC, version"):
        recent.setdefault(name, []).append(version)
    weights = zipf_weights(len(ranked))
    seen: dict[tuple[str, str], None] = {}
    for _ in range(wanted * 12):
        if len(seen) >= wanted or not ranked:
            break
        name = server.rng.choices(ranked, weights)[0]
        versions = recent[name][:3]
        seen[(name, server.rng.choices(versions, (70, 20, 10)[: len(versions)])[0])] = None
    return list(seen)


def _spread_hits(server: Server, pairs: list[tuple[str, str]], downloads: int) -> list[tuple[str, str]]:
    """Every pair at least once; the rest repeat popular pairs (repeated UPSERTs, §6.4)."""
    if not pairs:
        return []
    extra = server.rng.choices(pairs, zipf_weights(len(pairs)), k=max(0, downloads - len(pairs)))
    return list(pairs) + extra


def _touch_targets(server: Server, count: int) -> list[tuple[str, str, int | None]]:
    live = server.query("SELECT token_id, kind, absolute_expires_at FROM api_tokens WHERE revoked_at IS NULL "
                        "ORDER BY token_id")
    return server.rng.sample(live, min(count, len(live)))


def _download(server: Server, pair: tuple[str, str]) -> None:
    with server.tx() as conn:
        conn.execute(UPSERT, (*pair, date_utc(server.clock.now())))


def _touch(server: Server, token: tuple[str, str, int | None]) -> None:
    """PATs record last use; sessions also slide expires_at (30 days, capped at absolute)."""
    token_id, kind, absolute = token
    now = server.clock.now()
    with server.tx() as conn:
        if kind == "session":
            expires = min(now + 30 * DAY_MS, absolute or now + 30 * DAY_MS)
            conn.execute("UPDATE api_tokens SET last_used_at = ?, expires_at = ? WHERE token_id = ?",
                         (now, expires, token_id))
        else:
            conn.execute("UPDATE api_tokens SET last_used_at = ? WHERE token_id = ?", (now, token_id))
