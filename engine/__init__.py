"""clubsnap: incremental, deduplicating snapshots of a club data directory.

The Python API that the ``clubsnap`` command is a thin layer over.
"""

from .backend import Backend, open_backend
from .chunker import ChunkerParams
from .diff import diff_trees
from .errors import EngineError
from .forget import StoredPolicy, load_policy, plan_forget, remove_snapshots, save_policy
from .prune import PruneOptions, PruneReport, prune
from .repository import Repository, SnapshotFilter, SnapshotInfo
from .restore import apply_restore, plan_restore
from .retention import Candidate, Duration, Policy, apply_policy
from .snapshot import SnapshotOptions, create_snapshot
from .stats import repository_stats
from .timespec import parse_time
from .verify import check

__all__ = [
    "Backend",
    "Candidate",
    "ChunkerParams",
    "Duration",
    "EngineError",
    "Policy",
    "PruneOptions",
    "PruneReport",
    "Repository",
    "SnapshotFilter",
    "SnapshotInfo",
    "SnapshotOptions",
    "StoredPolicy",
    "apply_policy",
    "apply_restore",
    "check",
    "create_snapshot",
    "diff_trees",
    "load_policy",
    "open_backend",
    "parse_time",
    "plan_forget",
    "plan_restore",
    "prune",
    "remove_snapshots",
    "repository_stats",
    "save_policy",
]
