"""Issue 3's targets, evaluated on one run's results: each met or missed, with its ratio.

A target compares a clubsnap figure with a reference (a peer's figure, the physical
floor, or a fixed limit) and passes when value <= limit x reference. Without the
reference (a peer skipped) the target is "n/a", never silently met.
"""

from __future__ import annotations

from typing import Any

KIB = 1024
# "Flat" snapshot time: the fitted growth over the whole run stays within this share of
# the median snapshot time.
FLAT_SHARE = 0.2


def _row(target: str, value: float | None, reference: float | None, limit: float, unit: str) -> dict[str, Any]:
    ratio = met = None
    if value is not None and reference is not None:
        met = value <= limit * reference
        ratio = round(value / reference, 3) if reference else None
    return {"target": target, "value": value, "reference": reference, "limit": limit,
            "ratio": ratio, "met": met, "unit": unit}


def _get(result: dict[str, Any], tool: str, step: str, key: str) -> float | None:
    steps = result["tools"].get(tool, {}).get("steps", {})
    return steps[step][key] if step in steps else None


def scenario_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    def ours(step: str, key: str) -> float | None:
        return _get(result, "clubsnap", step, key)

    def restic(step: str, key: str) -> float | None:
        return _get(result, "restic", step, key)

    peers = [w for w in (restic("snapshot_1", "wall_s"), _get(result, "borg", "snapshot_1", "wall_s")) if w is not None]
    floor = result["floor"]["bytes"]
    rows = [_row("snapshot 1 wall <= 0.5x the faster peer", ours("snapshot_1", "wall_s"),
                 min(peers) if peers else None, 0.5, "s"),
            _row("snapshot 2 wall <= 0.25x restic", ours("snapshot_2", "wall_s"), restic("snapshot_2", "wall_s"),
                 0.25, "s")]
    if result["size"] == "small":
        rows.append(_row("snapshot 2 wall under 1 s", ours("snapshot_2", "wall_s"), 1.0, 1.0, "s"))
    for step in ("snapshot_3", "snapshot_4"):
        name = step.replace("_", " ")
        rows += [_row(f"{name} repo bytes <= 0.2x restic", ours(step, "repo_bytes_added"),
                      restic(step, "repo_bytes_added"), 0.2, "bytes"),
                 _row(f"{name} repo bytes <= 2x floor", ours(step, "repo_bytes_added"), floor[step], 2.0, "bytes"),
                 _row(f"{name} wall <= 0.5x restic", ours(step, "wall_s"), restic(step, "wall_s"), 0.5, "s")]
    for step, name in (("restore_latest", "restore latest"), ("restore_at", "restore by time")):
        rows.append(_row(f"{name} wall <= 0.6x restic", ours(step, "wall_s"), restic(step, "wall_s"), 0.6, "s"))
    rows.append(_row("rollback bytes read <= 1.5x bytes that differ", ours("rollback", "repo_bytes_read"),
                     floor["rollback"], 1.5, "bytes"))
    rows.append(_rss_row(result))
    return rows


def _rss_row(result: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS against restic's in every step: the worst step decides."""
    ratios = []
    for step, figures in result["tools"].get("clubsnap", {}).get("steps", {}).items():
        theirs = _get(result, "restic", step, "peak_rss_mb")
        if theirs:
            ratios.append((figures["peak_rss_mb"] / theirs, step, figures["peak_rss_mb"], theirs))
    if not ratios:
        return _row("peak RSS <= restic's in every step", None, None, 1.0, "MB")
    _, step, value, theirs = max(ratios)
    return _row(f"peak RSS <= restic's in every step (worst: {step.replace('_', ' ')})", value, theirs, 1.0, "MB")


def frequent_targets(frequent: dict[str, Any]) -> list[dict[str, Any]]:
    summary = frequent["summary"]
    count = frequent["count"]
    return [_row("per-snapshot overhead <= 64 KiB (median)", summary["overhead_bytes_median"], 64 * KIB, 1.0, "bytes"),
            _row(f"listing {frequent['listing']['snapshots_listed']} snapshots < 0.5 s",
                 frequent["listing"]["wall_s"], 0.5, 1.0, "s"),
            _row(f"snapshot time flat: growth over {count} snapshots not explained by data growth "
                 f"<= {FLAT_SHARE:.0%} of the median",
                 summary["wall_growth_over_run_s"], summary["wall_s_median"], FLAT_SHARE, "s")]
