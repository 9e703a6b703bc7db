"""Update envelopes, the coordinator side: :class:`UpdateOpener` checks an envelope in the order
``docs/security.md`` gives (frame, sender and signature, job, recipient, round, timestamp,
replay, decryption and digest, payload, norm) and returns the update or refuses it; the
:class:`ReplayCache` remembers accepted message ids, across restarts with a path.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from safetensors import SafetensorError
from safetensors.torch import load

from . import hpke
from .envelope_frame import (
    DIGEST_CONTEXT,
    HPKE_INFO,
    MESSAGE_ID,
    Envelope,
    EnvelopeHeader,
    Reason,
    Rejected,
    canonical_json,
    parse_envelope,
    signed_message,
    strict_json_loads,
)
from .envelope_payload import MAX_META_BYTES, SAFETENSORS_DTYPES, read_safetensors_index
from .keys import (
    SENDER_ID,
    CoordinatorKeys,
    SenderRegistry,
    b64decode_strict,
    fingerprint,
)

# the public module's logger, as before the split: operators and tests filter on its name
log = logging.getLogger(f"{__package__}.envelope")


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
                        isinstance(entry, dict)
                        and SENDER_ID.match(str(entry.get("sender")))
                        and MESSAGE_ID.match(str(entry.get("id")))
                        and isinstance(entry.get("t"), int)
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
        return (
            f"UpdateOpener(job={self.job!r}, round={self.round}, recipient={self.recipient}, "
            f"senders={len(self.registry.entries)})"
        )

    def for_round(self, round: int, reference: Mapping[str, torch.Tensor]) -> UpdateOpener:
        """The opener for another round: same keys, registry, job, policy, replay cache and clock."""
        return UpdateOpener(
            self.private_key, self.registry, self.job, round, reference, self.policy, self.replay, self.clock
        )

    def _reject(self, reason: Reason, who: str, message: str, sender: str | None) -> Rejected:
        log.warning(
            "job %s round %d: rejected update from %s: %s: %s", self.job, self.round, who, reason.value, message
        )
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
            self.job,
            self.round,
            header.message_id,
            who,
            norm,
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
                Reason.UNKNOWN_SENDER,
                f"{where} (claims sender {sender!r})",
                "sender is not enrolled in this job's registry",
                sender,
            )
        if entry.revoked:
            raise self._reject(Reason.REVOKED_SENDER, who, "sender's enrolment is revoked", sender)
        try:
            entry.public_key.verify(envelope.signature, signed_message(envelope.header_bytes, envelope.ciphertext))
        except InvalidSignature:
            raise self._reject(
                Reason.BAD_SIGNATURE,
                f"{where} (claims sender {sender!r})",
                f"signature does not verify with the key registered for {sender!r} ({entry.fingerprint})",
                sender,
            ) from None

    def _check_header(self, header: EnvelopeHeader, who: str) -> int:
        """Job, recipient, round, timestamp window, replay and one update per sender; returns the
        coordinator's clock (Unix milliseconds) at the check."""
        sender = header.sender
        if header.job != self.job:
            raise self._reject(Reason.WRONG_JOB, who, f"job {header.job!r}, this is job {self.job!r}", sender)
        if header.recipient != self.recipient:
            raise self._reject(
                Reason.WRONG_RECIPIENT,
                who,
                f"sealed to key {header.recipient}, this coordinator's is {self.recipient}",
                sender,
            )
        if header.round != self.round:
            reason = Reason.STALE_ROUND if header.round < self.round else Reason.FUTURE_ROUND
            raise self._reject(reason, who, f"round {header.round}, the current round is {self.round}", sender)
        now_ms = int(self.clock() * 1000)
        age_s = (now_ms - header.timestamp_ms) / 1000
        if age_s > self.policy.max_age_s or -age_s > self.policy.max_clock_skew_s:
            raise self._reject(
                Reason.TIMESTAMP,
                who,
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
        """The payload's tensors and metadata, once its safetensors header shows exactly the job's
        keys, shapes and dtypes; :class:`Rejected` otherwise."""
        try:
            index, metadata = read_safetensors_index(plaintext)
        except ValueError as error:
            raise self._reject(Reason.MALFORMED_PAYLOAD, who, str(error), sender) from None
        if set(index) != set(self.expected):
            extra, missing = sorted(set(index) - set(self.expected)), sorted(set(self.expected) - set(index))
            listed = f"unexpected tensors {[k[:80] for k in extra[:3]]}, missing {missing[:3]}"
            raise self._reject(Reason.WRONG_KEYS, who, listed, sender)
        for key, (dtype, shape) in self.expected.items():
            if index[key][1] != shape:
                raise self._reject(
                    Reason.WRONG_SHAPE, who, f"tensor {key!r} has shape {index[key][1]}, the job's is {shape}", sender
                )
        for key, (dtype, shape) in self.expected.items():
            if index[key][0] != dtype:
                raise self._reject(
                    Reason.WRONG_DTYPE, who, f"tensor {key!r} is {index[key][0][:16]}, the job's is {dtype}", sender
                )
        try:
            tensors = load(plaintext)
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise self._reject(
                Reason.MALFORMED_PAYLOAD, who, f"payload is not readable safetensors ({str(error)[:200]})", sender
            ) from None
        for key, tensor in tensors.items():  # what was loaded is what the index said
            if (SAFETENSORS_DTYPES.get(tensor.dtype), tuple(tensor.shape)) != self.expected[key]:
                loaded = f"tensor {key!r} loaded as {tensor.dtype}{tuple(tensor.shape)}"
                raise self._reject(Reason.MALFORMED_PAYLOAD, who, loaded, sender)
        return tensors, metadata
