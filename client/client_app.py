"""The data owner's Flower ClientApp (Message API).

Flower starts a fresh process for every message, so nothing is kept in memory between them:
the bundle lives in the on-disk :class:`~offsite.client.bundle_cache.BundleCache`, keyed by digest.

The SuperNode's ``--node-config`` says where things are on this machine; the server never does:

- ``data-path`` (required): the local JSONL training file;
- ``cache-dir``: the bundle cache (default ``$OFFSITE_CACHE/client``, else ``~/.cache/offsite/client``);
- ``device``: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:1``, ...;
- ``threads``: torch CPU threads (default: torch's choice);
- ``max-examples``: read at most this many rows of the data file;
- ``identity-dir``: this data owner's signing identity (``offsite client enroll --out DIR``),
  needed when the job seals updates in envelopes;
- ``coordinator-key``: the coordinator's public keys (``coordinator.pub.json``, or its directory),
  pinned by the data owner out of band, never taken from a message: updates are sealed to it,
  and every bundle must carry its signature (``manifest.sig``) before it is installed or used;
- ``audit-dir``: keep a copy of every update this node sent (as it left the node, before
  sealing or masking), ``<job>-round-NNNN.safetensors``, mode 0600.

What a train reply carries depends on the instruction's modes (see :mod:`offsite.protocol.messages`):
with envelopes, only the sealed update, its metrics sealed with it (``client-seconds`` outside);
with secure aggregation, only the masked delta; with DP, the delta is clipped and noised here,
before anything else, and no data-dependent metric (example count, loss) leaves the node.

A virtual SuperNode of Flower's simulation engine has no ``--node-config``, only ``partition-id``
and ``num-partitions``: its settings come from the ``$OFFSITE_SIMULATION`` that ``offsite cloud
simulate`` sets on its own host (see :mod:`offsite.protocol.simulation`), never from the coordinator.

Every failure becomes an ``Error`` reply with an :class:`~offsite.protocol.messages.ErrorCode` and a
reason naming the bad thing, so one data owner's broken file never takes the job down.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY

from offsite.protocol.bundle import BundleError
from offsite.protocol.keys import ClientIdentity, CoordinatorPublicKeys, KeyFileError
from offsite.protocol.messages import (
    ADAPTER,
    BUNDLE_STATUS,
    CONFIG,
    METRICS,
    SECAGG_ROUND,
    ErrorCode,
    TrainInstruction,
    WireError,
    bundle_part_from_content,
    secagg_session,
)
from offsite.protocol.simulation import SIMULATION_ENV, SimulatedOwners

from .bundle_cache import BundleCache

if TYPE_CHECKING:
    from offsite.protocol.secagg import SecAggClient, ShareBundle

log = logging.getLogger(__name__)

app = ClientApp()


class NodeConfigError(ValueError):
    """The SuperNode's node config lacks or mangles a setting; the message names the key."""


class BundleMissingError(LookupError):
    """The instruction names a bundle this node has not received."""


class SecAggStateError(ValueError):
    """A secure-aggregation message arrived for a session this node holds no state of."""


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
    identity_dir: Path | None = None
    coordinator_key: Path | None = None
    audit_dir: Path | None = None

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

        def path(key: str) -> Path | None:
            value = text(key)
            return Path(value).expanduser() if value else None

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
            identity_dir=path("identity-dir"),
            coordinator_key=path("coordinator-key"),
            audit_dir=path("audit-dir"),
        )

    def coordinator(self) -> CoordinatorPublicKeys | None:
        """The pinned coordinator public keys (None when ``coordinator-key`` is not set)."""
        if self.coordinator_key is None:
            return None
        try:
            return CoordinatorPublicKeys.load(self.coordinator_key)
        except KeyFileError as error:
            raise NodeConfigError(f"node config 'coordinator-key': {error}") from None

    def identity(self) -> ClientIdentity:
        """This data owner's signing identity; NodeConfigError if not configured or unreadable."""
        if self.identity_dir is None:
            raise NodeConfigError("the job seals updates in envelopes but node config lacks 'identity-dir' (offsite client enroll --out DIR)")
        try:
            return ClientIdentity.load(self.identity_dir)
        except KeyFileError as error:
            raise NodeConfigError(f"node config 'identity-dir': {error}") from None

    def bundle_cache(self) -> BundleCache:
        """The bundle cache, verifying signatures with the pinned coordinator key (if any)."""
        return BundleCache(self.cache_dir, self.coordinator())


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
        cache = NodeSettings.from_node_config(context.node_config).bundle_cache()
        part = bundle_part_from_content(message.content)
        status = cache.receive(part)
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

    from .local import tune_on_bundle

    if settings.threads:
        torch.set_num_threads(settings.threads)
    bundle = settings.bundle_cache().lookup(instruction.bundle_digest)
    if bundle is None:
        raise BundleMissingError(f"bundle {instruction.bundle_digest[:12]} is not in the cache at {settings.cache_dir}")
    examples = read_examples(settings.data_path, limit=settings.max_examples)
    config = dataclasses.replace(instruction.tuning, device=settings.device)  # the device is this node's choice
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


