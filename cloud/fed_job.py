"""A federated job on disk: its settings (``job.json``), its bundle, and its checkpoints.

Job directory layout::

    job.json                         FedJobConfig ({"kind": "federated", ...})
    bundle/                          the emulator bundle sent to data owners
    checkpoints/round-0000.safetensors   the initial global adapter (from the bundle)
    checkpoints/round-NNNN.safetensors   the global adapter after round NNNN
    updates/round-NNNN/node-<id>.safetensors   each client's update (only with record_updates)
    state.json                       the last completed round, its checkpoint's sha256, history
                                     (and, with DP, the privacy accountant)
    replay.jsonl                     update envelopes accepted so far (with envelopes: a replay is refused)

``state.json`` is replaced atomically after the round's checkpoint is on disk, so a ServerApp
that dies mid-round resumes from the last completed round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from offsite.emulator.tune import TuneConfig
from offsite.protocol.adapter import load_update, save_update
from offsite.protocol.bundle import sha256_file
from offsite.protocol.config_record import config_from_dict
from offsite.protocol.dp_config import DPConfig
from offsite.protocol.ids import DP_MODES, JOB_ID
from offsite.protocol.messages import MAX_PART_BYTES, TrainInstruction

from .aggregate import AGGREGATORS
from .presets import check_gain

JOB_FILE = "job.json"
LORA_AGGREGATIONS = ("frozen-a", "stack", "factors")
STATE_FILE = "state.json"
BUNDLE_DIR = "bundle"
REPLAY_FILE = "replay.jsonl"


class JobError(ValueError):
    """A job directory, its job.json or its state.json is unusable; the message names the file."""


# What each data owner runs per round unless the job says otherwise (job.json's "tuning"); the
# job sends it with every round's learning rate (lr_schedule) and seed (tuning.seed + round).
FEDERATED_TUNING = TuneConfig(steps=10, batch_size=8, warmup_steps=0, schedule="constant")


@dataclass(frozen=True)
class SecurityConfig:
    """What protects the updates of a job (all off by default; see docs/security.md).

    Envelopes: each client seals its update to the coordinator's X25519 key and signs it with its
    enrolled Ed25519 identity (:mod:`offsite.protocol.envelope`); the coordinator opens it with
    the keys in ``keys_dir`` and the senders in ``registry`` (re-read every round, so a revocation
    applies from the next round on), and refuses, with a reason, anything else.

    Secure aggregation: pairwise masking (:mod:`offsite.protocol.secagg`); the coordinator learns
    only the weighted sum of the clients' deltas (tuned - global), quantised after clipping every
    coordinate to ``[-secagg_clip_range, secagg_clip_range]`` in a ring of ``secagg_ring_bits``.
    Each round's threshold is ``max(secagg_threshold, n // 2 + 1)`` for the ``n`` nodes invited.

    Differential privacy (``dp_clip_norm`` set): each client clips its delta to L2 norm
    ``dp_clip_norm`` and adds Gaussian noise (:mod:`offsite.protocol.dp`); ``dp_mode`` ``local``
    (noise multiplier ``dp_noise_multiplier`` on every update) or ``distributed`` (the sum of at
    least ``min_replies`` updates carries that multiplier; needs secure aggregation). The
    coordinator accounts epsilon at ``dp_delta`` after every round.
    """

    envelopes: bool = False
    keys_dir: str | None = None  # `offsite cloud keys --out DIR`: opens envelopes, signs the bundle
    registry: str | None = None  # sender registry JSON (`offsite cloud enroll --registry FILE`)
    max_update_norm: float | None = None  # L2 norm of (update - global adapter); None: not checked
    max_payload_bytes: int | None = None  # None: the adapter's own size plus a small margin
    secure_aggregation: bool = False
    secagg_clip_range: float = 1.0
    secagg_ring_bits: int = 64
    secagg_threshold: int = 2
    secagg_max_weight: int = 1 << 20  # the largest example count a client may weigh in with
    dp_clip_norm: float | None = None  # None: no differential privacy
    dp_noise_multiplier: float = 1.0
    dp_mode: Literal["local", "distributed"] = "local"
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        """The contradictions among these settings; those with the rest of the job are FedJobConfig's."""
        if self.envelopes and (self.keys_dir is None or self.registry is None):
            raise JobError(
                "envelopes need the coordinator's keys (security.keys_dir, --keys) and the sender registry "
                "(security.registry, --registry)"
            )
        if self.max_update_norm is not None and not (math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise JobError(f"max_update_norm must be a finite number > 0, got {self.max_update_norm}")
        if (self.max_update_norm is not None or self.max_payload_bytes is not None) and not self.envelopes:
            raise JobError(
                "max_update_norm and max_payload_bytes are checked when envelopes are opened: turn envelopes on"
            )
        if self.max_payload_bytes is not None and self.max_payload_bytes < 1024:
            raise JobError(f"max_payload_bytes must be >= 1024, got {self.max_payload_bytes}")
        if self.dp_mode not in DP_MODES:
            raise JobError(f"dp_mode must be one of {DP_MODES}, got {self.dp_mode!r}")
        if self.secure_aggregation:
            self._check_secure_aggregation()
        if self.dp:
            self._check_dp()

    def _check_secure_aggregation(self) -> None:
        if not (math.isfinite(self.secagg_clip_range) and self.secagg_clip_range > 0):
            raise JobError(f"secagg_clip_range must be a finite number > 0, got {self.secagg_clip_range}")
        if self.secagg_ring_bits not in (32, 64):
            raise JobError(f"secagg_ring_bits must be 32 or 64, got {self.secagg_ring_bits}")
        if self.secagg_threshold < 2:
            raise JobError(
                f"secagg_threshold must be >= 2 (one client's sum is its update), got {self.secagg_threshold}"
            )
        if not 1 <= self.secagg_max_weight <= 1 << 40:
            raise JobError(f"secagg_max_weight must be in [1, 2**40], got {self.secagg_max_weight}")

    def _check_dp(self) -> None:
        """The job's use of the DP mechanism; the mechanism's own settings are :class:`DPConfig`'s to check."""
        if self.dp_mode == "distributed" and not self.secure_aggregation:
            raise JobError("dp_mode 'distributed' adds noise only the sum has enough of: it needs secure aggregation")
        noise = self.dp_noise_multiplier
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise > 0):
            raise JobError(
                f"dp_noise_multiplier must be a finite number > 0 (for clipping alone use max_update_norm), got {noise}"
            )
        if not 0 < self.dp_delta < 1:
            raise JobError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        try:
            self.dp_config(1)
        except ValueError as error:
            raise JobError(f"DP settings: {error}") from None
        if self.max_update_norm is not None and self.max_update_norm < self.dp_clip_norm:
            raise JobError(
                f"max_update_norm {self.max_update_norm:g} < dp_clip_norm {self.dp_clip_norm:g}: clipped updates "
                "(plus their noise) would be refused"
            )
        if self.secure_aggregation and self.secagg_clip_range < self.dp_clip_norm:
            raise JobError(
                f"secagg_clip_range {self.secagg_clip_range:g} < dp_clip_norm {self.dp_clip_norm:g}: "
                "a clipped update's coordinates may reach the clip norm"
            )

    @property
    def dp(self) -> bool:
        return self.dp_clip_norm is not None

    def dp_config(self, min_replies: int) -> DPConfig | None:
        """The clients' DP mechanism (``min_clients``: the updates a completed round's sum holds)."""
        if self.dp_clip_norm is None:
            return None
        min_clients = min_replies if self.dp_mode == "distributed" else 1
        return DPConfig(self.dp_clip_norm, self.dp_noise_multiplier, self.dp_mode, min_clients)


