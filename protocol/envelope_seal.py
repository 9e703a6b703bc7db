"""Update envelopes, the client side: an update sealed to the coordinator's X25519 key (HPKE,
chunk by chunk, written in place into the final frame) and signed with the owner's Ed25519 key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from . import hpke
from .envelope_frame import (
    DEFAULT_CHUNK_BYTES,
    DIGEST_CONTEXT,
    HPKE_INFO,
    MAGIC,
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    MAX_ROUND,
    MIN_CHUNK_BYTES,
    PREFIX_BYTES,
    SIGNATURE_BYTES,
    EnvelopeHeader,
    SealError,
    signed_message,
)
from .envelope_payload import encode_payload
from .ids import JOB_ID
from .keys import ClientIdentity, CoordinatorPublicKeys, fingerprint


def seal_payload(
    plaintext: bytes,
    *,
    job: str,
    round: int,
    identity: ClientIdentity,
    recipient: CoordinatorPublicKeys | X25519PublicKey,
    clock: Callable[[], float] = time.time,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    message_id: str | None = None,
) -> bytearray:
    """Seal and sign raw payload bytes (normally safetensors bytes: use :func:`seal_update`).

    Returns the envelope as a ``bytearray`` (written in place, never copied; any bytes-like
    works for :meth:`UpdateOpener.open`, and ``numpy.frombuffer`` wraps it without a copy)."""
    recipient_key = _recipient_key(recipient)
    _check_seal_arguments(job, round, chunk_bytes)
    enc, context = hpke.setup_base_sender(recipient_key, HPKE_INFO)
    digest = hmac.new(context.export(DIGEST_CONTEXT, 32), plaintext, hashlib.sha256).hexdigest()
    header = EnvelopeHeader(
        job=job,
        round=round,
        sender=identity.sender_id,
        recipient=fingerprint(recipient_key),
        message_id=message_id or secrets.token_hex(16),
        timestamp_ms=int(clock() * 1000),
        enc=base64.b64encode(enc).decode(),
        plaintext_bytes=len(plaintext),
        chunk_bytes=chunk_bytes,
        payload_digest=digest,
    )
    header_bytes = header.to_bytes()
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise SealError(f"header is {len(header_bytes)} bytes, over {MAX_HEADER_BYTES}")
    return _write_frame(header, header_bytes, plaintext, context, identity.signing_key)


def _recipient_key(recipient: CoordinatorPublicKeys | X25519PublicKey) -> X25519PublicKey:
    """The coordinator's X25519 public key, or :class:`SealError`."""
    recipient_key = recipient.encryption_key if isinstance(recipient, CoordinatorPublicKeys) else recipient
    if not isinstance(recipient_key, X25519PublicKey):
        raise SealError(f"recipient must be the coordinator's X25519 public key, got {type(recipient_key).__name__}")
    return recipient_key


def _check_seal_arguments(job: str, round: int, chunk_bytes: int) -> None:
    """:class:`SealError` for a job id, round or chunk size that no coordinator would accept."""
    if not isinstance(job, str) or not JOB_ID.match(job):
        raise SealError(f"job id {job!r}: use 1-128 of A-Z a-z 0-9 . _ : - (starting with a letter or digit)")
    if isinstance(round, bool) or not isinstance(round, int) or not 1 <= round <= MAX_ROUND:
        raise SealError(f"round {round!r} is not an integer in 1..{MAX_ROUND}")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise SealError(f"chunk_bytes {chunk_bytes} is not in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")


def _write_frame(
    header: EnvelopeHeader,
    header_bytes: bytes,
    plaintext: bytes,
    context: hpke.Context,
    signing_key: Ed25519PrivateKey,
) -> bytearray:
    """The frame, written in place: one buffer of the final size, no copy of the ciphertext."""
    start = PREFIX_BYTES + len(header_bytes)
    out = bytearray(start + header.ciphertext_bytes + SIGNATURE_BYTES)
    out[:start] = MAGIC + len(header_bytes).to_bytes(4, "big") + header_bytes
    source, target = memoryview(plaintext), memoryview(out)
    hasher = hashlib.sha256()
    position = start
    for offset in range(0, max(len(plaintext), 1), header.chunk_bytes):
        piece = source[offset : offset + header.chunk_bytes]
        sealed = target[position : position + len(piece) + hpke.N_T]
        context.seal_into(header_bytes, piece, sealed)
        hasher.update(sealed)
        position += len(sealed)
    target[position:] = signing_key.sign(signed_message(header_bytes, None, hasher.digest()))
    return out


def seal_update(
    tensors: Mapping[str, torch.Tensor],
    *,
    job: str,
    round: int,
    identity: ClientIdentity,
    recipient: CoordinatorPublicKeys | X25519PublicKey,
    metadata: Mapping | None = None,
    clock: Callable[[], float] = time.time,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> bytearray:
    """The envelope for ``tensors`` (name -> tensor, any device) from ``identity`` to the coordinator.

    ``metadata``: a small JSON object (e.g. ``{"num-examples": 120, "train-loss": 1.9}``) that
    travels encrypted and signed with the tensors; :attr:`OpenedUpdate.metadata` returns it.
    """
    return seal_payload(
        encode_payload(tensors, metadata),
        job=job,
        round=round,
        identity=identity,
        recipient=recipient,
        clock=clock,
        chunk_bytes=chunk_bytes,
    )
