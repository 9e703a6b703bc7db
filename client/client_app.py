"""The data owner's Flower ClientApp (Message API).

Flower starts a fresh process for every message, so nothing is kept in memory between them:
the bundle lives in the on-disk :class:`~offsite.client.bundle_cache.BundleCache`, keyed by digest.

The SuperNode's ``--node-config`` says where things are on this machine; the server never does:

- ``data-path`` (required): the local JSONL training file;
- ``cache-dir``: the bundle cache (default ``$OFFSITE_CACHE/client``, else ``~/.cache/offsite/client``);
- ``device``: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:1``, ...;
- ``threads``: torch CPU threads (default: torch's choice);
- ``max-examples``: read at most this many rows of the data file.

A virtual SuperNode of Flower's simulation engine has no ``--node-config``, only ``partition-id``
and ``num-partitions``: its settings come from the ``$OFFSITE_SIMULATION`` that ``offsite cloud
simulate`` sets on its own host (see :mod:`offsite.protocol.simulation`), never from the coordinator.

Every failure becomes an ``Error`` reply with an :class:`~offsite.protocol.messages.ErrorCode` and a
reason naming the bad thing, so one data owner's broken file never takes the job down.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY

from offsite.protocol.bundle import BundleError
from offsite.protocol.messages import (
    ADAPTER,
    BUNDLE_STATUS,
    CONFIG,
    METRICS,
    ErrorCode,
    TrainInstruction,
    WireError,
    bundle_part_from_content,
)
from offsite.protocol.simulation import SIMULATION_ENV, SimulatedOwners

from .bundle_cache import BundleCache

log = logging.getLogger(__name__)

app = ClientApp()


class NodeConfigError(ValueError):
    """The SuperNode's node config lacks or mangles a setting; the message names the key."""


