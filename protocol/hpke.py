"""HPKE (RFC 9180), base mode, one ciphersuite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM.

Built from ``cryptography``'s primitives (X25519, HMAC-SHA256, AES-GCM) because its own HPKE
(``cryptography.hazmat.primitives.hpke``, new in 46) only offers single-shot encryption without
associated data, and we need both: the envelope header is every message's associated data, and a
large update is sealed as a sequence of messages under one context (RFC 9180 section 5.2, the
nonce is ``base_nonce XOR seq``), so that no AEAD call exceeds AES-GCM's per-call limits and a
chunk cannot be moved. ``tests/protocol/test_envelope.py`` checks this module against
``cryptography``'s HPKE where that is installed (same suite, empty associated data).

Identifiers (RFC 9180 section 7): KEM 0x0020, KDF 0x0001, AEAD 0x0002.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0002
SUITE_NAME = "HPKE-base(DHKEM-X25519-HKDF-SHA256,HKDF-SHA256,AES-256-GCM)"
N_ENC = 32  # bytes of an encapsulated key (an X25519 public key)
N_SECRET = N_H = 32
N_K, N_N, N_T = 32, 12, 16  # AES-256-GCM key, nonce and tag bytes
MODE_BASE = 0x00
_KEM_SUITE = b"KEM" + KEM_ID.to_bytes(2, "big")
_HPKE_SUITE = b"HPKE" + KEM_ID.to_bytes(2, "big") + KDF_ID.to_bytes(2, "big") + AEAD_ID.to_bytes(2, "big")
_VERSION = b"HPKE-v1"


class HPKEError(ValueError):
    """Decapsulation or decryption failed (wrong key, tampered bytes, low-order point)."""


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()  # an empty salt is HashLen zero bytes under HMAC


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, _VERSION + suite + label + ikm)


def _labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, length.to_bytes(2, "big") + _VERSION + suite + label + info, length)


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _shared_secret(dh: bytes, enc: bytes, recipient_public: bytes) -> bytes:
    eae_prk = _labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE, eae_prk, b"shared_secret", enc + recipient_public, N_SECRET)


@dataclass
class Context:
    """An HPKE encryption context (RFC 9180 section 5.2): seal or open messages in order."""

    key: bytes = field(repr=False)
    base_nonce: bytes = field(repr=False)
    exporter_secret: bytes = field(repr=False)
    seq: int = 0

    def _nonce(self) -> bytes:
        if self.seq >= (1 << 8 * N_N) - 1:
            raise HPKEError("HPKE message limit reached")
        return bytes(a ^ b for a, b in zip(self.base_nonce, self.seq.to_bytes(N_N, "big")))

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        ciphertext = AESGCM(self.key).encrypt(self._nonce(), plaintext, aad)
        self.seq += 1
        return ciphertext

    def seal_into(self, aad: bytes, plaintext, out: memoryview) -> None:
        """:meth:`seal` writing the ``len(plaintext) + 16`` bytes into ``out`` (no intermediate copy)."""
        if len(out) != len(plaintext) + N_T:
            raise ValueError(f"output buffer is {len(out)} bytes, need {len(plaintext) + N_T}")
        cipher = AESGCM(self.key)
        if hasattr(cipher, "encrypt_into"):  # cryptography >= 45
            cipher.encrypt_into(self._nonce(), plaintext, aad, out)
        else:
            out[:] = cipher.encrypt(self._nonce(), bytes(plaintext), aad)
        self.seq += 1

    def open(self, aad: bytes, ciphertext: bytes) -> bytes:
        try:
            plaintext = AESGCM(self.key).decrypt(self._nonce(), ciphertext, aad)
        except InvalidTag:
            raise HPKEError(f"message {self.seq}: authentication tag does not verify") from None
        self.seq += 1
        return plaintext

    def open_into(self, aad: bytes, ciphertext, out: memoryview) -> None:
        """:meth:`open` writing the ``len(ciphertext) - 16`` plaintext bytes into ``out``."""
        if len(out) != len(ciphertext) - N_T:
            raise HPKEError(f"message {self.seq}: {len(ciphertext)} bytes cannot hold a {len(out)}-byte plaintext")
        cipher = AESGCM(self.key)
        try:
            if hasattr(cipher, "decrypt_into"):
                cipher.decrypt_into(self._nonce(), ciphertext, aad, out)
            else:
                out[:] = cipher.decrypt(self._nonce(), bytes(ciphertext), aad)
        except InvalidTag:
            raise HPKEError(f"message {self.seq}: authentication tag does not verify") from None
        self.seq += 1

    def export(self, exporter_context: bytes, length: int) -> bytes:
        """A secret both sides derive (RFC 9180 section 5.3)."""
        return _labeled_expand(_HPKE_SUITE, self.exporter_secret, b"sec", exporter_context, length)


def _key_schedule(shared_secret: bytes, info: bytes) -> Context:
    psk_id_hash = _labeled_extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE, b"", b"info_hash", info)
    context = bytes([MODE_BASE]) + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE, shared_secret, b"secret", b"")
    return Context(
        key=_labeled_expand(_HPKE_SUITE, secret, b"key", context, N_K),
        base_nonce=_labeled_expand(_HPKE_SUITE, secret, b"base_nonce", context, N_N),
        exporter_secret=_labeled_expand(_HPKE_SUITE, secret, b"exp", context, N_H),
    )


def setup_base_sender(
    recipient: X25519PublicKey, info: bytes, ephemeral: X25519PrivateKey | None = None
) -> tuple[bytes, Context]:
    """``(enc, context)`` for sealing to ``recipient`` (SetupBaseS); ``ephemeral`` only for test vectors."""
    ephemeral = ephemeral or X25519PrivateKey.generate()
    enc = _raw(ephemeral.public_key())
    recipient_public = _raw(recipient)
    try:
        dh = ephemeral.exchange(recipient)
    except ValueError:
        raise HPKEError("the recipient's public key is a low-order point") from None
    return enc, _key_schedule(_shared_secret(dh, enc, recipient_public), info)


def setup_base_recipient(enc: bytes, recipient: X25519PrivateKey, info: bytes) -> Context:
    """The context for opening what was sealed to ``recipient`` with encapsulated key ``enc`` (SetupBaseR)."""
    if len(enc) != N_ENC:
        raise HPKEError(f"encapsulated key is {len(enc)} bytes, expected {N_ENC}")
    try:
        dh = recipient.exchange(X25519PublicKey.from_public_bytes(enc))
    except ValueError:
        raise HPKEError("the encapsulated key is not a usable X25519 point") from None
    return _key_schedule(_shared_secret(dh, enc, _raw(recipient.public_key())), info)
