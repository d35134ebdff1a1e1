"""clubgen: deterministic synthetic club data directories (CLUB_DATA §6).

- ``generate(root, size, seed)`` builds a data dir: db/club.db (schema v3, WAL) and blobs/
  (tarballs, screenshots, readme-assets, dartdoc pairs) plus logs/, cache/ and tmp/.
- ``one_day(root, seed, day)`` applies a day of activity and leaves a non-empty -wal.
- ``LiveWriter(root)`` is a concurrent club-like writer process for snapshot tests.
"""

from .dataset import generate
from .day import one_day
from .profiles import PROFILES
from .writer import LiveWriter

__all__ = ["LiveWriter", "PROFILES", "generate", "one_day"]