# ---------------------------------------------------------------- what a train reply carries

# metrics that depend only on timing; with DP nothing else leaves the node (the example count and
# the loss are functions of the data that the DP mechanism does not cover)
TIMING_METRICS = ("seconds", "client-seconds")


def update_reply(
    instruction: TrainInstruction,
    global_adapter: dict,
    tuned: dict,
    metrics: dict[str, float],
    *,
    identity: ClientIdentity | None = None,
    coordinator: CoordinatorPublicKeys | None = None,
    secagg: SecAggClient | None = None,
    share_bundle: ShareBundle | None = None,
    noise_seed: int | None = None,
) -> tuple[RecordDict, dict, dict]:
    """The train reply's records for ``instruction``'s modes, the update as it left this node
    (before sealing or masking: what :func:`write_audit_copy` keeps: the adapter, or with secure
    aggregation the float64 delta), and a description of it for the audit copy (``mode``, and
    with secure aggregation the ``weight`` it was masked with and how many values were ``clipped``).

    Pure of Flower processes (no message, no context): DP first (``tuned - global`` clipped and
    noised; ``noise_seed`` for tests only), then either the masked delta (secure aggregation;
    ``secagg`` at stage ``shared`` and this round's ``share_bundle``), or the adapter in the
    global adapter's dtypes, sealed in an envelope (``identity``, ``coordinator``) or plain.
    """
    from offsite.protocol.dp import privatize_update, update_delta
    from offsite.protocol.envelope import seal_update
    from offsite.protocol.envelope_wire import ENVELOPE, envelope_to_record
    from offsite.protocol.records import state_to_record

    if instruction.envelope and (identity is None or coordinator is None):
        raise NodeConfigError("the job seals updates in envelopes: this node needs 'identity-dir' and 'coordinator-key'")
    private = None
    if instruction.dp is not None:
        config = instruction.dp
        private = privatize_update(tuned, global_adapter, config, seed=noise_seed)
        log.info("round %d: DP: update norm %.4g %s to %g, noise std %.4g", instruction.round, private.norm,
                 "clipped" if private.clipped else "within", config.clip_norm, private.noise_std)
        metrics = {key: value for key, value in metrics.items() if key in TIMING_METRICS}
    info = {"job": instruction.job_id, "round": instruction.round, "dp": instruction.dp is not None}

    if instruction.secagg:
        from offsite.protocol.secagg import masked_input_tensors, to_content

        if secagg is None or share_bundle is None:
            raise SecAggStateError(f"round {instruction.round}: secure aggregation without this node's session state or share bundle")
        delta = private.delta if private is not None else update_delta(tuned, global_adapter)
        weight = 1 if instruction.dp is not None else int(metrics["num-examples"])
        masked = secagg.masked_input(share_bundle, delta, weight)
        if secagg.clipped:
            log.warning("round %d: %d value(s) of the delta clipped to the secure-aggregation range %g",
                        instruction.round, secagg.clipped, secagg.config.clip_range)
        info |= {"mode": "secagg", "weight": weight, "clipped": secagg.clipped}
        public = {key: value for key, value in metrics.items() if key == "client-seconds"}  # what the relay sees anyway
        if instruction.envelope:
            sealed = seal_update(
                masked_input_tensors(masked), job=instruction.job_id, round=instruction.round, identity=identity, recipient=coordinator,
            )
            content = RecordDict({ENVELOPE: envelope_to_record(sealed), METRICS: MetricRecord(public)})
        else:
            content = to_content(masked)
            content[METRICS] = MetricRecord(public)
        return content, delta, info

    if private is not None:
        update = private.adapter(global_adapter)
    else:
        update = {key: tuned[key].detach().to("cpu", reference.dtype) for key, reference in global_adapter.items()}
    info |= {"mode": "envelope" if instruction.envelope else "plain"}
    if instruction.envelope:
        sealed_metrics = {key: value for key, value in metrics.items() if key != "client-seconds"}
        sealed = seal_update(
            update, job=instruction.job_id, round=instruction.round, identity=identity, recipient=coordinator, metadata=sealed_metrics,
        )
        public = {key: value for key, value in metrics.items() if key == "client-seconds"}
        content = RecordDict({ENVELOPE: envelope_to_record(sealed), METRICS: MetricRecord(public)})
    else:
        content = RecordDict({ADAPTER: state_to_record(update), METRICS: MetricRecord(metrics)})
    return content, update, info


