"""clubgen: deterministic synthetic club data directories (CLUB_DATA §6).

- ``generate(root, size, seed)`` builds a data dir: db/club.db (schema v3, WAL) and blobs/
  (tarballs, screenshots, readme-assets, dartdoc pairs) plus logs/, cache/ and tmp/.
- ``one_day(root, seed, day)`` applies a day of activity and leaves a non-empty -wal.
- ``LiveWriter(root)`` is a concurrent club-like writer process for snapshot tests.
- ``ChurnWriter(root, order)`` publishes and deletes versions about 50 and 15 times a
  second, in club's order or the reverse one, for consistent-cut tests.
"""

from .churn import ChurnWriter
from .dataset import generate
from .day import one_day
from .profiles import PROFILES
from .writer import LiveWriter

__all__ = ["ChurnWriter", "LiveWriter", "PROFILES", "generate", "one_day"]
