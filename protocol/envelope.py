"""Update envelopes: a data owner's update, sealed to the coordinator (RFC 9180 HPKE) and signed by
the owner (Ed25519), so that only the coordinator reads it and accepts it only from an enrolled,
unrevoked sender, for this job and round, once.

The client calls :func:`seal_update`; the coordinator holds an :class:`UpdateOpener`, whose
:meth:`~UpdateOpener.open` returns the tensors or raises :class:`Rejected` with a :class:`Reason`
and a message naming the client, so a refused update never reaches the aggregate. The buffer
handed to :meth:`~UpdateOpener.open` is read in place: it must not change while it runs.
Construction, header, wire format, the order of the checks and the threat model are in
``docs/security.md`` ("Update envelopes").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from . import hpke
from .ids import JOB_ID
from .keys import (
    SENDER_ID,
    ClientIdentity,
    CoordinatorKeys,
    CoordinatorPublicKeys,
    SenderRegistry,
    b64decode_strict,
    fingerprint,
)
from .safe_json import parse_json

log = logging.getLogger(__name__)

FORMAT = "offsite-envelope/1"
SUITE = f"{hpke.SUITE_NAME}+Ed25519"
MAGIC = b"OFSTENV1"
PREFIX_BYTES = len(MAGIC) + 4
SIGNATURE_BYTES = 64
HPKE_INFO = FORMAT.encode()
SIGNATURE_CONTEXT = b"offsite-envelope/1 signature\x00"
DIGEST_CONTEXT = b"offsite-envelope/1 payload digest"
MAX_HEADER_BYTES = 4096
DEFAULT_CHUNK_BYTES = 4 << 20
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20
MAX_META_BYTES = 64 << 10
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20
META_KEY = "offsite"
MAX_ROUND = (1 << 31) - 1
MAX_TIMESTAMP_MS = 1 << 53

MESSAGE_ID = re.compile(r"^[0-9a-f]{32}$")
RECIPIENT = re.compile(r"^[0-9a-f]{16}$")
HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")

# torch dtype <-> safetensors dtype name
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class Reason(str, Enum):
    """Why :meth:`UpdateOpener.open` refused an envelope (the value is what the log line says)."""

    OVERSIZED = "oversized"  # the envelope, or the payload its header declares, is over the job's limit
    MALFORMED_FRAME = "malformed-frame"  # magic, header length, total length (truncated or extended)
    MALFORMED_HEADER = "malformed-header"  # header is not the canonical JSON of a valid header
    UNSUPPORTED = "unsupported-format"  # another envelope format or ciphersuite
    UNKNOWN_SENDER = "unknown-sender"  # sender id not in the registry
    REVOKED_SENDER = "revoked-sender"  # sender id revoked by the operator
    BAD_SIGNATURE = "bad-signature"  # signature does not verify with the sender's registered key
    WRONG_JOB = "wrong-job"
    WRONG_RECIPIENT = "wrong-recipient"  # sealed to another coordinator key
    STALE_ROUND = "stale-round"
    FUTURE_ROUND = "future-round"
    TIMESTAMP = "timestamp-out-of-window"  # too old, or too far ahead of the coordinator's clock
    REPLAYED = "replayed"  # this message id was accepted before
    DUPLICATE_SENDER = "duplicate-sender"  # this sender already has an accepted update this round
    DECRYPTION_FAILED = "decryption-failed"
    DIGEST_MISMATCH = "digest-mismatch"  # the plaintext's keyed digest is not the header's
    MALFORMED_PAYLOAD = "malformed-payload"  # the plaintext is not a safetensors update
    WRONG_KEYS = "wrong-keys"
    WRONG_SHAPE = "wrong-shape"
    WRONG_DTYPE = "wrong-dtype"
    NON_FINITE = "non-finite"
    NORM_EXCEEDED = "norm-exceeded"


class Rejected(ValueError):
    """An envelope was refused. ``reason`` is a :class:`Reason`; the message names the client."""

    def __init__(self, reason: Reason, message: str, sender: str | None = None) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.sender = sender


class SealError(ValueError):
    """The client cannot seal this update (not tensors, bad job id or round); the message names it."""


def chunk_count(plaintext_bytes: int, chunk_bytes: int) -> int:
    return max(1, -(-plaintext_bytes // chunk_bytes))


def ciphertext_length(plaintext_bytes: int, chunk_bytes: int) -> int:
    return plaintext_bytes + hpke.N_T * chunk_count(plaintext_bytes, chunk_bytes)


def max_envelope_bytes(max_payload_bytes: int) -> int:
    """The largest envelope whose payload can be ``max_payload_bytes``, whatever its chunking."""
    return PREFIX_BYTES + MAX_HEADER_BYTES + ciphertext_length(max_payload_bytes, MIN_CHUNK_BYTES) + SIGNATURE_BYTES


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def strict_json_loads(data: bytes, allow_floats: bool = False):
    """JSON with duplicate keys, NaN/Infinity, deep nesting, huge integers (and, unless allowed, any
    non-integer number) refused: :class:`~offsite.protocol.safe_json.JSONRefused`, never another error."""
    return parse_json(data, integers_only=not allow_floats)


# ---------------------------------------------------------------- header and frame


@dataclass(frozen=True)
class EnvelopeHeader:
    job: str
    round: int
    sender: str
    recipient: str
    message_id: str
    timestamp_ms: int
    enc: str
    plaintext_bytes: int
    chunk_bytes: int
    payload_digest: str
    format: str = FORMAT
    suite: str = SUITE

    def to_bytes(self) -> bytes:
        return canonical_json(asdict(self))

    @property
    def ciphertext_bytes(self) -> int:
        return ciphertext_length(self.plaintext_bytes, self.chunk_bytes)

    @classmethod
    def from_bytes(cls, data: bytes, who: str = "unknown sender") -> EnvelopeHeader:
        """Parse header bytes strictly; :class:`Rejected` (MALFORMED_HEADER or UNSUPPORTED) otherwise."""

        def bad(reason: str) -> Rejected:
            return Rejected(Reason.MALFORMED_HEADER, f"update from {who}: header {reason}")

        try:
            value = strict_json_loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as error:
            raise bad(f"is not valid JSON ({error})") from None
        if not isinstance(value, dict):
            raise bad("is not a JSON object")
        if value.get("format") != FORMAT or value.get("suite") != SUITE:
            raise Rejected(
                Reason.UNSUPPORTED,
                f"update from {who}: format {str(value.get('format'))[:40]!r} / suite {str(value.get('suite'))[:80]!r}, "
                f"this coordinator speaks {FORMAT!r} / {SUITE!r}",
            )
        names = {f.name for f in fields(cls)}
        if set(value) != names:
            raise bad(f"fields {sorted(value)[:20]} are not {sorted(names)}")
        types = {"round": int, "timestamp_ms": int, "plaintext_bytes": int, "chunk_bytes": int}
        for name in names:
            want = types.get(name, str)
            if isinstance(value[name], bool) or not isinstance(value[name], want):
                raise bad(f"field {name!r} must be {want.__name__}")
        checks = [
            (JOB_ID.match(value["job"]), "job"),
            (SENDER_ID.match(value["sender"]), "sender"),
            (RECIPIENT.match(value["recipient"]), "recipient"),
            (MESSAGE_ID.match(value["message_id"]), "message_id"),
            (HEX_DIGEST.match(value["payload_digest"]), "payload_digest"),
            (1 <= value["round"] <= MAX_ROUND, "round"),
            (0 <= value["timestamp_ms"] < MAX_TIMESTAMP_MS, "timestamp_ms"),
            (0 <= value["plaintext_bytes"] < 1 << 62, "plaintext_bytes"),
            (MIN_CHUNK_BYTES <= value["chunk_bytes"] <= MAX_CHUNK_BYTES, "chunk_bytes"),
        ]
        for ok, name in checks:
            if not ok:
                raise bad(f"field {name!r} is out of range or malformed: {str(value[name])[:80]!r}")
        try:
            if len(b64decode_strict(value["enc"], "enc")) != hpke.N_ENC:
                raise ValueError(f"enc is not {hpke.N_ENC} bytes")
        except ValueError as error:
            raise bad(str(error)) from None
        header = cls(**value)
        if header.to_bytes() != bytes(data):
            raise bad("is not in canonical form (sorted keys, no spaces, ASCII)")
        return header


def signed_message(header_bytes: bytes, ciphertext, ciphertext_digest: bytes | None = None) -> bytes:
    """What the sender's Ed25519 signature covers (``ciphertext_digest``: its SHA-256, if already known)."""
    digest = ciphertext_digest if ciphertext_digest is not None else hashlib.sha256(ciphertext).digest()
    return SIGNATURE_CONTEXT + len(header_bytes).to_bytes(4, "big") + bytes(header_bytes) + digest


