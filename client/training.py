"""A ``train`` message, the data owner's side: read the instruction and the global adapter, open
the channel the job's modes ask for, tune on local data, reply through the channel, keep an audit
copy. Every failure is a :class:`TrainRefused` with the :class:`ErrorCode` it is answered with.

Imported only by train messages (torch and the tuning stack: seconds on a small node).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
from flwr.app import Context, Message, RecordDict
from safetensors.torch import save_file

from offsite.emulator.data import DataFormatError, read_examples
from offsite.emulator.tune import TuneConfig
from offsite.protocol.bundle import BundleError
from offsite.protocol.envelope import SealError
from offsite.protocol.messages import ADAPTER, CONFIG, ErrorCode, TrainInstruction, WireError
from offsite.protocol.records import RecordError, state_from_record
from offsite.protocol.secagg import SecAggError

from .channels import TunedUpdate, open_channel
from .local import tune_on_bundle
from .secagg_session import SecAggStateError
from .settings import NodeConfigError, NodeSettings

log = logging.getLogger(__name__)


class BundleMissingError(LookupError):
    """The instruction names a bundle this node has not received."""


class TrainRefused(Exception):
    """A train message this node answers with an error reply: ``code`` and a reason naming the bad thing."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code, self.reason = code, reason


def answer_train(message: Message, context: Context, started: float) -> RecordDict:
    """The reply's records (see :mod:`offsite.client.channels`); ``started``: when the handler began."""
    try:
        settings = NodeSettings.from_node_config(context.node_config)
    except NodeConfigError as error:
        raise TrainRefused(ErrorCode.NODE_CONFIG, str(error)) from None
    instruction, global_adapter = read_train_message(message.content)
    try:  # everything this node needs for the instruction's modes, before spending a round's training on it
        channel = open_channel(instruction, settings, message.content, context)
    except NodeConfigError as error:
        raise TrainRefused(ErrorCode.NODE_CONFIG, str(error)) from None
    except (SecAggError, SecAggStateError) as error:
        raise TrainRefused(ErrorCode.SECAGG, str(error)) from None
    try:
        adapter, metrics = train_round(instruction, global_adapter, settings)
        metrics["client-seconds"] = time.perf_counter() - started
        sent = channel.reply(TunedUpdate.of(instruction, global_adapter, adapter, metrics))
        if settings.audit_dir is not None:
            write_audit_copy(settings.audit_dir, instruction, sent.tensors, sent.info)
    except Exception as error:  # noqa: BLE001 - the reply must say what broke, whatever it was
        raise refusal(error, instruction.round) from None
    log.info(
        "round %d: tuned on %d examples, loss %.4f; reply: %s",
        instruction.round,
        metrics.get("num-examples", 0),
        metrics.get("train-loss", float("nan")),
        sent.info["mode"],
    )
    return sent.content


def read_train_message(content: RecordDict) -> tuple[TrainInstruction[TuneConfig], dict[str, torch.Tensor]]:
    """The instruction and the global adapter; BAD_MESSAGE if either does not decode."""
    try:
        if CONFIG not in content.config_records or ADAPTER not in content.array_records:
            raise WireError(f"train message lacks the {CONFIG!r} config record or the {ADAPTER!r} array record")
        instruction = TrainInstruction.from_record(content.config_records[CONFIG], TuneConfig)
        return instruction, state_from_record(content.array_records[ADAPTER])
    except (WireError, RecordError) as error:
        raise TrainRefused(ErrorCode.BAD_MESSAGE, str(error)) from None


def refusal(error: Exception, round_number: int) -> TrainRefused:
    """The error reply for what tuning or replying raised."""
    if isinstance(error, DataFormatError):
        return TrainRefused(ErrorCode.DATA_FORMAT, str(error))
    if isinstance(error, FileNotFoundError):
        return TrainRefused(ErrorCode.DATA_FORMAT, f"{error.filename}: no such data file")
    if isinstance(error, BundleMissingError):
        return TrainRefused(ErrorCode.BUNDLE_MISSING, str(error))
    if isinstance(error, BundleError):
        return TrainRefused(ErrorCode.BUNDLE_INVALID, str(error))
    if isinstance(error, NodeConfigError):
        return TrainRefused(ErrorCode.NODE_CONFIG, str(error))
    if isinstance(error, (SecAggError, SecAggStateError)):
        return TrainRefused(ErrorCode.SECAGG, f"round {round_number}: {error}")
    if isinstance(error, SealError):
        return TrainRefused(ErrorCode.TRAIN_FAILED, f"round {round_number}: cannot seal the update: {error}")
    detail = "".join(traceback.format_exception_only(type(error), error)).strip()
    return TrainRefused(ErrorCode.TRAIN_FAILED, f"round {round_number}: {detail}")


def train_round(
    instruction: TrainInstruction, global_adapter: dict, settings: NodeSettings
) -> tuple[dict, dict[str, float]]:
    """Tune the global adapter on this node's data as ``instruction.tuning`` says (on this node's
    device); return the adapter and its metrics. Pure of Flower: callable from a test or a script
    with a bundle already in the cache."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    bundle = settings.bundle_cache().lookup(instruction.bundle_digest)
    if bundle is None:
        raise BundleMissingError(f"bundle {instruction.bundle_digest[:12]} is not in the cache at {settings.cache_dir}")
    examples = read_examples(settings.data_path, limit=settings.max_examples)
    config = dataclasses.replace(instruction.tuning, device=settings.device)  # the device is this node's choice
    checkpointing = settings.activation_checkpointing
    result = tune_on_bundle(bundle, examples, config, start=global_adapter, progress=False, checkpointing=checkpointing)
    tail = result.losses[-10:]
    metrics = {
        "num-examples": len(examples),
        "train-loss": sum(tail) / len(tail),
        "train-loss-first": result.losses[0],
        "steps": len(result.losses),
        "tokens": result.tokens,
        "seconds": result.seconds,
    }
    return result.adapter, metrics


def write_audit_copy(audit_dir: Path, instruction: TrainInstruction, update: dict, info: dict) -> Path:
    """Keep the update this node sent (:attr:`Sent.tensors`) under ``audit_dir``, mode 0600."""
    audit_dir.mkdir(parents=True, exist_ok=True)
    name = f"{instruction.job_id or instruction.bundle_digest[:16]}-round-{instruction.round:04d}.safetensors"
    handle = tempfile.NamedTemporaryFile(dir=audit_dir, prefix=f".{name}.", delete=False)
    handle.close()
    os.chmod(handle.name, 0o600)
    tensors = {key: tensor.detach().to("cpu").contiguous() for key, tensor in update.items()}
    save_file(tensors, handle.name, metadata={"offsite": json.dumps(info, sort_keys=True)})
    path = audit_dir / name
    os.replace(handle.name, path)
    return path
