"""Update envelopes: a data owner's update, sealed to the coordinator (RFC 9180 HPKE) and signed by
the owner (Ed25519), so that only the coordinator reads it and accepts it only from an enrolled,
unrevoked sender, for this job and round, once.

The client calls :func:`seal_update`; the coordinator holds an :class:`UpdateOpener`, whose
:meth:`~UpdateOpener.open` returns the tensors or raises :class:`Rejected` with a :class:`Reason`
and a message naming the client, so a refused update never reaches the aggregate. The buffer
handed to :meth:`~UpdateOpener.open` is read in place: it must not change while it runs.
Construction, header, wire format, the order of the checks and the threat model are in
``docs/security.md`` ("Update envelopes").

This module is the public face; the code lives in :mod:`~offsite.protocol.envelope_frame` (format,
header, frame), :mod:`~offsite.protocol.envelope_payload` (safetensors payload),
:mod:`~offsite.protocol.envelope_seal` (client side) and :mod:`~offsite.protocol.envelope_opener`
(coordinator side, replay cache).
"""

from .envelope_frame import (
    DEFAULT_CHUNK_BYTES,
    DIGEST_CONTEXT,
    FORMAT,
    HEX_DIGEST,
    HPKE_INFO,
    MAGIC,
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    MAX_ROUND,
    MAX_TIMESTAMP_MS,
    MESSAGE_ID,
    MIN_CHUNK_BYTES,
    PREFIX_BYTES,
    RECIPIENT,
    SIGNATURE_BYTES,
    SIGNATURE_CONTEXT,
    SUITE,
    Envelope,
    EnvelopeHeader,
    Reason,
    Rejected,
    SealError,
    canonical_json,
    chunk_count,
    ciphertext_length,
    frame,
    max_envelope_bytes,
    parse_envelope,
    signed_message,
    strict_json_loads,
)
from .envelope_opener import (
    OpenedUpdate,
    ReplayCache,
    UpdateOpener,
    UpdatePolicy,
    log,
    tensor_norms,
    update_norm,
)
from .envelope_payload import (
    MAX_META_BYTES,
    MAX_SAFETENSORS_HEADER_BYTES,
    META_KEY,
    SAFETENSORS_DTYPES,
    encode_payload,
    read_safetensors_index,
)
from .envelope_seal import seal_payload, seal_update

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DIGEST_CONTEXT",
    "FORMAT",
    "HEX_DIGEST",
    "HPKE_INFO",
    "MAGIC",
    "MAX_CHUNK_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_META_BYTES",
    "MAX_ROUND",
    "MAX_SAFETENSORS_HEADER_BYTES",
    "MAX_TIMESTAMP_MS",
    "MESSAGE_ID",
    "META_KEY",
    "MIN_CHUNK_BYTES",
    "PREFIX_BYTES",
    "RECIPIENT",
    "SAFETENSORS_DTYPES",
    "SIGNATURE_BYTES",
    "SIGNATURE_CONTEXT",
    "SUITE",
    "Envelope",
    "EnvelopeHeader",
    "OpenedUpdate",
    "Reason",
    "Rejected",
    "ReplayCache",
    "SealError",
    "UpdateOpener",
    "UpdatePolicy",
    "canonical_json",
    "chunk_count",
    "ciphertext_length",
    "encode_payload",
    "frame",
    "log",
    "max_envelope_bytes",
    "parse_envelope",
    "read_safetensors_index",
    "seal_payload",
    "seal_update",
    "signed_message",
    "strict_json_loads",
    "tensor_norms",
    "update_norm",
]
