"""dartdoc output and club's indexed-blob pair (CLUB_DATA §2.3).

Page content is a function of (package, page path) only, and ~85 % of pages print the
package version in their footer. So a regeneration after a version bump changes about
85 % of the members while the ``static-assets/`` set stays byte-identical across all
packages, and a same-version rescore reproduces identical members: exactly the dedupe
situations §5 asks the engine to handle.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass

from . import media, text
from .archive import gzip_member
from .rand import lognormal_int, rng_for

# Measured (raw page bytes, gzip/raw) for single pages: small members compress worse,
# so the raw size needed for a compressed budget is read off this curve.
_GZ_CURVE = ((800, 0.60), (1800, 0.49), (3200, 0.435), (6300, 0.37), (15000, 0.31), (50000, 0.26))
PAGE_SIGMA = 0.5
VERSION_SHARE = 0.85
MAX_BLOB = 25_000_000
_STATIC = (  # (name, kind, raw bytes at scale 1): ~15 members, ~400 KB gzipped
    ("docs.dart.js", "code", 700_000), ("docs.dart.js.map", "code", 380_000),
    ("styles.css", "css", 110_000), ("highlight.pack.js", "code", 80_000),
    ("github.css", "css", 3_000), ("search.svg", "svg", 2_000), ("favicon.png", "png", 4_000),
    ("play_button.svg", "svg", 1_500), ("readme.md", "text", 2_500), ("theme.css", "css", 9_000),
    ("script.js", "code", 14_000), ("search.js", "code", 12_000), ("sidebar.js", "code", 6_000),
    ("typography.css", "css", 5_000), ("docs.dart.js.LICENSE.txt", "text", 4_000),
)


@dataclass(frozen=True)
class Member:
    """One dartdoc output file: its path, raw bytes (filesystem mode) and gzip member."""

    path: str
    raw: bytes
    gz: bytes


@functools.cache
def static_assets(scale: float) -> tuple[Member, ...]:
    """The fixed static-assets set; cached so every package reuses the same bytes."""
    members = []
    for name, kind, size in _STATIC:
        rng = rng_for("dartdoc-static", name)
        nbytes = max(200, int(size * scale))
        if kind in ("png", "svg"):
            raw = media.fake_file(rng, kind, nbytes)
        elif kind == "code":
            raw = text.dart_source(rng, nbytes).encode()
        else:
            raw = text.prose(rng, nbytes).encode()
        members.append(Member(f"static-assets/{name}", raw, gzip_member(raw)))
    return tuple(members)


def target_size(pkg: str, median: int, sigma: float, scale: float) -> int:
    """Blob size for a package: stable per package so regenerations stay comparable."""
    floor = int(sum(len(m.gz) for m in static_assets(scale)) * 1.3)
    return lognormal_int(rng_for("dartdoc-size", pkg), median, sigma, floor, MAX_BLOB)


def build_members(pkg: str, version: str, libraries: list[str], target: int, scale: float) -> list[Member]:
    """All members in ``Directory.list`` order: grouped by directory, groups shuffled."""
    static = static_assets(scale)
    budget = max(0, target - sum(len(m.gz) for m in static))
    count = min(2000, max(150, target // 9000)) - len(static)
    paths = _page_paths(pkg, libraries, count)
    per_page = _raw_for_gz(budget / len(paths)) / math.exp(PAGE_SIGMA**2 / 2)
    pages = [_page(pkg, version, path, per_page, paths) for path in paths]
    return _directory_order(pkg, [*pages, *static])


def pack_pair(pkg: str, members: list[Member], generated_ms: int) -> tuple[bytes, bytes]:
    """(blob, index.json): concatenated gzip members and the compact nested range index."""
    index: dict[str, object] = {}
    offset = 0
    for member in members:
        node = index
        *dirs, leaf = member.path.split("/")
        for part in dirs:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        node[leaf] = f"{offset}:{offset + len(member.gz)}"
        offset += len(member.gz)
    doc = {"version": 1, "blobId": f"{pkg}:latest:{generated_ms}", "index": index}
    blob = b"".join(m.gz for m in members)
    return blob, json.dumps(doc, separators=(",", ":")).encode()


def shuffled(members: list[Member], pkg: str, generated_ms: int) -> list[Member]:
    """Same members in another order: what a same-version rescore produces (§6.4 item 4)."""
    out = list(members)
    rng_for("dartdoc-shuffle", pkg, generated_ms).shuffle(out)
    return out


def _page_paths(pkg: str, libraries: list[str], count: int) -> list[str]:
    rng = rng_for("dartdoc-paths", pkg)
    libs = [lib.rsplit("/", 1)[-1].removesuffix(".dart") for lib in libraries] or [pkg]
    paths = ["index.html", "__404error.html", "search.html", "index.json", "categories.json"]
    for lib in libs:
        paths += [f"{lib}/{lib}-library.html", f"{lib}/{lib}-library-sidebar.html"]
    while len(paths) < count:
        lib, cls = rng.choice(libs), text.words(rng, 1)[0].capitalize() + rng.choice(("", "Widget", "State", "Service"))
        paths += [f"{lib}/{cls}-class.html", f"{lib}/{cls}-class-sidebar.html"]
        paths += [f"{lib}/{cls}/{w}.html" for w in text.words(rng, rng.randint(2, 12))]
    return list(dict.fromkeys(paths))[:max(count, 8)]


def _raw_for_gz(gz_bytes: float) -> float:
    """Raw page size whose gzip member is about ``gz_bytes`` (interpolated on _GZ_CURVE)."""
    lo, hi = 100.0, 1e8
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid * _gz_ratio(mid) < gz_bytes else (lo, mid)
    return lo


def _gz_ratio(raw: float) -> float:
    points = _GZ_CURVE
    if raw <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if raw <= x1:
            return y0 + (y1 - y0) * (math.log(raw / x0) / math.log(x1 / x0))
    return points[-1][1]


def _page(pkg: str, version: str, path: str, per_page: float, paths: list[str]) -> Member:
    rng = rng_for("dartdoc-page", pkg, path)
    embeds_version = rng.random() < VERSION_SHARE
    if path == "index.json":
        raw = _search_index(pkg, paths)
    elif path == "categories.json":
        raw = b"[]"
    else:
        size = lognormal_int(rng, per_page, PAGE_SIGMA, 200, int(per_page * 6) + 200)
        raw = _html(pkg, version if embeds_version else "", path, text.html_body(rng, max(0, size - 300)))
    return Member(path, raw, gzip_member(raw))


def _html(pkg: str, version: str, path: str, body: str) -> bytes:
    title = path.rsplit("/", 1)[-1].removesuffix(".html")
    footer = f'<footer><span class="no-break">{pkg} {version}</span></footer>' if version else "<footer></footer>"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="generator" content="made with love by dartdoc">\n'
            f"<title>{title} - {pkg} - Dart API docs</title>\n"
            f'<link rel="stylesheet" href="static-assets/styles.css">\n</head>\n<body>\n'
            f"{body}\n{footer}\n</body>\n</html>\n").encode()


def _search_index(pkg: str, paths: list[str]) -> bytes:
    entries = [{"name": p.rsplit("/", 1)[-1].removesuffix(".html"), "qualifiedName": f"{pkg}.{p}",
                "href": p, "kind": 3 if "-class" in p else 9, "packageRank": 0} for p in paths]
    return json.dumps(entries, separators=(",", ":")).encode()


def _directory_order(pkg: str, members: list[Member]) -> list[Member]:
    groups: dict[str, list[Member]] = {}
    for member in members:
        groups.setdefault(member.path.split("/", 1)[0] if "/" in member.path else "", []).append(member)
    keys = sorted(groups)
    random.Random(rng_for("dartdoc-order", pkg).getrandbits(64)).shuffle(keys)
    return [m for key in keys for m in groups[key]]
