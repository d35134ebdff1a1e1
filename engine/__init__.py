"""clubsnap: incremental, deduplicating snapshots of a club data directory.

The Python API that the ``clubsnap`` command is a thin layer over.
"""

from .backend import Backend, open_backend
from .chunker import ChunkerParams
from .diff import diff_trees
from .errors import EngineError
from .repository import Repository, SnapshotInfo
from .restore import apply_restore, plan_restore
from .snapshot import SnapshotOptions, create_snapshot
from .stats import repository_stats
from .timespec import parse_time
from .verify import check

__all__ = [
    "Backend",
    "ChunkerParams",
    "EngineError",
    "Repository",
    "SnapshotInfo",
    "SnapshotOptions",
    "apply_restore",
    "check",
    "create_snapshot",
    "diff_trees",
    "open_backend",
    "parse_time",
    "plan_restore",
    "repository_stats",
]
