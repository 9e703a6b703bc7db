"""A federated job on disk: its settings (``job.json``), its bundle, and its checkpoints.

Job directory layout::

    job.json                         FedJobConfig ({"kind": "federated", ...})
    bundle/                          the emulator bundle sent to data owners
    checkpoints/round-0000.safetensors   the initial global adapter (from the bundle)
    checkpoints/round-NNNN.safetensors   the global adapter after round NNNN
    updates/round-NNNN/node-<id>.safetensors   each client's update (only with record_updates)
    state.json                       the last completed round, its checkpoint's sha256, history

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

from offsite.protocol.adapter import load_update, save_update
from offsite.protocol.bundle import sha256_file

from .aggregate import AGGREGATORS

JOB_FILE = "job.json"
STATE_FILE = "state.json"
BUNDLE_DIR = "bundle"


class JobError(ValueError):
    """A job directory, its job.json or its state.json is unusable; the message names the file."""


@dataclass(frozen=True)
class LocalTuning:
    """What each data owner runs per round (sent in every train message)."""

    steps: int = field(default=10, metadata={"help": "optimizer steps per client per round"})
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "constant"
    max_length: int = 256
    max_grad_norm: float = 1.0
    seed: int = 0  # the round number is added, so rounds draw different batches


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
    tuning: LocalTuning = field(default_factory=LocalTuning)
    lr_schedule: Literal["constant", "cosine"] = field(
        default="constant", metadata={"help": "the clients' lr across rounds: constant, or cosine from tuning.lr to final_lr_ratio * tuning.lr"}
    )
    final_lr_ratio: float = 0.1
    # After the last round (see offsite.cloud.finish): plug the global adapter into this base model
    # and, with an eval test file, write the evaluation. None: the job ends with the checkpoint.
    base_model: str | None = None
    eval_test: str | None = None
    eval_rows: int | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.min_nodes < 1 or self.min_replies < 1:
            raise JobError(f"rounds, min_nodes and min_replies must be >= 1 (got {self.rounds}, {self.min_nodes}, {self.min_replies})")
        if self.min_replies > self.min_nodes:
            raise JobError(f"min_replies {self.min_replies} > min_nodes {self.min_nodes}: a round could never complete")
        if min(self.round_timeout, self.node_wait_timeout, self.bundle_timeout) <= 0:
            raise JobError("timeouts must be > 0")
        if self.aggregator not in AGGREGATORS:
            raise JobError(f"aggregator {self.aggregator!r} is not one of {AGGREGATORS}")
        if self.bundle_part_bytes < 1:
            raise JobError("bundle_part_bytes must be >= 1")
        if self.lr_schedule not in ("constant", "cosine") or not 0 < self.final_lr_ratio <= 1:
            raise JobError(f"lr_schedule must be 'constant' or 'cosine' and 0 < final_lr_ratio <= 1 (got {self.lr_schedule!r}, {self.final_lr_ratio})")
        if self.eval_test is not None and self.base_model is None:
            raise JobError("eval_test needs base_model: the evaluation scores the plugged-in full model")
        if self.eval_rows is not None and self.eval_rows < 1:
            raise JobError(f"eval_rows must be >= 1, got {self.eval_rows}")

    def round_lr(self, round_number: int) -> float:
        """The clients' learning rate in round ``round_number`` (1-based)."""
        if self.lr_schedule == "constant" or self.rounds == 1:
            return self.tuning.lr
        progress = (round_number - 1) / (self.rounds - 1)
        floor = self.final_lr_ratio * self.tuning.lr
        return floor + (self.tuning.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_json(self) -> dict:
        return {"kind": "federated", **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, where: str = JOB_FILE) -> "FedJobConfig":
        data = dict(data)
        if data.pop("kind", None) != "federated":
            raise JobError(f"{where}: 'kind' must be 'federated'")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) - known:
            raise JobError(f"{where}: unknown settings {sorted(set(data) - known)}")
        tuning = data.pop("tuning", {})
        tuning_known = {f.name for f in dataclasses.fields(LocalTuning)}
        if not isinstance(tuning, dict) or set(tuning) - tuning_known:
            raise JobError(f"{where}: unknown tuning settings {sorted(set(tuning) - tuning_known)}")
        try:
            return cls(**data, tuning=LocalTuning(**tuning))
        except TypeError as error:
            raise JobError(f"{where}: {error}") from None


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


def save_checkpoint(job_dir: Path, state: JobState, round_number: int, adapter: dict[str, torch.Tensor], record: dict | None) -> JobState:
    """Write round ``round_number``'s global adapter, then the state file pointing at it; the
    record gets ``checkpoint_seconds`` (writing and hashing the adapter)."""
    started = time.perf_counter()
    path = checkpoint_path(job_dir, round_number)
    tmp = path.with_name(f".{path.name}.tmp")
    save_update(tmp, adapter, {"mode": "blocks", "lora_alpha": None, "bundle": state.bundle, "round": round_number})
    os.replace(tmp, path)
    state.completed_round = round_number
    state.checkpoint = path.relative_to(job_dir).as_posix()
    state.checkpoint_sha256 = sha256_file(path)
    if record is not None:
        record["checkpoint_seconds"] = round(time.perf_counter() - started, 4)
        state.history.append(record)
    _atomic_write_json(Path(job_dir) / STATE_FILE, dataclasses.asdict(state))
    return state


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


def load_checkpoint(job_dir: Path, state: JobState) -> dict[str, torch.Tensor]:
    path = Path(job_dir) / state.checkpoint
    if not path.is_file():
        raise JobError(f"{path}: the checkpoint named in {STATE_FILE} is missing")
    if sha256_file(path) != state.checkpoint_sha256:
        raise JobError(f"{path}: sha256 does not match {STATE_FILE}")
    tensors, meta = load_update(path)
    if meta.get("bundle") != state.bundle:
        raise JobError(f"{path}: tuned on bundle {meta.get('bundle')}, the job's is {state.bundle}")
    return tensors


def record_client_update(job_dir: Path, round_number: int, node_id: int, adapter: dict[str, torch.Tensor], num_examples: int, bundle: str) -> Path:
    return save_update(
        update_path(job_dir, round_number, node_id),
        adapter,
        {"mode": "blocks", "lora_alpha": None, "bundle": bundle, "round": round_number, "node": node_id, "num_examples": num_examples},
    )
