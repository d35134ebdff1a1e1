"""Instance sizes (CLUB_DATA §6.3, §6.4) and the metadata one_day needs later.

A profile is plain data: every count and distribution parameter the generator uses lives
here, so scaling a size up or down never means touching the builders.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from .rand import DAY_MS, EPOCH_MS

META_PATH = Path("cache") / "clubgen.json"
DARTDOC_MODES = ("blob", "filesystem", "none")
MB = 1_000_000


@dataclass(frozen=True)
class DayProfile:
    """Volumes for one day of activity (§6.4); other events happen once a day."""

    publishes: int
    publish_packages: int
    new_packages: int
    downloads: int
    download_rows: int
    logins: int
    token_touches: int
    pats_created: int
    pats_revoked: int
    likes: int


@dataclass(frozen=True)
class Profile:
    """Row counts, blob distributions and history length of one instance size."""

    name: str
    history_days: int
    users: int
    pats: int
    sessions: int
    publishers: int
    publisher_members: int
    invites: int
    packages: int
    versions: int
    versions_median: float
    versions_max: int
    long_tail: int  # packages forced past 100 versions (2 % of medium, §6.3)
    uploaders: int
    likes: int
    download_rows: int
    settings: int
    sdk_installs: int
    tar_median: int
    tar_sigma: float
    heavy_packages: int
    heavy_versions: int
    heavy_range: tuple[int, int]
    outlier_range: tuple[int, int] | None
    screenshot_packages: int
    image_scale: float
    readme_asset_share: float
    dartdoc_median: int
    dartdoc_sigma: float
    static_scale: float
    avatar_range: tuple[int, int]
    sdk_cache_bytes: int
    workers: int
    day: DayProfile

    @property
    def history_end_ms(self) -> int:
        """Simulated "now" at the end of generate; day N of activity follows it."""
        return EPOCH_MS + self.history_days * DAY_MS


TINY = Profile(
    name="tiny", history_days=60, users=6, pats=8, sessions=40, publishers=1,
    publisher_members=3, invites=2, packages=8, versions=40, versions_median=4,
    versions_max=12, long_tail=0, uploaders=10, likes=10, download_rows=600, settings=6,
    sdk_installs=1, tar_median=14_000, tar_sigma=0.9, heavy_packages=1, heavy_versions=1,
    heavy_range=(1 * MB, 2 * MB), outlier_range=None, screenshot_packages=1,
    image_scale=0.12, readme_asset_share=0.1, dartdoc_median=110_000, dartdoc_sigma=0.4,
    static_scale=0.12, avatar_range=(20_000, 60_000), sdk_cache_bytes=200_000, workers=1,
    day=DayProfile(3, 2, 1, 120, 25, 2, 10, 1, 1, 2),
)

SMALL = Profile(
    name="small", history_days=365, users=25, pats=60, sessions=1500, publishers=3,
    publisher_members=12, invites=5, packages=50, versions=500, versions_median=6,
    versions_max=60, long_tail=0, uploaders=70, likes=120, download_rows=22_000, settings=6,
    sdk_installs=1, tar_median=45_000, tar_sigma=1.3, heavy_packages=3, heavy_versions=5,
    heavy_range=(2 * MB, 5 * MB), outlier_range=None, screenshot_packages=5,
    image_scale=0.6, readme_asset_share=0.1, dartdoc_median=800_000, dartdoc_sigma=0.8,
    static_scale=1.0, avatar_range=(20_000, 400_000), sdk_cache_bytes=4 * MB, workers=2,
    day=DayProfile(3, 2, 1, 430, 85, 3, 30, 1, 1, 2),
)

MEDIUM = Profile(
    name="medium", history_days=730, users=250, pats=400, sessions=20_000, publishers=12,
    publisher_members=120, invites=30, packages=350, versions=5000, versions_median=8,
    versions_max=250, long_tail=7, uploaders=500, likes=1500, download_rows=360_000,
    settings=7, sdk_installs=2, tar_median=45_000, tar_sigma=1.3, heavy_packages=10,
    heavy_versions=4, heavy_range=(3 * MB, 20 * MB), outlier_range=(60 * MB, 95 * MB),
    screenshot_packages=40, image_scale=0.6, readme_asset_share=0.1,
    dartdoc_median=1_200_000, dartdoc_sigma=0.8, static_scale=1.0,
    avatar_range=(20_000, 400_000), sdk_cache_bytes=16 * MB, workers=2,
    day=DayProfile(15, 10, 2, 3000, 600, 20, 200, 2, 1, 5),
)

PROFILES = {p.name: p for p in (TINY, SMALL, MEDIUM)}


@dataclass(frozen=True)
class Meta:
    """What generate chose and one_day must repeat (kept in cache/, not db/ or blobs/)."""

    size: str
    seed: int
    dartdoc_mode: str = "blob"
    scoring_enabled: bool = True
    sidecars: bool = False

    @property
    def profile(self) -> Profile:
        """The size's profile (volumes for the data dir and for each day)."""
        return PROFILES[self.size]


def profile_for(size: str) -> Profile:
    """Look a size up, naming the valid ones when it is wrong."""
    if size not in PROFILES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(PROFILES)}")
    return PROFILES[size]


def save_meta(root: Path, meta: Meta) -> None:
    """Record the generate choices under cache/ (regenerable tier, never backed up)."""
    path = root / META_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"generator": "clubgen", **asdict(meta)}, indent=1) + "\n")


def load_meta(root: Path) -> Meta:
    """Read the generate choices; infer them when cache/ was not restored with the rest."""
    path = root / META_PATH
    if path.exists():
        raw = json.loads(path.read_text())
        raw.pop("generator", None)
        return Meta(**raw)
    return _infer_meta(root)


def _infer_meta(root: Path) -> Meta:
    """A restored tree has no cache/, so guess the size from the package count."""
    conn = sqlite3.connect(root / "db" / "club.db")
    try:
        packages = conn.execute("SELECT count(*) FROM packages").fetchone()[0]
        scored = conn.execute("SELECT count(*) FROM dartdoc_status").fetchone()[0]
    finally:
        conn.close()
    size = min(PROFILES.values(), key=lambda p: abs(p.packages - packages)).name
    has_blob_docs = any((root / "blobs").glob("*/dartdoc/latest/index.json"))
    mode = "blob" if has_blob_docs else ("filesystem" if (root / "cache" / "dartdoc").exists() else "none")
    sidecars = any((root / "blobs").glob("*/*/artifacts/package.json"))
    return Meta(size=size, seed=0, dartdoc_mode=mode, scoring_enabled=scored > 0, sidecars=sidecars)
