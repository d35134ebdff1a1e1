"""Authenticated encryption of objects and blobs, and keyed chunk ids (docs/security.md).

Every encrypted message gets its own key: ``subkey = blake3(salt, key=data_key)`` for a
random 192-bit ``salt`` stored in front of it, then AES-256-GCM under that subkey with a
fixed nonce. No nonce is ever chosen, counted or shared, so concurrent writers on any
number of hosts cannot repeat one (a repeat would need two equal random salts: 2^-96 after
2^48 messages). The associated data binds what a message is (an object's header, a blob's
flags and id), so a blob or object cannot be passed off as another.

Chunk ids of an encrypted repository are keyed (``blake3(data, key=id_key)``): the ids,
which index objects and trees list, do not reveal whether a known file is stored.
"""

from __future__ import annotations

import os

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import IntegrityError

SALT_SIZE = 24
TAG_SIZE = 16
OVERHEAD = SALT_SIZE + TAG_SIZE
NONCE = bytes(12)  # every subkey encrypts exactly one message
DATA_KEY_CONTEXT = "clubsnap 2026-11-26 object encryption key"
ID_KEY_CONTEXT = "clubsnap 2026-11-26 chunk id key"
SCHEME = "aes-256-gcm"


class Cipher:
    """Plain (no key) or keyed: how a repository's objects are sealed and chunks named."""

    def __init__(self, master_key: bytes | None = None) -> None:
        self.master_key = master_key
        if master_key is None:
            self._data_key = self._id_key = None
        else:
            self._data_key = blake3.blake3(master_key, derive_key_context=DATA_KEY_CONTEXT).digest()
            self._id_key = blake3.blake3(master_key, derive_key_context=ID_KEY_CONTEXT).digest()

    @property
    def encrypted(self) -> bool:
        return self._data_key is not None

    def chunk_id(self, raw: bytes | bytearray | memoryview) -> bytes:
        if self._id_key is None:
            return blake3.blake3(raw).digest()
        return blake3.blake3(raw, key=self._id_key).digest()

    def encrypt(self, plaintext: bytes | bytearray | memoryview, associated: bytes) -> bytes:
        assert self._data_key is not None, "encrypt needs a key"
        salt = os.urandom(SALT_SIZE)
        return salt + AESGCM(self._subkey(salt)).encrypt(NONCE, bytes(plaintext), associated)

    def decrypt(self, message: bytes | memoryview, associated: bytes, what: str) -> bytes:
        """The plaintext, or ``IntegrityError`` naming ``what`` if anything was changed."""
        if self._data_key is None:
            raise IntegrityError(f"{what}: encrypted, but the repository was opened without a key")
        message = memoryview(message)
        if len(message) < OVERHEAD:
            raise IntegrityError(f"{what}: truncated encrypted data")
        salt = bytes(message[:SALT_SIZE])
        try:
            return AESGCM(self._subkey(salt)).decrypt(NONCE, bytes(message[SALT_SIZE:]), associated)
        except InvalidTag as exc:
            raise IntegrityError(f"{what}: authentication failed (modified or damaged)") from exc

    def _subkey(self, salt: bytes) -> bytes:
        assert self._data_key is not None
        return blake3.blake3(salt, key=self._data_key).digest()


PLAIN = Cipher()
