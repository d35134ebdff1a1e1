"""Plain records passed between planning, building and DB writing.

They are picklable dataclasses because package builds run in worker processes: a worker
gets a ``VersionSpec`` and returns a ``VersionRecord`` without the blob bytes it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLUB_ORIGIN = "https://club.acme.dev"


@dataclass(frozen=True)
class Dep:
    """One package_version_dependencies row, also rendered into the pubspec."""

    name: str
    kind: str  # direct | dev | override
    source: str  # hosted | bare | sdk | path | git
    constraint: str | None = None
    hosted_origin: str | None = None
    is_local: bool = False
    is_ambiguous: bool = False


@dataclass(frozen=True)
class VersionSpec:
    """Everything needed to build one version's tarball, assets and text columns."""

    package: str
    version: str
    description: str
    flutter: bool
    topics: tuple[str, ...]
    libraries: tuple[str, ...]
    deps: tuple[Dep, ...]
    executables: tuple[str, ...]
    tar_bytes: int  # target compressed size of the code part
    heavy_bytes: int  # incompressible assets/ payload (asset-heavy tail), 0 for most
    shots: tuple[tuple[str, str], ...]  # (path in package, ext) per screenshot index
    asset_exts: tuple[str, ...]  # extension per readme-asset index
    has_example: bool
    image_scale: float
    seed: int


@dataclass
class Carry:
    """What a new version inherits from the previous one (bytes may be reused)."""

    shots: list[bytes] = field(default_factory=list)
    assets: list[bytes] = field(default_factory=list)
    changelog: str = ""


@dataclass
class BuiltVersion:
    """A built version: blob bytes plus the DB text derived from them."""

    tarball: bytes
    shots: list[bytes]
    assets: list[bytes]
    pubspec_json: str
    readme: str  # README as stored in the DB, asset links rewritten (§1.5)
    changelog: str
    example_path: str | None
    example_content: str | None
    screenshots_json: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ScoreRecord:
    """A finished pana job for package_scores."""

    status: str
    granted: int | None
    max_points: int | None
    report_json: str | None
    pana_tags: str | None
    error: str | None


@dataclass(frozen=True)
class VersionRecord:
    """What the DB writer needs from a worker-built version (no blob bytes)."""

    version: str
    pubspec_json: str
    readme: str
    changelog: str
    example_path: str | None
    example_content: str | None
    screenshots_json: str
    sha256: str
    size: int
    score: ScoreRecord
    blob_keys: tuple[str, ...]
