"""Account and admin events of one day: logins, tokens, likes, settings (§6.4 items 6, 10)."""

from __future__ import annotations

from . import text
from .events import DayState
from .people import User, token_row
from .rows import insert
from .server import Server


def _user(server: Server, user_id: str) -> User:
    role, created, active = server.query("SELECT role, created_at, is_active FROM users WHERE user_id = ?",
                                         (user_id,))[0]
    return User(user_id, role, created, bool(active))


def logins(server: Server, state: DayState, count: int) -> None:
    """Web logins: a session row plus user.login and user.token_created audit rows."""
    users = [r[0] for r in server.query("SELECT user_id FROM users WHERE is_active = 1 ORDER BY user_id")]
    for _ in range(count):
        now = server.clock.advance(server.rng.randrange(60_000, 1_800_000))
        user = _user(server, server.rng.choice(users))
        row = token_row(server.rng, user, "session", now, "Web session", now)
        row |= {"revoked_at": None, "last_used_at": now}
        with server.tx() as conn:
            insert(conn, "api_tokens", [row])
            server.audit(conn, "user.login", user.user_id, "Signed in")
            server.audit(conn, "user.token_created", user.user_id, "Created session token",
                         data={"tokenId": row["token_id"], "kind": "session"})
    state.report["logins"] = count


def pats(server: Server, state: DayState, created: int, revoked: int) -> None:
    """Personal access tokens created and revoked."""
    writers = [r[0] for r in server.query("SELECT user_id FROM users WHERE is_active = 1 AND role != 'viewer' "
                                          "ORDER BY user_id")]
    for index in range(created):
        user = _user(server, server.rng.choice(writers))
        now = server.clock.advance(300_000)
        row = token_row(server.rng, user, "pat", now, f"ci-day{state.label[1]}-{index}", now)
        row |= {"revoked_at": None, "last_used_at": None}
        with server.tx() as conn:
            insert(conn, "api_tokens", [row])
            server.audit(conn, "user.token_created", user.user_id, "Created pat token",
                         data={"tokenId": row["token_id"], "kind": "pat"})
    live = server.query("SELECT token_id, user_id FROM api_tokens WHERE kind = 'pat' AND revoked_at IS NULL "
                        "ORDER BY token_id")
    for token_id, user_id in server.rng.sample(live, min(revoked, len(live))):
        with server.tx() as conn:
            conn.execute("UPDATE api_tokens SET revoked_at = ? WHERE token_id = ?", (server.clock.now(), token_id))
            server.audit(conn, "user.token_revoked", user_id, "Revoked token", data={"tokenId": token_id})
    state.report |= {"pats_created": created, "pats_revoked": min(revoked, len(live))}


def likes(server: Server, state: DayState, count: int) -> None:
    """Likes and unlikes, each refreshing packages.likes_count."""
    users = [r[0] for r in server.query("SELECT user_id FROM users WHERE is_active = 1 ORDER BY user_id")]
    packages = [r[0] for r in server.query("SELECT name FROM packages ORDER BY name")]
    liked = unliked = 0
    for index in range(count):
        now = server.clock.advance(120_000)
        existing = server.query("SELECT user_id, package_name FROM package_likes ORDER BY user_id, package_name")
        with server.tx() as conn:
            if index % 2 and existing:
                user, package = server.rng.choice(existing)
                conn.execute("DELETE FROM package_likes WHERE user_id = ? AND package_name = ?", (user, package))
                unliked += 1
            else:
                user, package = server.rng.choice(users), server.rng.choice(packages)
                conn.execute("INSERT OR IGNORE INTO package_likes VALUES (?, ?, ?)", (user, package, now))
                liked += 1
            conn.execute("UPDATE packages SET likes_count = (SELECT count(*) FROM package_likes WHERE "
                         "package_name = ?1) WHERE name = ?1", (package,))
    state.report |= {"likes": liked, "unlikes": unliked}


def settings_update(server: Server, state: DayState) -> None:
    """An admin edits the privacy policy text."""
    now = server.clock.advance(300_000)
    with server.tx() as conn:
        conn.execute("UPDATE server_settings SET value = value || ?, updated_at = ? WHERE key = 'legal.privacy_md'",
                     (f"\n\nRevised on day {state.label[1]}: {text.prose(server.rng, 200)}", now))
    state.report["settings_updated"] = "legal.privacy_md"