class BundleMissingError(LookupError):
    """The instruction names a bundle this node has not received."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("OFFSITE_CACHE") or Path.home() / ".cache" / "offsite") / "client"


@dataclass(frozen=True)
class NodeSettings:
    """What a data owner configures on its SuperNode (``--node-config``)."""

    data_path: Path
    cache_dir: Path
    device: str = "auto"
    threads: int | None = None
    max_examples: int | None = None

    @classmethod
    def from_node_config(cls, node_config, environ=None) -> "NodeSettings":
        """From a SuperNode's node config; a virtual node's (``partition-id``, no ``data-path``)
        is first mapped through ``$OFFSITE_SIMULATION`` in ``environ`` (default ``os.environ``)."""
        if "data-path" not in node_config and PARTITION_ID_KEY in node_config:
            node_config = simulated_node_config(node_config, os.environ if environ is None else environ)

        def text(key: str, default: str | None = None) -> str | None:
            value = node_config.get(key, default)
            if value is not None and (not isinstance(value, str) or not value):
                raise NodeConfigError(f"node config {key!r} must be a non-empty string, got {value!r}")
            return value

        def count(key: str) -> int | None:
            value = node_config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise NodeConfigError(f"node config {key!r} must be an integer >= 1, got {value!r}")
            return value

        data = text("data-path")
        if data is None:
            raise NodeConfigError("node config lacks 'data-path' (start the SuperNode with --node-config \"data-path='...'\")")
        cache = text("cache-dir")
        return cls(
            data_path=Path(data).expanduser(),
            cache_dir=Path(cache).expanduser() if cache else default_cache_dir(),
            device=text("device", "auto"),
            threads=count("threads"),
            max_examples=count("max-examples"),
        )


def simulated_node_config(node_config, environ) -> dict:
    """The node config of virtual node ``partition-id``, as ``offsite cloud simulate`` describes it."""
    partition, count = node_config.get(PARTITION_ID_KEY), node_config.get(NUM_PARTITIONS_KEY)
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise NodeConfigError(f"node config {PARTITION_ID_KEY!r} must be an integer >= 0, got {partition!r}")
    if SIMULATION_ENV not in environ:
        raise NodeConfigError(
            f"simulated node (partition-id {partition}) without ${SIMULATION_ENV}: run simulations with `offsite cloud simulate`"
        )
    try:
        owners = SimulatedOwners.from_env(environ[SIMULATION_ENV])
    except ValueError as error:
        raise NodeConfigError(str(error)) from None
    if count is not None and count != owners.num_partitions:
        raise NodeConfigError(f"the simulation runs {count} virtual nodes, ${SIMULATION_ENV} describes {owners.num_partitions} partitions")
    if partition >= owners.num_partitions:
        raise NodeConfigError(f"partition-id {partition} is out of range: ${SIMULATION_ENV} describes {owners.num_partitions} partitions")
    return owners.node_config(partition)


def _error_reply(message: Message, code: ErrorCode, reason: str) -> Message:
    log.warning("replying with error %s: %s", code.name, reason)
    return Message(Error(code=int(code), reason=f"{code.name}: {reason}"), reply_to=message)


# ---------------------------------------------------------------- bundle parts


@app.query("bundle_part")
def receive_bundle_part(message: Message, context: Context) -> Message:
    """Store one part of the emulator bundle; reply with ``partial``/``installed``/``cached``."""
    try:
        settings_cache = NodeSettings.from_node_config(context.node_config).cache_dir
        part = bundle_part_from_content(message.content)
        status = BundleCache(settings_cache).receive(part)
    except NodeConfigError as error:
        return _error_reply(message, ErrorCode.NODE_CONFIG, str(error))
    except (WireError, BundleError) as error:
        return _error_reply(message, ErrorCode.BUNDLE_INVALID, str(error))
    except OSError as error:
        return _error_reply(message, ErrorCode.BUNDLE_INVALID, f"cannot write the bundle cache: {error}")
    return Message(RecordDict({BUNDLE_STATUS: ConfigRecord({"status": status, "digest": part.digest})}), reply_to=message)


# ---------------------------------------------------------------- train


def train_round(instruction: TrainInstruction, global_adapter: dict, settings: NodeSettings) -> tuple[dict, dict[str, float]]:
    """Tune the global adapter on this node's data; return the adapter and its metrics.

    Pure of Flower: callable from a test or a script with a bundle already in the cache.
    """
    import torch

    from offsite.emulator.data import read_examples
    from offsite.emulator.tune import TuneConfig

    from .local import tune_on_bundle

    if settings.threads:
        torch.set_num_threads(settings.threads)
    bundle = BundleCache(settings.cache_dir).lookup(instruction.bundle_digest)
    if bundle is None:
        raise BundleMissingError(f"bundle {instruction.bundle_digest[:12]} is not in the cache at {settings.cache_dir}")
    examples = read_examples(settings.data_path, limit=settings.max_examples)
    config = TuneConfig(
        steps=instruction.steps,
        batch_size=instruction.batch_size,
        lr=instruction.lr,
        warmup_steps=instruction.warmup_steps,
        schedule=instruction.schedule,
        max_length=instruction.max_length,
        max_grad_norm=instruction.max_grad_norm,
        mode="blocks",
        seed=instruction.seed,
        device=settings.device,
    )
    result = tune_on_bundle(bundle, examples, config, start=global_adapter, progress=False)
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


@app.train()
def train(message: Message, context: Context) -> Message:
    """Receive the global adapter and the round's instruction; reply with the tuned adapter."""
    from offsite.emulator.data import DataFormatError
    from offsite.protocol.records import RecordError, state_from_record, state_to_record

    started = time.perf_counter()
    try:
        settings = NodeSettings.from_node_config(context.node_config)
    except NodeConfigError as error:
        return _error_reply(message, ErrorCode.NODE_CONFIG, str(error))
    try:
        if CONFIG not in message.content.config_records or ADAPTER not in message.content.array_records:
            raise WireError(f"train message lacks the {CONFIG!r} config record or the {ADAPTER!r} array record")
        instruction = TrainInstruction.from_record(message.content.config_records[CONFIG])
        global_adapter = state_from_record(message.content.array_records[ADAPTER])
    except (WireError, RecordError) as error:
        return _error_reply(message, ErrorCode.BAD_MESSAGE, str(error))
    try:
        adapter, metrics = train_round(instruction, global_adapter, settings)
    except DataFormatError as error:
        return _error_reply(message, ErrorCode.DATA_FORMAT, str(error))
    except FileNotFoundError as error:
        return _error_reply(message, ErrorCode.DATA_FORMAT, f"{error.filename}: no such data file")
    except BundleMissingError as error:
        return _error_reply(message, ErrorCode.BUNDLE_MISSING, str(error))
    except BundleError as error:
        return _error_reply(message, ErrorCode.BUNDLE_INVALID, str(error))
    except Exception as error:  # noqa: BLE001 - the reply must say what broke, whatever it was
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        return _error_reply(message, ErrorCode.TRAIN_FAILED, f"round {instruction.round}: {detail}")
    metrics["client-seconds"] = time.perf_counter() - started
    log.info("round %d: tuned on %d examples, loss %.4f", instruction.round, metrics["num-examples"], metrics["train-loss"])
    content = RecordDict({ADAPTER: state_to_record(adapter), METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=message)
