"""Key slots: the repository's random master key, wrapped once per password.

A slot (``keys/<slot id>``, a plain sealed object of kind 6: it must be readable before
any key is known) holds scrypt's parameters and salt, and the master key encrypted with
the key scrypt derives from the password (AES-256-GCM, random nonce, one message per
derived key). Several slots wrap the same master key, so a password is changed or
revoked by adding and removing slots, without re-encrypting any data (docs/security.md).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .backend import Backend
from .errors import EngineError, IntegrityError, UsageError, WrongPassword
from .format import KEYS_PREFIX, Kind, open_object, seal_object

MASTER_KEY_SIZE = 32
SCRYPT_R, SCRYPT_P = 8, 1
TARGET_KDF_SECONDS = 0.5
MIN_LOG2_N, MAX_LOG2_N = 10, 22  # scrypt's memory is 128 * r * n bytes: 1 MiB .. 4 GiB
WRAP_CONTEXT = b"clubsnap key slot"


@dataclass(frozen=True)
class KeySlot:
    slot_id: str
    record: dict[str, Any]

    @property
    def created(self) -> str:
        return str(self.record.get("created", ""))

    @property
    def host(self) -> str:
        return str(self.record.get("host", ""))

    @property
    def log2_n(self) -> int:
        return int(self.record["n"]).bit_length() - 1


def calibrate(target_s: float = TARGET_KDF_SECONDS) -> int:
    """log2 of scrypt's N that takes about ``target_s`` here (time doubles with N)."""
    started = time.perf_counter()
    _derive(b"calibration", os.urandom(16), 1 << 14)
    per_unit = (time.perf_counter() - started) / (1 << 14)
    return max(MIN_LOG2_N, min(MAX_LOG2_N, round(math.log2(max(target_s / max(per_unit, 1e-12), 2.0)))))


def new_master_key() -> bytes:
    return secrets.token_bytes(MASTER_KEY_SIZE)


def add_slot(backend: Backend, master_key: bytes, password: bytes, log2_n: int, host: str) -> KeySlot:
    """Wrap ``master_key`` under ``password`` in a new slot."""
    if not MIN_LOG2_N <= log2_n <= MAX_LOG2_N:
        raise UsageError(f"scrypt cost 2^{log2_n} is outside 2^{MIN_LOG2_N}..2^{MAX_LOG2_N}")
    salt = os.urandom(16)
    nonce = os.urandom(12)
    wrapped = AESGCM(_derive(password, salt, 1 << log2_n)).encrypt(nonce, master_key, WRAP_CONTEXT)
    record = {"kdf": "scrypt", "n": 1 << log2_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt,
              "nonce": nonce, "wrapped": wrapped, "host": host,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    slot = KeySlot(secrets.token_hex(8), record)
    backend.put(KEYS_PREFIX + slot.slot_id, seal_object(Kind.KEY_SLOT, record), exclusive=True)
    return slot


def list_slots(backend: Backend) -> list[KeySlot]:
    slots = []
    for key, _ in sorted(backend.list(KEYS_PREFIX)):
        record = open_object(Kind.KEY_SLOT, backend.get(key), key)
        slots.append(KeySlot(key[len(KEYS_PREFIX):], record))
    return slots


def unlock(backend: Backend, password: Callable[[], bytes], opens: Callable[[bytes], bool],
           what: str) -> tuple[bytes, KeySlot]:
    """The master key the password unwraps from a slot, and that slot; ``opens(master)``
    confirms it is this repository's by opening ``what`` (the config). ``WrongPassword`` if
    no slot opens with the password; ``IntegrityError`` if one does but ``what`` does not
    authenticate under its key. Costs one KDF run per slot tried."""
    slots = list_slots(backend)
    if not slots:
        raise IntegrityError(f"{backend.location}: the repository is encrypted but has no key slot (keys/ is empty)")
    secret = password()
    unwrapped = False
    for slot in slots:
        try:
            master = _unwrap(slot, secret)
        except InvalidTag:
            continue
        if opens(master):
            return master, slot
        unwrapped = True  # a slot left by another repository's failed init, or a damaged config
    if unwrapped:
        raise IntegrityError(f"{what}: authentication failed under the key the password unwraps (modified or damaged)")
    raise WrongPassword(f"wrong password: none of the {len(slots)} key slot(s) of {backend.location} opens with it "
                        f"(or they were damaged)")


def remove_slot(backend: Backend, slot_id: str, current: KeySlot) -> KeySlot:
    slots = list_slots(backend)
    matches = [s for s in slots if s.slot_id.startswith(slot_id)]
    if len(matches) != 1:
        raise UsageError(f"key slot {slot_id!r} {'matches no slot' if not matches else 'is ambiguous'}")
    slot = matches[0]
    if slot.slot_id == current.slot_id:
        raise UsageError("refusing to remove the key slot this password opens; open with another password "
                         "to remove it, or use 'key passwd'")
    backend.delete(KEYS_PREFIX + slot.slot_id)
    return slot


def _unwrap(slot: KeySlot, password: bytes) -> bytes:
    record = slot.record
    if record.get("kdf") != "scrypt":
        raise EngineError(f"key slot {slot.slot_id}: unknown key derivation {record.get('kdf')!r}")
    try:
        n, r, p = int(record["n"]), int(record["r"]), int(record["p"])
        salt, nonce, wrapped = bytes(record["salt"]), bytes(record["nonce"]), bytes(record["wrapped"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"key slot {slot.slot_id}: damaged ({exc})") from exc
    if not (1 << MIN_LOG2_N <= n <= 1 << MAX_LOG2_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise IntegrityError(f"key slot {slot.slot_id}: implausible scrypt parameters (n={n}, r={r}, p={p})")
    master: bytes = AESGCM(_derive(password, salt, n, r, p)).decrypt(nonce, wrapped, WRAP_CONTEXT)
    return master


def _derive(password: bytes, salt: bytes, n: int, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + (1 << 20), dklen=32)