def write_audit_copy(audit_dir: Path, instruction: TrainInstruction, update: dict, info: dict) -> Path:
    """Keep the update this node sent (``update_reply``'s second value) under ``audit_dir``, 0600."""
    import json
    import tempfile

    from safetensors.torch import save_file

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


# ---------------------------------------------------------------- secure aggregation (stages 0, 1, 3)

SECAGG_STATE = "offsite-secagg"  # context.state key: {"job", "round", "client": SecAggClient.to_bytes()}


def secagg_round_of(content: RecordDict) -> tuple[str, int]:
    """``(job id, round)`` of a secure-aggregation query."""
    if SECAGG_ROUND not in content.config_records:
        raise WireError(f"secure-aggregation query lacks the {SECAGG_ROUND!r} config record")
    record = content.config_records[SECAGG_ROUND]
    job, round_number = record.get("job-id"), record.get("round")
    if not isinstance(job, str) or isinstance(round_number, bool) or not isinstance(round_number, int):
        raise WireError(f"{SECAGG_ROUND!r}: expected a job-id string and a round integer")
    secagg_session(job, round_number)  # validates both
    return job, round_number


def load_secagg_client(context: Context, job: str, round_number: int):
    """This node's session of ``job``'s round ``round_number``, kept in ``context.state``.

    Flower 1.41's SuperNode keeps a run's ``context.state`` in its own memory between the
    messages of the run (``NodeState.set_run_series_context`` after each ClientApp returns);
    it holds private keys and shares, never leaves this machine (the SuperNode talks to its
    ClientApp processes on loopback) and is gone when the SuperNode restarts (the round then
    counts this node as dropped).
    """
    from offsite.protocol.secagg import SecAggClient

    if SECAGG_STATE not in context.state.config_records:
        raise SecAggStateError(f"no secure-aggregation session state on this node for job {job} round {round_number}")
    record = context.state.config_records[SECAGG_STATE]
    if record.get("job") != job or record.get("round") != round_number:
        raise SecAggStateError(
            f"this node's secure-aggregation session is job {record.get('job')} round {record.get('round')}, not job {job} round {round_number}"
        )
    return SecAggClient.from_bytes(record["client"])


def save_secagg_client(context: Context, job: str, round_number: int, client) -> None:
    if client.stage == "done":
        if SECAGG_STATE in context.state.config_records:
            del context.state[SECAGG_STATE]
        return
    context.state[SECAGG_STATE] = ConfigRecord({"job": job, "round": round_number, "client": client.to_bytes()})


@app.query("secagg")
def secagg_stage(message: Message, context: Context) -> Message:
    """Secure aggregation's stages 0 (advertise keys), 1 (share keys) and 3 (unmask)."""
    from offsite.protocol.secagg import (
        SECAGG,
        KeyRoster,
        SecAggClient,
        SecAggError,
        SetupRequest,
        UnmaskRequest,
        from_content,
        to_content,
    )

    try:
        job, round_number = secagg_round_of(message.content)
        kind = message.content.config_records[SECAGG].get("kind") if SECAGG in message.content.config_records else None
        if kind == SetupRequest.KIND:
            request = from_content(message.content, SetupRequest)
            if request.config.session != secagg_session(job, round_number):
                raise SecAggError(f"the setup's session is not job {job} round {round_number}'s")
            client = SecAggClient(context.node_id)
            reply = client.advertise(request)
        elif kind == KeyRoster.KIND:
            client = load_secagg_client(context, job, round_number)
            reply = client.share_keys(from_content(message.content, KeyRoster))
        elif kind == UnmaskRequest.KIND:
            client = load_secagg_client(context, job, round_number)
            reply = client.unmask(from_content(message.content, UnmaskRequest))
        else:
            raise SecAggError(f"not a secure-aggregation stage 0, 1 or 3 message: kind {str(kind)[:40]!r}")
        save_secagg_client(context, job, round_number, client)
    except (SecAggError, SecAggStateError, WireError) as error:
        return _error_reply(message, ErrorCode.SECAGG, str(error))
    log.info("job %s round %d: secure aggregation %s answered", job, round_number, kind)
    return Message(to_content(reply), reply_to=message)


