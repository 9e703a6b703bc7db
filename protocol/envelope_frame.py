"""Update envelopes, the format: constants, the refusal reasons, the signed header and the frame
(magic, header length, header, ciphertext, signature), parsed with every length checked before
anything is read. The layout is in ``docs/security.md`` ("Update envelopes"); the public names
are re-exported by :mod:`offsite.protocol.envelope`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from . import hpke
from .ids import JOB_ID
from .keys import SENDER_ID, b64decode_strict
from .safe_json import parse_json

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
MAX_ROUND = (1 << 31) - 1
MAX_TIMESTAMP_MS = 1 << 53

MESSAGE_ID = re.compile(r"^[0-9a-f]{32}$")
RECIPIENT = re.compile(r"^[0-9a-f]{16}$")
HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


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
                f"update from {who}: format {str(value.get('format'))[:40]!r} "
                f"/ suite {str(value.get('suite'))[:80]!r}, "
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
        raise Rejected(
            Reason.OVERSIZED, f"update from {who}: envelope of {len(view)} bytes is over the job's {limit}-byte limit"
        )
    if len(view) < PREFIX_BYTES + SIGNATURE_BYTES or bytes(view[: len(MAGIC)]) != MAGIC:
        raise Rejected(Reason.MALFORMED_FRAME, f"update from {who}: not an {FORMAT} envelope (bad magic or too short)")
    header_length = int.from_bytes(view[len(MAGIC) : PREFIX_BYTES], "big")
    if header_length > MAX_HEADER_BYTES or PREFIX_BYTES + header_length + SIGNATURE_BYTES > len(view):
        raise Rejected(
            Reason.MALFORMED_FRAME, f"update from {who}: header length {header_length} does not fit the envelope"
        )
    header_bytes = bytes(view[PREFIX_BYTES : PREFIX_BYTES + header_length])
    header = EnvelopeHeader.from_bytes(header_bytes, who)
    who = f"{who} (claims sender {header.sender!r})" if who == "unknown sender" else who
    if header.plaintext_bytes > max_payload_bytes:
        raise Rejected(
            Reason.OVERSIZED,
            f"update from {who}: payload of {header.plaintext_bytes} bytes is over the job's "
            f"{max_payload_bytes}-byte limit",
            header.sender,
        )
    expected = PREFIX_BYTES + header_length + header.ciphertext_bytes + SIGNATURE_BYTES
    if len(view) != expected:
        raise Rejected(
            Reason.MALFORMED_FRAME,
            f"update from {who}: envelope is {len(view)} bytes, its header implies {expected}",
            header.sender,
        )
    start, end = PREFIX_BYTES + header_length, PREFIX_BYTES + header_length + header.ciphertext_bytes
    return Envelope(header, header_bytes, view[start:end], bytes(view[end:]))
