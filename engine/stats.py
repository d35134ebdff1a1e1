"""Repository statistics: what is stored, and what it would cost without dedup."""

from __future__ import annotations

from typing import Any

from .repository import Repository


def repository_stats(repo: Repository) -> dict[str, Any]:
    snapshots = repo.snapshots()
    repo.sync_index()
    counts = repo.catalog.counts()
    logical = [sum(t["bytes"] for t in s.record.get("tiers", {}).values()) for s in snapshots]
    total_logical = sum(logical)
    return {
        "repository": repo.backend.location,
        "repository_id": repo.config.repo_id,
        "snapshots": len(snapshots),
        "packs": counts["packs"],
        "pack_bytes": counts["pack_bytes"],
        "chunks": counts["blobs"],
        "chunk_bytes_raw": counts["raw_bytes"],
        "chunk_bytes_stored": counts["stored_bytes"],
        "latest_snapshot_bytes": logical[-1] if logical else 0,
        "all_snapshots_bytes": total_logical,
        "dedup_ratio": round(total_logical / counts["pack_bytes"], 2) if counts["pack_bytes"] else None,
        # What the newest snapshot cost in backend requests (its record keeps them), and
        # what this command cost: request counts are the bill on S3.
        "latest_snapshot_requests": snapshots[-1].record.get("stats", {}).get("requests") if snapshots else None,
        "requests": repo.backend.snapshot(),
    }
