"""What the ServerApp and the ClientApp say to each other over Flower: message types, record
keys, error codes, and symmetric record conversions for each message body.

Two conversations:

``query.bundle_part`` (server -> client, once per job and node)
    ``{"bundle-info": ConfigRecord, "bundle-data": ArrayRecord}``: a slice of the emulator bundle
    (one or more byte ranges of its files, the manifest included). Flower starts a fresh
    ClientApp process for every message, so the client assembles the parts on disk, in any
    order; when it holds all of them it verifies the bundle (every sha256, and the manifest's
    digest against the one announced) and installs it in its cache keyed by digest. The reply
    says ``status``: ``partial``, ``installed`` or ``cached`` (already there: nothing written).

``train`` (server -> client, every round)
    ``{"adapter": ArrayRecord, "config": ConfigRecord}``: the global adapter and the round's
    :class:`TrainInstruction` (which names the bundle by digest, carries the round's tuning config,
    and the job's security modes).
    The reply, or a Flower ``Error`` with one of :class:`ErrorCode` and a reason naming the bad
    thing (file and line for a malformed data file), depends on the modes:

    - plain: ``{"adapter": ArrayRecord, "metrics": MetricRecord}`` with ``num-examples``,
      ``train-loss``, timings;
    - ``envelope``: ``{"envelope": ArrayRecord, "metrics": MetricRecord}``: the update sealed to
      the coordinator and signed by the data owner (:mod:`offsite.protocol.envelope_wire`),
      its metrics inside the sealed metadata; outside, only ``client-seconds`` (the handler's wall
      time, which the relay sees anyway). No plaintext update;
    - ``secagg``: the train message also carries the secure-aggregation stage-2 records (the
      client's :class:`~offsite.protocol.secagg.ShareBundle`); the reply is the client's
      :class:`~offsite.protocol.secagg.MaskedInput` records (sealed in an envelope when
      ``envelope`` is on too) and ``client-seconds``: no plaintext update, no example count, no loss.

``query.secagg`` (server -> client, stages 0, 1 and 3 of secure aggregation)
    :func:`~offsite.protocol.secagg.to_content` of the stage's request plus ``{"secagg-round":
    ConfigRecord{"job-id", "round"}}``; the reply is ``to_content`` of the client's answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path, PurePosixPath
from typing import Generic, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .config_record import config_from_record, config_to_record
from .dp_config import DPConfig
from .ids import JOB_ID

TRAIN = "train"
BUNDLE_PART = "query.bundle_part"
SECAGG_QUERY = "query.secagg"

ADAPTER = "adapter"
CONFIG = "config"
METRICS = "metrics"
BUNDLE_INFO = "bundle-info"
BUNDLE_DATA = "bundle-data"
BUNDLE_STATUS = "bundle-status"
SECAGG_ROUND = "secagg-round"

DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_PART_BYTES = 256 << 20


class ErrorCode(IntEnum):
    """Codes of the ``Error`` replies our ClientApp sends (Flower's own codes are below 100)."""

    DATA_FORMAT = 1001  # the local data file is malformed (reason: file:line: what)
    BUNDLE_MISSING = 1002  # the bundle named by the instruction is not in the client's cache
    BUNDLE_INVALID = 1003  # a received bundle failed verification, or a part was malformed
    BAD_MESSAGE = 1004  # the message does not decode (missing record, bad instruction)
    NODE_CONFIG = 1005  # the SuperNode's --node-config lacks or mangles a setting
    TRAIN_FAILED = 1006  # anything else raised while training
    SECAGG = 1007  # a secure-aggregation stage was refused (bad message, no session state for it)


class WireError(ValueError):
    """A message body does not decode; the message names the record and key."""


# ---------------------------------------------------------------- train


TuningT = TypeVar("TuningT")


@dataclass(frozen=True)
class TrainInstruction(Generic[TuningT]):
    """One round's instruction to a data owner: the bundle to tune (by digest), how to tune it, and
    the job's security modes.

    ``tuning`` is the round's :class:`offsite.emulator.tune.TuneConfig` (the job's, with the round's
    learning rate and seed): protocol carries it without importing the tuning stack, so a reader
    names its class (``from_record(record, TuneConfig)``) and the config checks itself. ``dp``:
    the mechanism each data owner applies to its delta (None: no DP), checked by :class:`DPConfig`.
    """

    round: int
    bundle_digest: str
    tuning: TuningT
    job_id: str = ""  # binds envelopes and secure-aggregation sessions to the job; "" without them
    envelope: bool = False
    secagg: bool = False
    dp: DPConfig | None = None

    def __post_init__(self) -> None:
        if not DIGEST.match(self.bundle_digest):
            raise WireError(f"bundle_digest {self.bundle_digest!r} is not a sha256 hex digest")
        if self.job_id and not JOB_ID.match(self.job_id):
            raise WireError(f"job_id {self.job_id[:140]!r} is not a job id")
        if (self.envelope or self.secagg) and not self.job_id:
            raise WireError("envelope and secagg need a job_id")
        if self.round < 1:
            raise WireError(f"round must be >= 1, got {self.round}")
        if not dataclasses.is_dataclass(self.tuning):
            raise WireError(f"tuning must be a config dataclass, got {type(self.tuning).__name__}")

    def to_record(self) -> ConfigRecord:
        return config_to_record(self)

    @classmethod
    def from_record(cls, record: ConfigRecord, tuning: type[TuningT]) -> TrainInstruction[TuningT]:
        """The instruction :meth:`to_record` wrote, its ``tuning`` read as a ``tuning`` instance."""
        try:
            return config_from_record(cls, record, nested={"tuning": tuning})
        except WireError:
            raise
        except ValueError as error:  # a bad key or value, or a config's own refusal (DPError, the tuning's)
            raise WireError(f"train instruction: {error}") from None


def secagg_session(job_id: str, round_number: int) -> bytes:
    """The secure-aggregation session of one round of one job (32 bytes): both sides derive it,
    so no session (keys, shares, masks) can be carried over to another round or job."""
    bad_round = isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1
    if not JOB_ID.match(job_id) or bad_round:
        raise WireError(f"secure aggregation session: bad job id {job_id[:140]!r} or round {round_number!r}")
    session = b"offsite-secagg-session/1\0" + job_id.encode() + b"\0" + round_number.to_bytes(8, "big")
    return hashlib.sha256(session).digest()


# ---------------------------------------------------------------- bundle parts


@dataclass(frozen=True)
class Segment:
    """``data`` belongs at byte ``offset`` of bundle file ``path`` (relative, POSIX)."""

    path: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class BundlePart:
    digest: str
    index: int
    count: int
    segments: tuple[Segment, ...]


def check_relative_path(path: str) -> str:
    """Refuse absolute paths, ``..``, backslashes and empty names: a part may only write inside the bundle."""
    pure = PurePosixPath(path)
    if not path or "\\" in path or pure.is_absolute() or any(p in ("..", ".", "") for p in path.split("/")):
        raise WireError(f"bundle file name {path!r} is not a plain relative path")
    return path


def plan_bundle_parts(files: dict[str, int], part_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Cut the files (name -> size) into parts of at most ``part_bytes`` bytes each: every part a
    list of ``(name, offset, length)`` ranges; files are packed in name order, big ones split."""
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be >= 1, got {part_bytes}")
    parts: list[list[tuple[str, int, int]]] = [[]]
    room = part_bytes
    for name in sorted(files):
        size, offset = files[name], 0
        while True:
            if room == 0:
                parts.append([])
                room = part_bytes
            length = min(room, size - offset)
            parts[-1].append((name, offset, length))
            room -= length
            offset += length
            if offset >= size:
                break
    return parts


def read_bundle_part(root: Path, digest: str, plan: list[list[tuple[str, int, int]]], index: int) -> BundlePart:
    segments = []
    for name, offset, length in plan[index]:
        with open(Path(root) / name, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        if len(data) != length:
            raise OSError(f"{Path(root) / name}: short read at {offset} (+{length})")
        segments.append(Segment(name, offset, data))
    return BundlePart(digest, index, len(plan), tuple(segments))


def bundle_part_to_content(part: BundlePart) -> RecordDict:
    info = ConfigRecord(
        {
            "digest": part.digest,
            "index": part.index,
            "count": part.count,
            "paths": [s.path for s in part.segments],
            "offsets": [s.offset for s in part.segments],
        }
    )
    data = ArrayRecord()
    for number, segment in enumerate(part.segments):
        data[f"segment-{number}"] = Array(np.frombuffer(segment.data, dtype=np.uint8))
    return RecordDict({BUNDLE_INFO: info, BUNDLE_DATA: data})


def bundle_part_from_content(content: RecordDict) -> BundlePart:
    if BUNDLE_INFO not in content.config_records or BUNDLE_DATA not in content.array_records:
        raise WireError(f"bundle part lacks the {BUNDLE_INFO!r} config record or the {BUNDLE_DATA!r} array record")
    info, data = content.config_records[BUNDLE_INFO], content.array_records[BUNDLE_DATA]
    digest, index, count = info.get("digest"), info.get("index"), info.get("count")
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise WireError(f"bundle part: digest {digest!r} is not a sha256 hex digest")
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise WireError(f"bundle part: index {index!r} of {count!r} is out of range")
    paths, offsets = list(info.get("paths", [])), list(info.get("offsets", []))
    if len(paths) != len(offsets) or len(paths) != len(data):
        raise WireError(f"bundle part {index}: {len(paths)} paths, {len(offsets)} offsets, {len(data)} segments")
    segments, total = [], 0
    for number, (path, offset) in enumerate(zip(paths, offsets, strict=True)):
        array = data.get(f"segment-{number}")
        if array is None or array.stype != "numpy.ndarray" or array.dtype != "uint8" or len(array.shape) != 1:
            raise WireError(f"bundle part {index}: segment-{number} is not a 1-d uint8 array")
        if not isinstance(offset, int) or offset < 0:
            raise WireError(f"bundle part {index}: offset {offset!r} of {path!r} is not >= 0")
        payload = array.numpy().tobytes()
        total += len(payload)
        segments.append(Segment(check_relative_path(path), offset, payload))
    if total > MAX_PART_BYTES:
        raise WireError(f"bundle part {index}: {total} bytes is over the {MAX_PART_BYTES}-byte limit")
    return BundlePart(digest, index, count, tuple(segments))
