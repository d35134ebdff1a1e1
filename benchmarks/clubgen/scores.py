"""pana score reports for package_scores (5 to 40 KB of JSON, median 15 KB, §6.2)."""

from __future__ import annotations

import json
import random

from . import text
from .model import ScoreRecord
from .rand import lognormal_int

PANA_VERSION = "0.22.17"
DART_VERSION = "3.5.4"
FLUTTER_VERSION = "3.24.5"
_SECTIONS = (
    ("convention", "Follow Dart file conventions", 30), ("documentation", "Provide documentation", 20),
    ("platform", "Platform support", 20), ("analysis", "Pass static analysis", 50),
    ("dependency", "Support up-to-date dependencies", 40),
)


def score(rng: random.Random, package: str, version: str, flutter: bool, ok: bool) -> ScoreRecord:
    """A completed (or failed) pana run; points land around 110-160 of 160."""
    if not ok:
        error = f"pana exited with code 1 while analysing {package} {version}: {text.prose(rng, 160)}"
        return ScoreRecord("failed", None, None, None, None, error)
    target = lognormal_int(rng, 15_000, 0.45, 5_000, 40_000)
    scored = [_section(rng, key, title, points, target // len(_SECTIONS)) for key, title, points in _SECTIONS]
    granted = sum(points for points, _ in scored)
    sections = [section for _, section in scored]
    tags = _tags(flutter)
    report = {
        "runtimeInfo": {"panaVersion": PANA_VERSION, "sdkVersion": DART_VERSION,
                        "flutterVersions": {"frameworkVersion": FLUTTER_VERSION} if flutter else {}},
        "packageName": package, "packageVersion": version, "derivedTags": tags,
        "report": {"sections": sections}, "result": {"grantedPoints": granted, "maxPoints": 160},
    }
    return ScoreRecord("completed", granted, 160, json.dumps(report, separators=(",", ":")),
                       json.dumps(tags, separators=(",", ":")), None)


def _section(rng: random.Random, key: str, title: str, points: int, nbytes: int) -> tuple[int, dict[str, object]]:
    """(granted points, report section); most sections lose 0-10 points."""
    granted = max(0, points - rng.choice((0, 0, 0, 5, 10)))
    summary = f"### [*] {granted}/{points} points: {title}\n\n" + text.prose(rng, nbytes)
    return granted, {"id": key, "title": title, "grantedPoints": granted, "maxPoints": points,
                     "status": "passed" if granted == points else "partial", "summary": summary}


def _tags(flutter: bool) -> list[str]:
    tags = ["sdk:dart", "platform:android", "platform:ios", "platform:linux", "platform:macos",
            "platform:windows", "is:null-safe", "is:dart3-compatible", "license:mit"]
    return ["sdk:flutter", *tags] if flutter else [*tags, "platform:web"]
