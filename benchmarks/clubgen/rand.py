"""Deterministic randomness and simulated time.

Every random choice flows from a ``random.Random`` seeded from a tuple of labels, so a
(size, seed) pair always produces the same bytes, whichever process or order builds a
given package. Wall-clock time and ``os.urandom`` are never used here: either would make
two runs differ and break the byte-identical guarantee the benchmarks rely on.
"""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from datetime import datetime, timezone

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z, the first instant of generated history
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from labels; sha256 so it is stable across runs (unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rng_for(*parts: object) -> random.Random:
    """An independent stream per labelled item, so items can be built in any order."""
    return random.Random(derive_seed(*parts))


def uuid4(rng: random.Random) -> str:
    """A well-formed UUID v4 (club's id format) drawn from ``rng`` instead of urandom."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """Lognormal draw clipped to [lo, hi]; CLUB_DATA §6.3 states sizes as median and sigma."""
    value = median * math.exp(rng.gauss(0.0, sigma))
    return int(min(max(value, lo), hi))


def log_uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform in log space: tail ranges like "2 to 8 MB" should favour the low end."""
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def zipf_weights(count: int, exponent: float = 1.1) -> list[float]:
    """Rank weights for download popularity (§6.3 says Zipf over packages)."""
    return [1.0 / (rank**exponent) for rank in range(1, count + 1)]


def date_utc(ms: int) -> str:
    """club's download-count day key: ``YYYY-MM-DD`` in UTC."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


def iso_utc(ms: int) -> str:
    """ISO-8601 with milliseconds, as Dart's ``toIso8601String`` writes UTC times."""
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256, the form club stores in ``archive_sha256`` and screenshot JSON."""
    return hashlib.sha256(data).hexdigest()


def token_secret(rng: random.Random, prefix: str, length: int = 40) -> str:
    """A raw token secret such as ``club_pat_...``; only its hash is ever stored."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return prefix + "".join(rng.choices(alphabet, k=length))
