"""Screenshot, README-asset and avatar bytes.

Real images are already compressed, so their bodies are random bytes: that keeps them
incompressible (as real PNG/WebP/GIF data is) and cheap to make. Each file still starts
with a correct signature and container header, so ``file``-style sniffing and any mime
check in the engine see a plausible image.
"""

from __future__ import annotations

import base64
import random
import struct
import zlib

from . import text
from .rand import lognormal_int

MIB = 1 << 20
SCREENSHOT_MIMES = {"png": "image/png", "webp": "image/webp", "jpg": "image/jpeg", "gif": "image/gif"}
SCREENSHOT_MIX = (("png", 55), ("webp", 30), ("jpg", 10), ("gif", 5))
ASSET_MIX = (("png", 50), ("gif", 30), ("svg", 10), ("jpg", 5), ("mp4", 3), ("pdf", 2))
# (median, sigma, lo, hi) in bytes, from CLUB_DATA §2.4; clipped at club's 4 MiB limit.
_SCREENSHOT_SIZES = {
    "png": (350_000, 0.6, 150_000, 1_500_000),
    "webp": (90_000, 0.6, 20_000, 600_000),
    "jpg": (150_000, 0.6, 40_000, 900_000),
    "gif": (1_200_000, 0.6, 500_000, 4 * MIB),
}


def pick(rng: random.Random, mix: tuple[tuple[str, int], ...]) -> str:
    """A weighted choice from a (value, percent) table."""
    values, weights = zip(*mix)
    return str(rng.choices(values, weights=weights)[0])


def screenshot_size(rng: random.Random, ext: str, scale: float) -> int:
    """Size for one screenshot of a format, scaled down for the tiny profile."""
    median, sigma, lo, hi = _SCREENSHOT_SIZES[ext]
    return max(256, int(lognormal_int(rng, median, sigma, lo, hi) * scale))


def asset_size(rng: random.Random, scale: float) -> int:
    """README assets run 20 KB to 3 MB (§2.4), GIF demos pulling the mean up."""
    return max(256, int(lognormal_int(rng, 70_000, 0.9, 20_000, 3_000_000) * scale))


def fake_file(rng: random.Random, ext: str, size: int) -> bytes:
    """About ``size`` bytes that look like a file of type ``ext``."""
    maker = _MAKERS.get(ext, _binary)
    return maker(rng, size)


def _png(rng: random.Random, size: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    width, height = rng.choice(((1080, 1920), (1170, 2532), (1440, 900), (800, 600)))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
    body = rng.randbytes(max(0, size - 57))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _webp(rng: random.Random, size: int) -> bytes:
    body = rng.randbytes(max(0, size - 20))
    return b"RIFF" + struct.pack("<I", len(body) + 12) + b"WEBPVP8 " + struct.pack("<I", len(body)) + body


def _jpg(rng: random.Random, size: int) -> bytes:
    head = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    return head + rng.randbytes(max(0, size - len(head) - 2)) + b"\xff\xd9"


def _gif(rng: random.Random, size: int) -> bytes:
    head = b"GIF89a" + struct.pack("<HHBBB", 480, 270, 0xF7, 0, 0)
    return head + rng.randbytes(max(0, size - len(head) - 1)) + b";"


def _svg(rng: random.Random, size: int) -> bytes:
    raw = rng.randbytes(max(2, size // 4))  # one byte per coordinate: fast and still varied
    points = " ".join(f"L{x} {y}" for x, y in zip(raw[::2], raw[1::2]))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 1000 1000">'
            f'<path d="M0 0 {points}"/><desc>{text.prose(rng, 200)}</desc></svg>\n').encode()


def _mp4(rng: random.Random, size: int) -> bytes:
    ftyp = struct.pack(">I", 24) + b"ftypisom\x00\x00\x02\x00isomiso2"
    body = rng.randbytes(max(0, size - 32))
    return ftyp + struct.pack(">I", len(body) + 8) + b"mdat" + body


def _pdf(rng: random.Random, size: int) -> bytes:
    body = rng.randbytes(max(0, size - 64))
    head = b"%PDF-1.7\n1 0 obj\n<< /Length " + str(len(body)).encode() + b" >>\nstream\n"
    return head + body + b"\nendstream\n%%EOF\n"


def _binary(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


_MAKERS = {"png": _png, "webp": _webp, "jpg": _jpg, "jpeg": _jpg, "gif": _gif, "svg": _svg,
           "mp4": _mp4, "pdf": _pdf}


def avatar(rng: random.Random, text_bytes: int) -> str:
    """Base64 PNG text of about ``text_bytes`` (users.avatar is stored inline)."""
    return base64.b64encode(_png(rng, text_bytes * 3 // 4)).decode()
