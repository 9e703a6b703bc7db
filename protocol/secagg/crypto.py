"""Keys, seeds and masks of secure aggregation: X25519 key agreement and HKDF for the pairwise
mask seeds and the share channel, the self-mask seed and its commitment, the AES-256-CTR mask
generator over ``Z_{2^k}``, and the AES-256-GCM encryption of a client's shares to a peer."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggError
from .ring import ring_dtype
from .shamir import SHARE_BYTES, Share

PROTOCOL = b"offsite/secagg/v1"
NONCE_BYTES = 12
SHARE_PLAINTEXT_BYTES = 16 + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + 16  # nonce + plaintext + GCM tag


def node_bytes(*nodes: int) -> bytes:
    return b"".join(struct.pack(">Q", node) for node in nodes)


def _kdf(secret: bytes, session: bytes, label: bytes) -> bytes:
    salt = hashlib.sha256(PROTOCOL + b"/salt/" + session).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=PROTOCOL + b"/" + label).derive(secret)


def _agree(private: bytes, public: bytes, what: str) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as error:  # low-order public key: all-zero shared secret
        raise SecAggError(f"{what}: key agreement failed ({error})") from None


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def pairwise_seed(private: bytes, peer_public: bytes, session: bytes, node: int, peer: int) -> bytes:
    """The mask seed of the pair ``{node, peer}``: the same from either side."""
    shared = _agree(private, peer_public, f"mask key of nodes {node} and {peer}")
    return _kdf(shared, session, b"pairwise-mask" + node_bytes(min(node, peer), max(node, peer)))


def channel_key(private: bytes, peer_public: bytes, session: bytes, node: int, peer: int) -> bytes:
    """The AES-256-GCM key that carries shares between ``node`` and ``peer``."""
    shared = _agree(private, peer_public, f"channel key of nodes {node} and {peer}")
    return _kdf(shared, session, b"share-channel" + node_bytes(min(node, peer), max(node, peer)))


def self_mask_seed(seed: bytes, session: bytes, node: int) -> bytes:
    return _kdf(seed, session, b"self-mask" + node_bytes(node))


def self_mask_commitment(seed: bytes, session: bytes, node: int) -> bytes:
    """What a client publishes about its self-mask seed ``b`` (a hash), so that the coordinator
    can check a reconstruction without learning ``b`` early."""
    return hashlib.sha256(PROTOCOL + b"/commit/" + session + node_bytes(node) + seed).digest()


_CHUNK = 1 << 22  # ring elements per keystream chunk


def apply_mask(target: np.ndarray, seed: bytes, sign: int) -> None:
    """``target += sign * PRG(seed)`` in place, mod ``2**k``: AES-256-CTR keystream (zero IV, a
    fresh key per seed) read as little-endian ring elements, chunk by chunk."""
    dtype = target.dtype
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(min(_CHUNK, target.size) * dtype.itemsize)
    for start in range(0, target.size, _CHUNK):
        stop = min(start + _CHUNK, target.size)
        stream = encryptor.update(zeros[: (stop - start) * dtype.itemsize])
        mask = np.frombuffer(stream, dtype=dtype.newbyteorder("<"))
        if sign > 0:
            np.add(target[start:stop], mask, out=target[start:stop])
        else:
            np.subtract(target[start:stop], mask, out=target[start:stop])


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``PRG(seed)``: ``length`` ring elements."""
    mask = np.zeros(length, dtype=ring_dtype(bits))
    apply_mask(mask, seed, +1)
    return mask


def _share_associated_data(session: bytes, sender: int, recipient: int) -> bytes:
    return PROTOCOL + b"/share/" + session + node_bytes(sender, recipient)


def encrypt_shares(
    key: bytes, session: bytes, sender: int, recipient: int, mask_key_share: Share, self_mask_share: Share, nonce: bytes
) -> bytes:
    plaintext = node_bytes(sender, recipient) + mask_key_share.to_bytes() + self_mask_share.to_bytes()
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _share_associated_data(session, sender, recipient))


def decrypt_shares(key: bytes, session: bytes, sender: int, recipient: int, ciphertext: bytes) -> tuple[Share, Share]:
    """``(mask-key share, self-mask share)``; a tampered or misrouted ciphertext raises
    :class:`SecAggError` naming the sender."""
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise SecAggError(f"shares from node {sender}: {len(ciphertext)} bytes, expected {CIPHERTEXT_BYTES}")
    try:
        associated_data = _share_associated_data(session, sender, recipient)
        plaintext = AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise SecAggError(
            f"shares from node {sender} to node {recipient} fail authentication "
            "(tampered, misrouted or another session)"
        ) from None
    if plaintext[:16] != node_bytes(sender, recipient):
        raise SecAggError(f"shares from node {sender}: addressed to another pair")
    return Share.from_bytes(plaintext[16 : 16 + SHARE_BYTES]), Share.from_bytes(plaintext[16 + SHARE_BYTES :])