@dataclass(frozen=True)
class FedJobConfig:
    rounds: int = field(default=3, metadata={"help": "federated rounds"})
    min_nodes: int = field(default=2, metadata={"help": "connected SuperNodes to wait for before a round"})
    min_replies: int = field(default=1, metadata={"help": "successful replies needed to complete a round"})
    round_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for train replies"})
    node_wait_timeout: float = field(default=300.0, metadata={"help": "seconds to wait for min_nodes"})
    bundle_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for bundle-part replies"})
    bundle_part_bytes: int = field(default=32 << 20, metadata={"help": "bytes of bundle per message"})
    aggregator: Literal["fedavg", "trimmed-mean", "median"] = "fedavg"
    trim_fraction: float = 0.1
    record_updates: bool = field(default=False, metadata={"help": "keep every client's update under updates/"})
    tuning: TuneConfig = field(
        default=FEDERATED_TUNING,
        metadata={"help": "each data owner's local tuning per round (whole adapter blocks, or LoRA inside them)"},
    )
    # LoRA jobs (tuning.mode "lora"): how the owners' factors make the global update (docs/federated.md)
    lora_aggregation: Literal["frozen-a", "stack", "factors"] = "frozen-a"
    lr_schedule: Literal["constant", "cosine"] = field(
        default="constant",
        metadata={"help": "the clients' lr across rounds: constant, or cosine down to final_lr_ratio * tuning.lr"},
    )
    final_lr_ratio: float = 0.1
    # After the last round (see offsite.cloud.finish): plug the global adapter into this base model
    # and, with an eval test file, write the evaluation. None: the job ends with the checkpoint.
    base_model: str | None = None
    eval_test: str | None = None
    eval_rows: int | None = None
    plugin_gain: float = field(default=1.0, metadata={"help": "plug in real + gain * (global adapter - real)"})
    # Binds every envelope and secure-aggregation session to this job (uuid4 hex from `offsite
    # cloud prepare`); needed by envelopes and secure aggregation.
    job_id: str | None = None
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.min_nodes < 1 or self.min_replies < 1:
            raise JobError(
                "rounds, min_nodes and min_replies must be >= 1 "
                f"(got {self.rounds}, {self.min_nodes}, {self.min_replies})"
            )
        if self.min_replies > self.min_nodes:
            raise JobError(f"min_replies {self.min_replies} > min_nodes {self.min_nodes}: a round could never complete")
        if min(self.round_timeout, self.node_wait_timeout, self.bundle_timeout) <= 0:
            raise JobError("timeouts must be > 0")
        if self.aggregator not in AGGREGATORS:
            raise JobError(f"aggregator {self.aggregator!r} is not one of {AGGREGATORS}")
        if not 1 <= self.bundle_part_bytes <= MAX_PART_BYTES:
            # a larger part is refused by every data owner (protocol.messages), so no round could start
            raise JobError(
                f"bundle_part_bytes must be between 1 and {MAX_PART_BYTES} (the largest part a data owner "
                f"accepts), got {self.bundle_part_bytes}"
            )
        if self.lr_schedule not in ("constant", "cosine") or not 0 < self.final_lr_ratio <= 1:
            raise JobError(
                "lr_schedule must be 'constant' or 'cosine' and 0 < final_lr_ratio <= 1 "
                f"(got {self.lr_schedule!r}, {self.final_lr_ratio})"
            )
        if self.eval_test is not None and self.base_model is None:
            raise JobError("eval_test needs base_model: the evaluation scores the plugged-in full model")
        if self.eval_rows is not None and self.eval_rows < 1:
            raise JobError(f"eval_rows must be >= 1, got {self.eval_rows}")
        try:
            check_gain(self.plugin_gain)
        except ValueError as error:
            raise JobError(str(error)) from None
        self._check_tuning()
        self._check_security()

    def _check_tuning(self) -> None:
        """What a federated round can carry of a :class:`TuneConfig` (which checks itself)."""
        if self.lora_aggregation not in LORA_AGGREGATIONS:
            raise JobError(f"lora_aggregation {self.lora_aggregation!r} is not one of {LORA_AGGREGATIONS}")
        if self.tuning.mode == "lora":
            self._check_lora()
        if self.tuning.device != "auto":
            raise JobError(f"tuning.device {self.tuning.device!r}: each data owner picks its own (node config)")

    def _check_lora(self) -> None:
        """A LoRA job's aggregation against its tuning and security settings."""
        lora, frozen = self.tuning.lora, self.lora_aggregation == "frozen-a"
        if lora.freeze_a != frozen:
            raise JobError(f"tuning.lora.freeze_a must be {frozen} with lora_aggregation {self.lora_aggregation!r}")
        if frozen and lora.init_seed is None:
            raise JobError("lora_aggregation 'frozen-a' shares A through the job: set tuning.lora.init_seed")
        sec = self.security
        if self.lora_aggregation != "frozen-a" and (sec.secure_aggregation or sec.dp):
            raise JobError(
                f"lora_aggregation {self.lora_aggregation!r} cannot go with secure aggregation or DP: they only "
                "yield the sum of what the owners send, and the sum of the factors is not the sum of the updates "
                "(B A is not linear in the factors); use 'frozen-a' (A fixed, B trained: the mean of B is exact)"
            )
        if self.lora_aggregation == "stack" and self.aggregator != "fedavg":
            raise JobError("lora_aggregation 'stack' is an exact weighted mean: aggregator must be 'fedavg'")

    def _check_security(self) -> None:
        """Contradictions between the security settings and the rest of the job."""
        sec = self.security
        if self.job_id is not None and (not isinstance(self.job_id, str) or not JOB_ID.match(self.job_id)):
            raise JobError(
                f"job_id {self.job_id!r}: use 1-128 of A-Z a-z 0-9 . _ : - (starting with a letter or digit)"
            )
        if (sec.envelopes or sec.secure_aggregation) and self.job_id is None:
            raise JobError(
                "envelopes and secure aggregation bind every update to the job: "
                "set job_id (offsite cloud prepare makes one)"
            )
        if sec.secure_aggregation and self.aggregator != "fedavg":
            raise JobError(
                f"secure aggregation computes a weighted sum: aggregator must be 'fedavg', not {self.aggregator!r}"
            )
        if sec.secure_aggregation and self.record_updates:
            raise JobError(
                "record_updates contradicts secure aggregation: the coordinator never holds an individual update"
            )
        if sec.secure_aggregation and self.min_replies < sec.secagg_threshold:
            raise JobError(
                f"min_replies {self.min_replies} < secagg_threshold {sec.secagg_threshold}: a round needs at least "
                "the threshold's clients to unmask the sum"
            )
        if sec.dp and self.aggregator != "fedavg":
            raise JobError(
                "DP accounting holds for the mean of the clipped updates: aggregator must be 'fedavg', "
                f"not {self.aggregator!r}"
            )

    def round_lr(self, round_number: int) -> float:
        """The clients' learning rate in round ``round_number`` (1-based)."""
        if self.lr_schedule == "constant" or self.rounds == 1:
            return self.tuning.lr
        progress = (round_number - 1) / (self.rounds - 1)
        floor = self.final_lr_ratio * self.tuning.lr
        return floor + (self.tuning.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def round_tuning(self, round_number: int) -> TuneConfig:
        """The data owners' tuning in round ``round_number``: the round's lr, seed ``tuning.seed + round``
        (so rounds draw different batches)."""
        return dataclasses.replace(self.tuning, lr=self.round_lr(round_number), seed=self.tuning.seed + round_number)

    def instruction(self, round_number: int, bundle_digest: str) -> TrainInstruction[TuneConfig]:
        """What every data owner is told in round ``round_number``."""
        sec = self.security
        return TrainInstruction(
            round=round_number,
            bundle_digest=bundle_digest,
            tuning=self.round_tuning(round_number),
            job_id=self.job_id or "",
            envelope=sec.envelopes,
            secagg=sec.secure_aggregation,
            dp=sec.dp_config(self.min_replies),
        )

    def to_json(self) -> dict:
        return {"kind": "federated", **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, where: str = JOB_FILE) -> FedJobConfig:
        """A job.json's settings; a missing one takes its default (in ``tuning``: ``FEDERATED_TUNING``'s),
        so a job.json written before a setting existed still reads."""
        if not isinstance(data, dict) or data.get("kind") != "federated":
            raise JobError(f"{where}: 'kind' must be 'federated'")
        try:
            return config_from_dict(cls, {key: value for key, value in data.items() if key != "kind"})
        except ValueError as error:  # JobError, a bad or unknown setting, a nested config's refusal
            raise JobError(f"{where}: {error}") from None


def job_path(job_dir: Path, value: str) -> Path:
    """A path named in job.json: absolute as written, else relative to the job directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(job_dir) / path


def write_job(job_dir: Path, config: FedJobConfig) -> Path:
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    return _atomic_write_json(job_dir / JOB_FILE, config.to_json())


def read_job(job_dir: Path) -> FedJobConfig:
    path = Path(job_dir) / JOB_FILE
    if not path.is_file():
        raise JobError(f"{path}: missing (write it with offsite.cloud.fed_job.write_job)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise JobError(f"{path}: not valid JSON ({error})") from None
    return FedJobConfig.from_json(data, str(path))


def _atomic_write_json(path: Path, value) -> Path:
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False)
    with handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)
    return path


# ---------------------------------------------------------------- checkpoints and state


def checkpoint_path(job_dir: Path, round_number: int) -> Path:
    return Path(job_dir) / "checkpoints" / f"round-{round_number:04d}.safetensors"


def update_path(job_dir: Path, round_number: int, node_id: int) -> Path:
    return Path(job_dir) / "updates" / f"round-{round_number:04d}" / f"node-{node_id}.safetensors"


@dataclass
class JobState:
    """What survives a ServerApp restart."""

    bundle: str  # digest
    completed_round: int = 0
    checkpoint: str = ""  # relative to the job dir
    checkpoint_sha256: str = ""
    nodes_with_bundle: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    privacy: dict = field(default_factory=dict)  # with DP: PrivacyAccountant.to_json() after the last completed round


BLOCKS = {"mode": "blocks", "lora_alpha": None}


def save_checkpoint(
    job_dir: Path,
    state: JobState,
    round_number: int,
    adapter: dict[str, torch.Tensor],
    record: dict | None,
    kind: dict | None = None,
) -> JobState:
    """Write round ``round_number``'s global adapter, then the state file pointing at it; the
    record gets ``checkpoint_seconds`` (writing and hashing the adapter). ``kind``: the update
    file's ``mode`` and ``lora_alpha`` (whole blocks unless given: a LoRA job's factors)."""
    started = time.perf_counter()
    path = checkpoint_path(job_dir, round_number)
    tmp = path.with_name(f".{path.name}.tmp")
    save_update(tmp, adapter, {**(kind or BLOCKS), "bundle": state.bundle, "round": round_number})
    os.replace(tmp, path)
    state.completed_round = round_number
    state.checkpoint = path.relative_to(job_dir).as_posix()
    state.checkpoint_sha256 = sha256_file(path)
    if record is not None:
        record["checkpoint_seconds"] = round(time.perf_counter() - started, 4)
        state.history.append(record)
    _atomic_write_json(Path(job_dir) / STATE_FILE, dataclasses.asdict(state))
    return state


def save_state(job_dir: Path, state: JobState) -> Path:
    """Write ``state.json`` as it is (no new round): e.g. the privacy a failed round spent."""
    return _atomic_write_json(Path(job_dir) / STATE_FILE, dataclasses.asdict(state))


def load_state(job_dir: Path) -> JobState | None:
    path = Path(job_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        state = JobState(**data)
    except (json.JSONDecodeError, TypeError) as error:
        raise JobError(f"{path}: unreadable ({error})") from None
    return state


def load_checkpoint(job_dir: Path, state: JobState) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint ``state`` names, checked against its sha256 and bundle: (tensors, metadata)."""
    path = Path(job_dir) / state.checkpoint
    if not path.is_file():
        raise JobError(f"{path}: the checkpoint named in {STATE_FILE} is missing")
    if sha256_file(path) != state.checkpoint_sha256:
        raise JobError(f"{path}: sha256 does not match {STATE_FILE}")
    tensors, meta = load_update(path)
    if meta.get("bundle") != state.bundle:
        raise JobError(f"{path}: tuned on bundle {meta.get('bundle')}, the job's is {state.bundle}")
    return tensors, meta


def record_client_update(
    job_dir: Path,
    round_number: int,
    node_id: int,
    adapter: dict[str, torch.Tensor],
    num_examples: int,
    bundle: str,
    kind: dict | None = None,
) -> Path:
    return save_update(
        update_path(job_dir, round_number, node_id),
        adapter,
        {
            **(kind or BLOCKS),
            "bundle": bundle,
            "round": round_number,
            "node": node_id,
            "num_examples": num_examples,
        },
    )
