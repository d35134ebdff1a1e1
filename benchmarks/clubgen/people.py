"""Users, publishers, tokens, invites and verifications as time-stamped rows.

These tables need no blobs, so they are planned straight into ``Timed`` rows (plus the
audit rows their events write, §1.6): web logins are the bulk of audit_log and api_tokens.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from . import media
from .profiles import Profile
from .rand import DAY_MS, EPOCH_MS, HOUR_MS, token_secret, uuid4
from .rows import Row, Timed, audit, compact

_FIRST = ("ada", "alan", "grace", "linus", "margaret", "ken", "barbara", "dennis", "frances",
          "edsger", "radia", "john", "katherine", "tim", "hedy", "bjarne", "anita", "guido")
_LAST = ("lovelace", "turing", "hopper", "torvalds", "hamilton", "thompson", "liskov", "ritchie",
         "allen", "dijkstra", "perlman", "mccarthy", "johnson", "berners", "lamarr", "stroustrup")
_AGENTS = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15",
           "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0 Safari/537.36",
           "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0")
_PLACES = (("Berlin", "Berlin", "Germany", "DE"), ("Austin", "Texas", "United States", "US"),
           ("Pune", "Maharashtra", "India", "IN"), ("Lyon", "Auvergne-Rhone-Alpes", "France", "FR"))
SCOPES = {"owner": ["read", "write", "admin"], "admin": ["read", "write", "admin"],
          "member": ["read", "write"], "viewer": ["read"]}


@dataclass(frozen=True)
class User:
    """Who exists and since when; later plans pick agents from these."""

    user_id: str
    role: str
    created_at: int
    active: bool


def plan_users(rng: random.Random, profile: Profile) -> tuple[list[User], list[Timed]]:
    """The owner first, then users joining over the first 40 % of history."""
    span = int(profile.history_days * DAY_MS * 0.4)
    times = sorted(EPOCH_MS + DAY_MS + rng.randrange(span) for _ in range(profile.users - 1))
    users, timed = [], []
    for index, created in enumerate([EPOCH_MS + HOUR_MS, *times]):
        role = "owner" if index == 0 else rng.choices(("admin", "member", "viewer"), (10, 75, 15))[0]
        user = User(uuid4(rng), role, created, index == 0 or rng.random() > 0.05)
        users.append(user)
        timed.append(Timed(created, "users", _user_row(rng, profile, user, index)))
        if index:
            timed.append(audit(rng, created, "user.created", users[0].user_id, f"Created user {index}"))
    return users, timed


def _user_row(rng: random.Random, profile: Profile, user: User, index: int) -> Row:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    avatar = media.avatar(rng, rng.randint(*profile.avatar_range)) if rng.random() < 0.5 else None
    return {"user_id": user.user_id, "email": f"{first}.{last}{index}@acme.dev",
            "password_hash": "$2b$12$" + token_secret(rng, "", 53), "display_name": f"{first.title()} {last.title()}",
            "role": user.role, "must_change_password": int(rng.random() < 0.05), "avatar": avatar,
            "has_avatar": int(avatar is not None), "is_active": int(user.active),
            "created_at": user.created_at, "updated_at": user.created_at}


def plan_invites(rng: random.Random, profile: Profile, users: list[User]) -> list[Timed]:
    """Invite links issued when admins created some of the users."""
    out = []
    for user in rng.sample(users[1:], min(profile.invites, len(users) - 1)):
        used = user.created_at + rng.randrange(1, 48) * HOUR_MS if rng.random() < 0.8 else None
        out.append(Timed(user.created_at, "user_invites", {
            "invite_id": uuid4(rng), "user_id": user.user_id, "token_hash": _hash(token_secret(rng, "inv_")),
            "expires_at": user.created_at + 7 * DAY_MS, "used_at": used,
            "created_by": users[0].user_id, "created_at": user.created_at}))
    return out


def plan_publishers(rng: random.Random, profile: Profile, users: list[User]) -> tuple[list[str], list[Timed]]:
    """Publishers early in history: verified domains (with a dot) and internal slugs."""
    ids = ["acme.dev", "mobile.acme.dev", "platform-team", "design-system", "payments.acme.dev", "data-eng",
           "identity", "growth.acme.dev", "infra-tools", "qa-guild", "labs.acme.dev", "sdk-team"][: profile.publishers]
    out: list[Timed] = []
    for pub_id in ids:
        created = EPOCH_MS + DAY_MS + rng.randrange(max(1, profile.history_days // 20)) * DAY_MS
        creator = rng.choice([u for u in users if u.role in ("owner", "admin") and u.created_at < created])
        out.append(Timed(created, "publishers", {
            "id": pub_id, "display_name": pub_id.replace("-", " ").title(), "description": f"Packages by {pub_id}",
            "website_url": f"https://{pub_id}" if "." in pub_id else None, "contact_email": f"team@{pub_id}"
            if "." in pub_id else None, "verified": int("." in pub_id), "created_by": creator.user_id,
            "created_at": created, "updated_at": created}))
        out.append(audit(rng, created, "publisher.created", creator.user_id, f"Created publisher {pub_id}",
                         publisher=pub_id))
    return ids, out + _members(rng, profile, users, ids, out)


def _members(rng: random.Random, profile: Profile, users: list[User], ids: list[str],
             created: list[Timed]) -> list[Timed]:
    since = {t.row["id"]: t.ts for t in created if t.table == "publishers"}
    pairs = {(rng.choice(ids), rng.choice(users).user_id) for _ in range(profile.publisher_members * 3)}
    out = []
    for pub_id, user_id in sorted(pairs)[: profile.publisher_members]:
        joined = max(since[pub_id], next(u.created_at for u in users if u.user_id == user_id)) + HOUR_MS
        out.append(Timed(joined, "publisher_members", {"publisher_id": pub_id, "user_id": user_id,
                                                       "role": rng.choice(("admin", "member")), "created_at": joined}))
        out.append(audit(rng, joined, "publisher.member_added", user_id, "Added publisher member", publisher=pub_id))
    return out


def plan_verifications(rng: random.Random, profile: Profile, users: list[User]) -> list[Timed]:
    """Pending DNS verifications; pruned hourly, so only recent ones exist."""
    end = profile.history_end_ms
    admins = [u for u in users if u.role in ("owner", "admin")]
    out = []
    for domain in ("labs.acme.dev", "tools.acme.dev")[: 1 + profile.publishers // 6]:
        created = end - rng.randrange(1, 6) * HOUR_MS
        out.append(Timed(created, "publisher_verifications", {
            "id": uuid4(rng), "user_id": rng.choice(admins).user_id, "domain": domain,
            "token_hash": _hash(token_secret(rng, "dns_")), "created_at": created, "expires_at": created + DAY_MS}))
    return out


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_row(rng: random.Random, user: User, kind: str, created: int, name: str, end: int) -> Row:
    """An api_tokens row in the state it reached by ``end`` (last use, maybe revoked)."""
    prefix = "club_sess_" if kind == "session" else "club_pat_"
    secret = token_secret(rng, prefix)
    last_used = created + rng.randrange(max(1, min(30 * DAY_MS, end - created)))
    revoked = min(end, last_used + rng.randrange(1, 10 * DAY_MS)) if rng.random() < 0.3 else None
    place = rng.choice(_PLACES) if kind == "session" else (None, None, None, None)
    absolute = created + 90 * DAY_MS if kind == "session" else None
    if absolute:  # sessions slide 30 days from last use, capped at 90 days from login
        expires: int | None = min(last_used + 30 * DAY_MS, absolute)
    else:
        expires = created + 365 * DAY_MS if rng.random() < 0.5 else None
    return {"token_id": uuid4(rng), "user_id": user.user_id, "kind": kind, "name": name,
            "token_hash": _hash(secret), "prefix": secret[len(prefix): len(prefix) + 4],
            "scopes": compact(SCOPES[user.role]), "expires_at": expires, "absolute_expires_at": absolute,
            "user_agent": rng.choice(_AGENTS) if kind == "session" else "dart-pub/3.5.4",
            "client_ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            "client_city": place[0], "client_region": place[1], "client_country": place[2],
            "client_country_code": place[3], "last_used_at": last_used, "revoked_at": revoked, "created_at": created}


def plan_tokens(rng: random.Random, profile: Profile, users: list[User]) -> list[Timed]:
    """PATs (a few per user plus CI tokens) and one session per web login."""
    end = profile.history_end_ms
    writers = [u for u in users if u.role != "viewer" and u.active]
    out: list[Timed] = []
    for index in range(profile.pats):
        user = rng.choice(writers)
        created = user.created_at + rng.randrange(max(1, end - user.created_at))
        name = f"CI: {rng.choice(('github-actions', 'codemagic', 'jenkins'))}" if index % 4 == 0 else f"laptop-{index}"
        out += _token_events(rng, user, "pat", created, name, end)
    weights = [rng.lognormvariate(0, 1) for _ in users]
    for _ in range(profile.sessions):
        user = rng.choices(users, weights)[0]
        created = user.created_at + rng.randrange(max(1, end - user.created_at))
        out.append(audit(rng, created, "user.login", user.user_id, "Signed in"))
        out += _token_events(rng, user, "session", created, "Web session", end)
    return out


def _token_events(rng: random.Random, user: User, kind: str, created: int, name: str, end: int) -> list[Timed]:
    row = token_row(rng, user, kind, created, name, end)
    data = {"tokenId": row["token_id"], "kind": kind}
    events = [Timed(created, "api_tokens", row),
              audit(rng, created, "user.token_created", user.user_id, f"Created {kind} token", data=data)]
    if kind == "pat" and row["revoked_at"] is not None:
        revoked = int(row["revoked_at"])  # type: ignore[call-overload]
        events.append(audit(rng, revoked, "user.token_revoked", user.user_id, "Revoked token", data=data))
    return events


def plan_settings(rng: random.Random, profile: Profile, scoring: bool) -> list[Timed]:
    """server_settings (6 or 7 keys) and sdk_installs pointing into cache/sdks."""
    at = EPOCH_MS + 2 * HOUR_MS
    values = {"scoring_enabled": "true" if scoring else "false", "default_sdk_version": "3.24.5",
              "public_packages_enabled": "true", "dependency_index_version": "1",
              "dependency_index_origin": "https://club.acme.dev",
              "legal.privacy_md": "# Privacy\n\n" + " ".join(rng.choices(_FIRST, k=300)),
              "legal.terms_md": "# Terms\n\n" + " ".join(rng.choices(_LAST, k=400))}
    out = [Timed(at, "server_settings", {"key": k, "value": v, "updated_at": at})
           for k, v in list(values.items())[: profile.settings]]
    for index, (version, dart) in enumerate((("3.24.5", "3.5.4"), ("3.22.3", "3.4.4"))[: profile.sdk_installs]):
        out.append(Timed(at + DAY_MS, "sdk_installs", sdk_row(rng, version, dart, index == 0, at + DAY_MS)))
    return out


def sdk_row(rng: random.Random, version: str, dart: str, default: bool, at: int) -> Row:
    """A ready Flutter SDK install; club marks it failed at boot if its cache/ dir is gone."""
    return {"id": uuid4(rng), "channel": "stable", "version": version, "dart_version": dart,
            "install_path": f"/data/cache/sdks/flutter-{version}", "size_bytes": 1_400_000_000 + rng.randrange(10**8),
            "status": "ready", "error_message": None, "is_default": int(default), "installed_at": at + HOUR_MS,
            "created_at": at, "updated_at": at + HOUR_MS}