# ---------------------------------------------------------------- train


@app.train()
def train(message: Message, context: Context) -> Message:
    """Receive the global adapter and the round's instruction; reply with the update in the
    form the instruction's modes ask for (see :func:`update_reply`)."""
    from offsite.emulator.data import DataFormatError
    from offsite.emulator.tune import TuneConfig
    from offsite.protocol.envelope import SealError
    from offsite.protocol.records import RecordError, state_from_record
    from offsite.protocol.secagg import SecAggError, ShareBundle, from_content

    started = time.perf_counter()
    try:
        settings = NodeSettings.from_node_config(context.node_config)
    except NodeConfigError as error:
        return _error_reply(message, ErrorCode.NODE_CONFIG, str(error))
    try:
        if CONFIG not in message.content.config_records or ADAPTER not in message.content.array_records:
            raise WireError(f"train message lacks the {CONFIG!r} config record or the {ADAPTER!r} array record")
        instruction = TrainInstruction.from_record(message.content.config_records[CONFIG], TuneConfig)
        global_adapter = state_from_record(message.content.array_records[ADAPTER])
    except (WireError, RecordError) as error:
        return _error_reply(message, ErrorCode.BAD_MESSAGE, str(error))
    identity = coordinator = secagg = share_bundle = None
    try:  # everything this node needs for the instruction's modes, before spending a round's training on it
        coordinator = settings.coordinator()
        if instruction.envelope:
            identity = settings.identity()
            if coordinator is None:
                raise NodeConfigError("the job seals updates in envelopes but node config lacks 'coordinator-key' (the coordinator.pub.json you pinned)")
    except NodeConfigError as error:
        return _error_reply(message, ErrorCode.NODE_CONFIG, str(error))
    if instruction.secagg:
        try:
            share_bundle = from_content(message.content, ShareBundle)
            secagg = load_secagg_client(context, instruction.job_id, instruction.round)
        except (SecAggError, SecAggStateError) as error:
            return _error_reply(message, ErrorCode.SECAGG, str(error))
    try:
        adapter, metrics = train_round(instruction, global_adapter, settings)
        metrics["client-seconds"] = time.perf_counter() - started
        content, sent, info = update_reply(
            instruction, global_adapter, adapter, metrics, identity=identity, coordinator=coordinator, secagg=secagg, share_bundle=share_bundle
        )
        if secagg is not None:
            save_secagg_client(context, instruction.job_id, instruction.round, secagg)
        if settings.audit_dir is not None:
            write_audit_copy(settings.audit_dir, instruction, sent, info)
    except DataFormatError as error:
        return _error_reply(message, ErrorCode.DATA_FORMAT, str(error))
    except FileNotFoundError as error:
        return _error_reply(message, ErrorCode.DATA_FORMAT, f"{error.filename}: no such data file")
    except BundleMissingError as error:
        return _error_reply(message, ErrorCode.BUNDLE_MISSING, str(error))
    except BundleError as error:
        return _error_reply(message, ErrorCode.BUNDLE_INVALID, str(error))
    except NodeConfigError as error:
        return _error_reply(message, ErrorCode.NODE_CONFIG, str(error))
    except (SecAggError, SecAggStateError) as error:
        return _error_reply(message, ErrorCode.SECAGG, f"round {instruction.round}: {error}")
    except SealError as error:
        return _error_reply(message, ErrorCode.TRAIN_FAILED, f"round {instruction.round}: cannot seal the update: {error}")
    except Exception as error:  # noqa: BLE001 - the reply must say what broke, whatever it was
        detail = "".join(traceback.format_exception_only(type(error), error)).strip()
        return _error_reply(message, ErrorCode.TRAIN_FAILED, f"round {instruction.round}: {detail}")
    log.info("round %d: tuned on %d examples, loss %.4f; reply: %s", instruction.round, metrics.get("num-examples", 0),
             metrics.get("train-loss", float("nan")), info["mode"])
    return Message(content, reply_to=message)