def frame(header_bytes: bytes, ciphertext: bytes, signature: bytes) -> bytes:
    return b"".join((MAGIC, len(header_bytes).to_bytes(4, "big"), header_bytes, ciphertext, signature))


@dataclass(frozen=True)
class Envelope:
    """A parsed (not yet verified) envelope; ``ciphertext`` is a view into the received buffer."""

    header: EnvelopeHeader
    header_bytes: bytes
    ciphertext: memoryview = field(repr=False)
    signature: bytes = field(repr=False)


def parse_envelope(data: bytes, max_payload_bytes: int, who: str = "unknown sender") -> Envelope:
    """Split ``data`` into header, ciphertext and signature, checking every length first.

    Raises :class:`Rejected` with OVERSIZED, MALFORMED_FRAME, MALFORMED_HEADER or UNSUPPORTED.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Rejected(Reason.MALFORMED_FRAME, f"update from {who}: expected bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    limit = max_envelope_bytes(max_payload_bytes)
    if len(view) > limit:
        raise Rejected(Reason.OVERSIZED, f"update from {who}: envelope of {len(view)} bytes is over the job's {limit}-byte limit")
    if len(view) < PREFIX_BYTES + SIGNATURE_BYTES or bytes(view[: len(MAGIC)]) != MAGIC:
        raise Rejected(Reason.MALFORMED_FRAME, f"update from {who}: not an {FORMAT} envelope (bad magic or too short)")
    header_length = int.from_bytes(view[len(MAGIC) : PREFIX_BYTES], "big")
    if header_length > MAX_HEADER_BYTES or PREFIX_BYTES + header_length + SIGNATURE_BYTES > len(view):
        raise Rejected(Reason.MALFORMED_FRAME, f"update from {who}: header length {header_length} does not fit the envelope")
    header_bytes = bytes(view[PREFIX_BYTES : PREFIX_BYTES + header_length])
    header = EnvelopeHeader.from_bytes(header_bytes, who)
    who = f"{who} (claims sender {header.sender!r})" if who == "unknown sender" else who
    if header.plaintext_bytes > max_payload_bytes:
        raise Rejected(
            Reason.OVERSIZED, f"update from {who}: payload of {header.plaintext_bytes} bytes is over the job's {max_payload_bytes}-byte limit", header.sender
        )
    expected = PREFIX_BYTES + header_length + header.ciphertext_bytes + SIGNATURE_BYTES
    if len(view) != expected:
        raise Rejected(Reason.MALFORMED_FRAME, f"update from {who}: envelope is {len(view)} bytes, its header implies {expected}", header.sender)
    start = PREFIX_BYTES + header_length
    return Envelope(header, header_bytes, view[start : start + header.ciphertext_bytes], bytes(view[start + header.ciphertext_bytes :]))


# ---------------------------------------------------------------- payload


def encode_payload(tensors: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> bytes:
    """Safetensors bytes of ``tensors`` (moved to CPU, contiguous) with ``metadata`` as JSON under ``"offsite"``."""
    from safetensors.torch import save

    plain = {}
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise SealError(f"update entry {key!r}: expected str -> torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise SealError(f"tensor {key!r}: dtype {tensor.dtype} cannot travel in an envelope")
        plain[key] = tensor.detach().to("cpu").contiguous()
    meta = None
    if metadata is not None:
        try:
            text = canonical_json(dict(metadata)).decode()
        except (TypeError, ValueError) as error:
            raise SealError(f"update metadata is not finite JSON: {error}") from None
        if len(text) > MAX_META_BYTES:
            raise SealError(f"update metadata is {len(text)} bytes, over {MAX_META_BYTES}")
        meta = {META_KEY: text}
    return save(plain, metadata=meta)


def read_safetensors_index(plaintext: bytes) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """Each tensor's (dtype name, shape) and the ``offsite`` metadata, from the safetensors header
    only (nothing is materialised); ValueError saying what is wrong."""

    def bad(reason: str) -> ValueError:
        return ValueError(f"payload {reason}")

    if len(plaintext) < 8:
        raise bad("is shorter than a safetensors header")
    length = int.from_bytes(plaintext[:8], "little")
    if length > MAX_SAFETENSORS_HEADER_BYTES or 8 + length > len(plaintext):
        raise bad(f"safetensors header length {length} does not fit")
    try:
        header = strict_json_loads(plaintext[8 : 8 + length])
    except (ValueError, UnicodeDecodeError) as error:
        raise bad(f"safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("safetensors header is not an object")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or set(raw_meta) - {META_KEY}:
        raise bad(f"metadata must hold only {META_KEY!r}")
    meta = {}
    if META_KEY in raw_meta:
        text = raw_meta[META_KEY]
        if not isinstance(text, str) or len(text) > MAX_META_BYTES:
            raise bad(f"metadata {META_KEY!r} is not a string of at most {MAX_META_BYTES} bytes")
        try:
            meta = strict_json_loads(text.encode(), allow_floats=True)
        except (ValueError, UnicodeDecodeError) as error:
            raise bad(f"metadata is not valid JSON ({error})") from None
        if not isinstance(meta, dict):
            raise bad("metadata is not a JSON object")
    index = {}
    for key, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or not isinstance(entry.get("shape"), list):
            raise bad(f"entry {key[:80]!r} lacks a dtype or shape")
        shape = entry["shape"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"tensor {key[:80]!r} has shape {str(shape)[:80]}")
        index[key] = (entry["dtype"], tuple(shape))
    return index, meta


# ---------------------------------------------------------------- sealing (client side)


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
    recipient_key = recipient.encryption_key if isinstance(recipient, CoordinatorPublicKeys) else recipient
    if not isinstance(recipient_key, X25519PublicKey):
        raise SealError(f"recipient must be the coordinator's X25519 public key, got {type(recipient_key).__name__}")
    if not isinstance(job, str) or not JOB_ID.match(job):
        raise SealError(f"job id {job!r}: use 1-128 of A-Z a-z 0-9 . _ : - (starting with a letter or digit)")
    if isinstance(round, bool) or not isinstance(round, int) or not 1 <= round <= MAX_ROUND:
        raise SealError(f"round {round!r} is not an integer in 1..{MAX_ROUND}")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise SealError(f"chunk_bytes {chunk_bytes} is not in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
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
    # the frame is written in place: one buffer of the final size, no copy of the ciphertext
    start = PREFIX_BYTES + len(header_bytes)
    out = bytearray(start + header.ciphertext_bytes + SIGNATURE_BYTES)
    out[:start] = MAGIC + len(header_bytes).to_bytes(4, "big") + header_bytes
    source, target = memoryview(plaintext), memoryview(out)
    hasher = hashlib.sha256()
    position = start
    for offset in range(0, max(len(plaintext), 1), chunk_bytes):
        piece = source[offset : offset + chunk_bytes]
        sealed = target[position : position + len(piece) + hpke.N_T]
        context.seal_into(header_bytes, piece, sealed)
        hasher.update(sealed)
        position += len(sealed)
    target[position:] = identity.signing_key.sign(signed_message(header_bytes, None, hasher.digest()))
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
        job=job, round=round, identity=identity, recipient=recipient, clock=clock, chunk_bytes=chunk_bytes,
    )


# ---------------------------------------------------------------- opening (coordinator side)


class ReplayCache:
    """(sender, message id) of accepted envelopes, with their timestamps.

    Keyed per sender, so one enrolled sender cannot burn another's message id. An id only needs
    remembering while its timestamp could still pass the opener's window, so :meth:`prune`
    forgets older ones. With ``path`` the cache is also an append-only JSON-lines file (one
    ``{"sender", "id", "t"}`` per accepted envelope, flushed and fsynced before ``open``
    returns), so a restarted coordinator still refuses a replay of an update it accepted.
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._seen: dict[tuple[str, str], int] = {}
        if self.path is not None and self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    entry = strict_json_loads(line.encode())
                    if not (
                        isinstance(entry, dict) and SENDER_ID.match(str(entry.get("sender")))
                        and MESSAGE_ID.match(str(entry.get("id"))) and isinstance(entry.get("t"), int)
                    ):
                        raise ValueError('expected {"sender": id, "id": 32 hex digits, "t": integer}')
                except (ValueError, UnicodeDecodeError) as error:
                    raise ValueError(f"{self.path}:{number}: not a replay-cache entry ({error})") from None
                self._seen[(entry["sender"], entry["id"])] = entry["t"]

    def seen(self, sender: str, message_id: str) -> bool:
        return (sender, message_id) in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, sender: str, message_id: str, timestamp_ms: int) -> None:
        self._seen[(sender, message_id)] = timestamp_ms
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(canonical_json({"sender": sender, "id": message_id, "t": timestamp_ms}).decode() + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def prune(self, older_than_ms: int) -> int:
        """Forget ids with timestamps before ``older_than_ms`` (in memory); returns how many."""
        old = [key for key, stamp in self._seen.items() if stamp < older_than_ms]
        for key in old:
            del self._seen[key]
        return len(old)


@dataclass(frozen=True)
class UpdatePolicy:
    """A job's limits on received updates."""

    max_payload_bytes: int | None = None  # None: the reference adapter's bytes + 1 KiB per tensor + 128 KiB
    max_update_norm: float | None = None  # L2 norm of update - reference; None: not checked
    max_clock_skew_s: float = 300.0  # how far ahead of the coordinator's clock a timestamp may be
    max_age_s: float = 3600.0  # how old a timestamp may be (covers the round timeout + skew)

    def __post_init__(self) -> None:
        if self.max_payload_bytes is not None and self.max_payload_bytes < 8:
            raise ValueError(f"max_payload_bytes must be >= 8, got {self.max_payload_bytes}")
        if self.max_update_norm is not None and not (self.max_update_norm > 0 and math.isfinite(self.max_update_norm)):
            raise ValueError(f"max_update_norm must be a finite number > 0, got {self.max_update_norm}")
        if not (self.max_clock_skew_s >= 0 and self.max_age_s >= 0):
            raise ValueError("max_clock_skew_s and max_age_s must be >= 0")


@dataclass(frozen=True)
class OpenedUpdate:
    """An accepted update: what may go into the aggregate."""

    sender: str
    round: int
    message_id: str
    timestamp_ms: int
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict
    update_norm: float


def tensor_norms(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """L2 norm of ``update[k] - reference[k]`` for each floating tensor: in float32, redone in
    float64 where float32 overflows. With a finite reference, a norm is non-finite exactly when
    the update's tensor holds a NaN or an Inf (float64 cannot overflow on float32 values), so
    this one pass is also the finiteness check."""
    norms = {}
    for key, tensor in update.items():
        if tensor.dtype.is_floating_point:
            norm = float(torch.linalg.vector_norm(tensor.float() - reference[key].float()))
            if not math.isfinite(norm):
                norm = float(torch.linalg.vector_norm(tensor.double() - reference[key].double()))
            norms[key] = norm
    return norms


def update_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``update - reference`` over the floating tensors (per-tensor norms as in
    :func:`tensor_norms`, summed in float64)."""
    return math.sqrt(sum(value * value for value in tensor_norms(update, reference).values()))


class UpdateOpener:
    """The coordinator's side: opens envelopes for one job and round, or refuses them.

    Holds the coordinator's X25519 key, the sender registry, the job id, the expected round, the
    reference (global) adapter the round started from (its keys, shapes and dtypes are what an
    update must have; the norm is measured from it), the job's :class:`UpdatePolicy`, a
    :class:`ReplayCache` (share one across rounds; give it a path to survive restarts) and the
    clock (injectable for tests). :meth:`for_round` makes the next round's opener.
    """

    def __init__(
        self,
        keys: CoordinatorKeys | X25519PrivateKey,
        registry: SenderRegistry,
        job: str,
        round: int,
        reference: Mapping[str, torch.Tensor],
        policy: UpdatePolicy | None = None,
        replay: ReplayCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.private_key = keys.encryption_key if isinstance(keys, CoordinatorKeys) else keys
        if not isinstance(self.private_key, X25519PrivateKey):
            raise TypeError(f"keys must be CoordinatorKeys or an X25519 private key, got {type(keys).__name__}")
        self.recipient = fingerprint(self.private_key.public_key())
        self.registry = registry
        self.job = job
        self.round = int(round)
        self.reference = {key: tensor.detach().to("cpu") for key, tensor in reference.items()}
        self.policy = policy or UpdatePolicy()
        self.replay = replay if replay is not None else ReplayCache()
        self.clock = clock
        self.accepted: dict[str, str] = {}  # sender -> message id accepted this round
        self.expected = {key: (SAFETENSORS_DTYPES.get(t.dtype), tuple(t.shape)) for key, t in self.reference.items()}
        missing = [key for key, (dtype, _) in self.expected.items() if dtype is None]
        if missing:
            raise TypeError(f"reference tensors {missing[:3]} have dtypes no envelope can carry")
        if self.policy.max_payload_bytes is not None:
            self.max_payload_bytes = self.policy.max_payload_bytes
        else:
            tensor_bytes = sum(t.numel() * t.element_size() for t in self.reference.values())
            self.max_payload_bytes = tensor_bytes + 1024 * len(self.reference) + 2 * MAX_META_BYTES

    def __repr__(self) -> str:
        return f"UpdateOpener(job={self.job!r}, round={self.round}, recipient={self.recipient}, senders={len(self.registry.entries)})"

    def for_round(self, round: int, reference: Mapping[str, torch.Tensor]) -> UpdateOpener:
        """The opener for another round: same keys, registry, job, policy, replay cache and clock."""
        opener = UpdateOpener(self.private_key, self.registry, self.job, round, reference, self.policy, self.replay, self.clock)
        return opener

    def _reject(self, reason: Reason, who: str, message: str, sender: str | None) -> Rejected:
        log.warning("job %s round %d: rejected update from %s: %s: %s", self.job, self.round, who, reason.value, message)
        return Rejected(reason, f"update from {who}: {message}", sender)

    def open(self, data: bytes, node: int | str | None = None) -> OpenedUpdate:
        """The update inside ``data``, or :class:`Rejected` (logged with the client named).

        ``node``: where it came from (e.g. the Flower node id), for the log line and message.
        """
        where = f"node {node}" if node is not None else "unknown node"
        envelope = self._parse(data, where)
        header = envelope.header
        sender = header.sender
        who = f"sender {sender!r} ({where})"
        self._check_sender(envelope, where, who)
        now_ms = self._check_header(header, who)
        plaintext = self._decrypt(envelope, who)
        try:
            tensors, metadata = self._decode(bytes(plaintext), who, sender)
        except Rejected:
            raise
        except Exception as error:  # noqa: BLE001 - a payload that breaks a parser is malformed, whatever it raised
            reason = f"unreadable payload ({type(error).__name__}: {str(error)[:200]})"
            raise self._reject(Reason.MALFORMED_PAYLOAD, who, reason, sender) from None
        del plaintext
        norm = self._check_norm(tensors, who, sender)

        self.replay.add(sender, header.message_id, header.timestamp_ms)
        self.replay.prune(now_ms - int((self.policy.max_age_s + self.policy.max_clock_skew_s) * 1000) - 1000)
        self.accepted[sender] = header.message_id
        log.info(
            "job %s round %d: accepted update %s from %s (norm %.4g)",
            self.job, self.round, header.message_id, who, norm,
        )
        return OpenedUpdate(sender, header.round, header.message_id, header.timestamp_ms, tensors, metadata, norm)

    def _parse(self, data: bytes, where: str) -> Envelope:
        """:func:`parse_envelope` with this job's size limit; whatever it raises is a logged :class:`Rejected`."""
        try:
            return parse_envelope(data, self.max_payload_bytes, where)
        except Rejected as error:
            log.warning("job %s round %d: rejected update from %s: %s", self.job, self.round, where, error)
            raise
        except Exception as error:  # noqa: BLE001 - hostile bytes end in a refusal, whatever a parser raised
            raise self._reject(
                Reason.MALFORMED_FRAME, where, f"unreadable envelope ({type(error).__name__}: {str(error)[:200]})", None
            ) from None

    def _check_sender(self, envelope: Envelope, where: str, who: str) -> None:
        """The sender is enrolled, not revoked, and signed this envelope with its registered key."""
        sender = envelope.header.sender
        entry = self.registry.lookup(sender)
        if entry is None:
            raise self._reject(
                Reason.UNKNOWN_SENDER, f"{where} (claims sender {sender!r})",
                "sender is not enrolled in this job's registry", sender,
            )
        if entry.revoked:
            raise self._reject(Reason.REVOKED_SENDER, who, "sender's enrolment is revoked", sender)
        try:
            entry.public_key.verify(envelope.signature, signed_message(envelope.header_bytes, envelope.ciphertext))
        except InvalidSignature:
            raise self._reject(
                Reason.BAD_SIGNATURE, f"{where} (claims sender {sender!r})",
                f"signature does not verify with the key registered for {sender!r} ({entry.fingerprint})", sender,
            ) from None

    def _check_header(self, header: EnvelopeHeader, who: str) -> int:
        """Job, recipient, round, timestamp window, replay and one update per sender; returns the
        coordinator's clock (Unix milliseconds) at the check."""
        sender = header.sender
        if header.job != self.job:
            raise self._reject(Reason.WRONG_JOB, who, f"job {header.job!r}, this is job {self.job!r}", sender)
        if header.recipient != self.recipient:
            raise self._reject(
                Reason.WRONG_RECIPIENT, who,
                f"sealed to key {header.recipient}, this coordinator's is {self.recipient}", sender,
            )
        if header.round < self.round:
            raise self._reject(Reason.STALE_ROUND, who, f"round {header.round}, the current round is {self.round}", sender)
        if header.round > self.round:
            raise self._reject(Reason.FUTURE_ROUND, who, f"round {header.round}, the current round is {self.round}", sender)
        now_ms = int(self.clock() * 1000)
        age_s = (now_ms - header.timestamp_ms) / 1000
        if age_s > self.policy.max_age_s or -age_s > self.policy.max_clock_skew_s:
            raise self._reject(
                Reason.TIMESTAMP, who,
                f"timestamp is {age_s:+.1f}s from the coordinator's clock "
                f"(window: {self.policy.max_age_s:g}s old to {self.policy.max_clock_skew_s:g}s ahead)",
                sender,
            )
        if self.replay.seen(sender, header.message_id):
            raise self._reject(Reason.REPLAYED, who, f"message {header.message_id} was already accepted", sender)
        if sender in self.accepted:
            raise self._reject(
                Reason.DUPLICATE_SENDER, who, f"already sent update {self.accepted[sender]} this round", sender
            )
        return now_ms

    def _decrypt(self, envelope: Envelope, who: str) -> bytearray:
        """The plaintext, chunk by chunk into one buffer, checked against the header's keyed digest."""
        header = envelope.header
        plaintext = bytearray(header.plaintext_bytes)
        try:
            context = hpke.setup_base_recipient(b64decode_strict(header.enc, "enc"), self.private_key, HPKE_INFO)
            ciphertext, target, position = envelope.ciphertext, memoryview(plaintext), 0
            step = header.chunk_bytes + hpke.N_T
            for start in range(0, len(ciphertext), step):
                piece = ciphertext[start : start + step]
                context.open_into(envelope.header_bytes, piece, target[position : position + len(piece) - hpke.N_T])
                position += len(piece) - hpke.N_T
        except (hpke.HPKEError, ValueError) as error:
            raise self._reject(Reason.DECRYPTION_FAILED, who, str(error), header.sender) from None
        digest = hmac.new(context.export(DIGEST_CONTEXT, 32), plaintext, hashlib.sha256).hexdigest()
        if position != header.plaintext_bytes or not hmac.compare_digest(digest, header.payload_digest):
            raise self._reject(
                Reason.DIGEST_MISMATCH, who, "the decrypted payload does not match the header's digest", header.sender
            )
        return plaintext

    def _check_norm(self, tensors: Mapping[str, torch.Tensor], who: str, sender: str) -> float:
        """Every floating tensor finite and the update norm within the job's bound; returns the norm."""
        norms = tensor_norms(tensors, self.reference)  # a NaN or Inf anywhere makes its tensor's norm non-finite
        for key, value in norms.items():
            if not math.isfinite(value):
                raise self._reject(Reason.NON_FINITE, who, f"tensor {key!r} holds NaN or Inf", sender)
        norm = math.sqrt(sum(value * value for value in norms.values()))
        bound = self.policy.max_update_norm
        if bound is not None and norm > bound:
            raise self._reject(
                Reason.NORM_EXCEEDED, who, f"update norm {norm:.6g} is over the job's bound {bound:g}", sender
            )
        return norm

    def _decode(self, plaintext: bytes, who: str, sender: str) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            index, metadata = read_safetensors_index(plaintext)
        except ValueError as error:
            raise self._reject(Reason.MALFORMED_PAYLOAD, who, str(error), sender) from None
        if set(index) != set(self.expected):
            extra, missing = sorted(set(index) - set(self.expected)), sorted(set(self.expected) - set(index))
            raise self._reject(Reason.WRONG_KEYS, who, f"unexpected tensors {[k[:80] for k in extra[:3]]}, missing {missing[:3]}", sender)
        for key, (dtype, shape) in self.expected.items():
            if index[key][1] != shape:
                raise self._reject(Reason.WRONG_SHAPE, who, f"tensor {key!r} has shape {index[key][1]}, the job's is {shape}", sender)
        for key, (dtype, shape) in self.expected.items():
            if index[key][0] != dtype:
                raise self._reject(Reason.WRONG_DTYPE, who, f"tensor {key!r} is {index[key][0][:16]}, the job's is {dtype}", sender)
        try:
            tensors = load(plaintext)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise self._reject(Reason.MALFORMED_PAYLOAD, who, f"payload is not readable safetensors ({str(error)[:200]})", sender) from None
        for key, tensor in tensors.items():  # what was loaded is what the index said
            if SAFETENSORS_DTYPES.get(tensor.dtype) != self.expected[key][0] or tuple(tensor.shape) != self.expected[key][1]:
                raise self._reject(Reason.MALFORMED_PAYLOAD, who, f"tensor {key!r} loaded as {tensor.dtype}{tuple(tensor.shape)}", sender)
        return tensors, metadata
