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
from .errors import IntegrityError, UsageError, WrongPassword
from .format import KEYS_PREFIX, Kind, open_object, seal_object

MASTER_KEY_SIZE = 32
SCRYPT_R, SCRYPT_P = 8, 1
TARGET_KDF_SECONDS = 0.5
MIN_LOG2_N, MAX_LOG2_N = 10, 19  # scrypt's memory is 128 * r * n bytes: 1 MiB .. 512 MiB at r = 8
MAX_R, MAX_P = 8, 4  # a slot asking for more is refused: a crafted one must not cost minutes
MAX_SLOTS_TRIED = 32
WRAP_CONTEXT = b"clubsnap key slot"


@dataclass(frozen=True)
class KeySlot:
    slot_id: str
    record: dict[str, Any]
    damaged: str | None = None  # why the slot cannot be used (it is listed, and removable)

    @property
    def created(self) -> str:
        return str(self.record.get("created", ""))

    @property
    def host(self) -> str:
        return str(self.record.get("host", ""))

    @property
    def log2_n(self) -> int:
        return int(self.record.get("n", 1)).bit_length() - 1


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
    """Every slot; one that cannot be read or is implausible is listed as damaged (so that
    it neither blocks the others nor escapes removal)."""
    slots = []
    for key, _ in sorted(backend.list(KEYS_PREFIX)):
        slot_id = key[len(KEYS_PREFIX):]
        try:
            record = open_object(Kind.KEY_SLOT, backend.get(key), key)
            problem = _implausible(record)
        except IntegrityError as exc:
            record, problem = {}, str(exc)
        slots.append(KeySlot(slot_id, record if isinstance(record, dict) else {}, problem))
    return slots


def _implausible(record: Any) -> str | None:
    """Why a slot record cannot be used as written by this version, or None."""
    if not isinstance(record, dict):
        return "not a key slot record"
    if record.get("kdf") != "scrypt":
        return f"unknown key derivation {record.get('kdf')!r}"
    n, r, p = record.get("n"), record.get("r"), record.get("p")
    if not all(isinstance(v, int) for v in (n, r, p)):
        return "scrypt parameters missing"
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    if not (1 << MIN_LOG2_N <= n <= 1 << MAX_LOG2_N and n & (n - 1) == 0 and 1 <= r <= MAX_R and 1 <= p <= MAX_P):
        return f"implausible scrypt parameters (n={n}, r={r}, p={p})"
    lengths = {"salt": 16, "nonce": 12, "wrapped": MASTER_KEY_SIZE + 16}
    if any(not isinstance(record.get(k), bytes) or len(record[k]) != size for k, size in lengths.items()):
        return "salt, nonce or wrapped key malformed"
    return None


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
    for slot in [s for s in slots if s.damaged is None][:MAX_SLOTS_TRIED]:
        try:
            master = _unwrap(slot, secret)
        except InvalidTag:
            continue
        if opens(master):
            return master, slot
        unwrapped = True  # a slot left by another repository's failed init, or a damaged config
    if unwrapped:
        raise IntegrityError(f"{what}: authentication failed under the key this password unwraps (modified or "
                             f"damaged; or the password opens only a slot left by a failed init)")
    damaged = sum(1 for s in slots if s.damaged)
    raise WrongPassword(f"wrong password: none of the {len(slots) - damaged} usable key slot(s) of {backend.location} "
                        f"opens with it" + (f" ({damaged} damaged slot(s): see 'key list')" if damaged else ""))


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
    """The master key; ``InvalidTag`` if the password is not this slot's (or it was
    altered). Only plausible slots (``_implausible``) come here."""
    record = slot.record
    kek = _derive(password, record["salt"], record["n"], record["r"], record["p"])
    master: bytes = AESGCM(kek).decrypt(record["nonce"], record["wrapped"], WRAP_CONTEXT)
    return master


def _derive(password: bytes, salt: bytes, n: int, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    # hashlib needs maxmem above 128 * r * n (and below 2^31).
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=min(2**31 - 1, 130 * r * n + (4 << 20)),
                          dklen=32)
