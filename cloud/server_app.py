"""The operator's Flower ServerApp (Message API): rounds of offsite-tuning over the SuperNodes.

The run config (``flwr run -c "job-dir='/abs/path'"``) names a job directory prepared by the
operator (``job.json`` + ``bundle/``; see :mod:`offsite.cloud.fed_job`). Each round:

1. wait until ``min_nodes`` SuperNodes are connected (at most ``node_wait_timeout`` s);
2. send the bundle, in parts, to every node not yet known to hold it (once per job and node);
3. send ``train`` with the global adapter to every node holding the bundle; wait at most
   ``round_timeout`` s; log who replied, who failed (with the reason) and who dropped;
4. check each update against the global adapter (keys, shapes, finite values), aggregate with
   :mod:`offsite.cloud.aggregate` weighted by ``num-examples``;
5. checkpoint the new global adapter and ``state.json``.

A restarted ServerApp reads ``state.json`` and resumes after the last completed round.

Security modes (``job.json``'s ``security``; see :class:`~offsite.cloud.fed_job.SecurityConfig`):

- envelopes: every reply must be an update envelope; an :class:`~offsite.protocol.envelope.UpdateOpener`
  per round (the sender registry re-read each round, so revocations apply; the replay cache in
  ``JOB/replay.jsonl``, so a restart still refuses a replay) opens it or refuses it with a
  :class:`~offsite.protocol.envelope.Reason`: the node goes to the round's ``failed`` as
  ``REJECTED: <reason>: ...`` (and ``rejected``: node -> reason), named in the log, and its
  update never reaches the aggregate;
- secure aggregation: the round runs the four stages of :mod:`offsite.protocol.secagg`
  (stages 0, 1, 3 as ``query.secagg`` messages, stage 2 inside ``train``) with a
  :class:`~offsite.cloud.secagg_server.SecAggServer`; the new global adapter is the old one plus
  the unmasked weighted mean delta; no individual update is ever decoded here;
- DP: the clients clip and noise their deltas; a :class:`~offsite.protocol.dp.PrivacyAccountant`
  in ``state.json`` is charged for every round in which updates were released (a failed round
  too) and each round's record carries epsilon at the job's delta.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode as FlowerErrorCode
from flwr.serverapp import Grid, ServerApp

from offsite.protocol.bundle import SIGNATURE, Bundle, BundleError, load_emulator, read_bundle
from offsite.protocol.bundle_signing import read_signed_bundle
from offsite.protocol.envelope import Reason, Rejected, ReplayCache, UpdateOpener, UpdatePolicy, max_envelope_bytes
from offsite.protocol.envelope_wire import ENVELOPE, envelope_from_record
from offsite.protocol.keys import CoordinatorKeys, KeyFileError, SenderRegistry
from offsite.protocol.messages import (
    ADAPTER,
    BUNDLE_PART,
    BUNDLE_STATUS,
    CONFIG,
    METRICS,
    SECAGG_QUERY,
    SECAGG_ROUND,
    TRAIN,
    ErrorCode,
    TrainInstruction,
    bundle_part_to_content,
    plan_bundle_parts,
    read_bundle_part,
    secagg_session,
)
from offsite.protocol.records import state_from_record, state_to_record
from offsite.protocol.tensors import check_like

from .aggregate import aggregate
from .fed_job import (
    BUNDLE_DIR,
    REPLAY_FILE,
    FedJobConfig,
    JobError,
    JobState,
    job_path,
    load_checkpoint,
    load_state,
    read_job,
    record_client_update,
    save_checkpoint,
    save_state,
)

log = logging.getLogger("flwr").getChild("offsite")  # flwr's handlers reach `flwr log` / --stream

app = ServerApp()


class RoundFailed(RuntimeError):
    """Too few usable replies to complete a round."""


# Error replies the SuperLink writes itself when a node never answered (Flower's codes, below 100):
# the node dropped out of the round, it did not fail at something.
NO_REPLY_CODES = {
    FlowerErrorCode.MESSAGE_UNAVAILABLE: "MESSAGE_UNAVAILABLE",  # the instruction expired (TTL) unanswered
    FlowerErrorCode.REPLY_MESSAGE_UNAVAILABLE: "REPLY_MESSAGE_UNAVAILABLE",  # the reply expired before it was pulled
    FlowerErrorCode.NODE_UNAVAILABLE: "NODE_UNAVAILABLE",  # the node missed its heartbeats: offline
}


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return NO_REPLY_CODES.get(code, f"flower-{code}")


def error_text(code: int, reason: str) -> str:
    """``NAME: reason``, once (our ClientApp already starts its reasons with the code's name)."""
    name = error_name(code)
    return reason if reason.startswith(f"{name}:") else f"{name}: {reason}"


# ---------------------------------------------------------------- setup


def initial_adapter(bundle: Bundle) -> dict[str, torch.Tensor]:
    """The adapter blocks exactly as the bundle ships them."""
    from offsite.emulator.sandwich import adapter_state_dict

    emulator = load_emulator(bundle)
    return adapter_state_dict(emulator, bundle.layout, bundle.adapter_blocks)


def open_job(job_dir: Path) -> tuple[FedJobConfig, Bundle, JobState, dict[str, torch.Tensor]]:
    """Read the job, verify its bundle (and, with the coordinator's keys, its signature: what the
    data owners will check) and return the state to resume from (round 0 if new)."""
    config = read_job(job_dir)
    keys = load_coordinator_keys(job_dir, config)
    try:
        bundle = read_bundle(job_dir / BUNDLE_DIR) if keys is None else read_signed_bundle(job_dir / BUNDLE_DIR, keys.public())
    except BundleError as error:
        hint = f" (sign it: offsite cloud sign-bundle --bundle {job_dir / BUNDLE_DIR} --keys DIR)" if keys is not None else ""
        raise JobError(f"{error}{hint}") from None
    state = load_state(job_dir)
    if state is None:
        state = JobState(bundle=bundle.digest)
        adapter = initial_adapter(bundle)
        save_checkpoint(job_dir, state, 0, adapter, None)
        return config, bundle, state, adapter
    if state.bundle != bundle.digest:
        raise JobError(f"{job_dir}/state.json belongs to bundle {state.bundle[:12]}, the job's bundle is {bundle.digest[:12]}")
    return config, bundle, state, load_checkpoint(job_dir, state)


def load_coordinator_keys(job_dir: Path, config: FedJobConfig) -> CoordinatorKeys | None:
    """The coordinator's private keys named by ``security.keys_dir`` (None if not set)."""
    if config.security.keys_dir is None:
        return None
    try:
        return CoordinatorKeys.load(job_path(job_dir, config.security.keys_dir))
    except KeyFileError as error:
        raise JobError(f"security.keys_dir: {error}") from None


@dataclass
class JobSecurity:
    """The coordinator's side of a job's envelopes, opened once per ServerApp run: its keys, the
    sender registry's path (re-read for every round's opener), the persisted replay cache."""

    job_id: str
    keys: CoordinatorKeys
    registry: Path
    replay: ReplayCache
    policy: UpdatePolicy

    @classmethod
    def open(cls, job_dir: Path, config: FedJobConfig) -> "JobSecurity | None":
        sec = config.security
        if not sec.envelopes:
            return None
        keys = load_coordinator_keys(job_dir, config)
        registry = job_path(job_dir, sec.registry)
        SenderRegistry.load(registry)  # unreadable: fail before round 1, not at its end
        try:
            replay = ReplayCache(Path(job_dir) / REPLAY_FILE)
        except ValueError as error:
            raise JobError(str(error)) from None
        policy = UpdatePolicy(max_payload_bytes=sec.max_payload_bytes, max_update_norm=sec.max_update_norm)
        return cls(config.job_id, keys, registry, replay, policy)

    def opener(self, round_number: int, reference: dict[str, torch.Tensor], policy: UpdatePolicy | None = None) -> UpdateOpener:
        """This round's opener, with the registry as it is on disk now (revocations apply)."""
        try:
            registry = SenderRegistry.load(self.registry)
        except KeyFileError as error:
            raise RoundFailed(f"round {round_number}: sender registry unreadable: {error}") from None
        return UpdateOpener(self.keys, registry, self.job_id, round_number, reference, policy or self.policy, self.replay)


class WaitClock:
    """Seconds a round spends waiting on the nodes: for them to connect and for their replies (the
    pull loops). The rest of a round is the coordinator's own work."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def waiting(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise RoundFailed(f"only {len(nodes)} SuperNodes connected after {timeout:.0f}s, need {minimum}")
        time.sleep(1.0)


def exchange(
    grid: Grid, messages: list[Message], timeout: float, poll: float = 0.5, clock: WaitClock | None = None
) -> tuple[list[tuple[int, Message]], list[int]]:
    """Push ``messages`` and pull replies until all are in or ``timeout`` s pass.

    Returns ``(destination node, reply)`` pairs, attributed by the id of the message replied to
    (an error reply the SuperLink makes itself, e.g. for an expired TTL, does not come from the
    node), and the destination of every message left unanswered. The pull loop's time is added
    to ``clock``, when given.
    """
    destinations = [message.metadata.dst_node_id for message in messages]
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages):  # flwr logs "payload too large" and returns []
        raise RoundFailed(f"the SuperLink accepted {len(ids)} of {len(messages)} messages (payload too large?)")
    unsent = [node for message_id, node in zip(ids, destinations, strict=True) if message_id is None]
    if unsent:
        log.warning("messages to node(s) %s could not be pushed to the SuperLink", unsent)
    node_of = {message_id: node for message_id, node in zip(ids, destinations, strict=True) if message_id is not None}
    waiting = set(node_of)
    replies: list[tuple[int, Message]] = []
    deadline = time.monotonic() + timeout
    with (clock or WaitClock()).waiting():
        while waiting and time.monotonic() < deadline:
            for reply in grid.pull_messages(list(waiting)):
                replied_to = reply.metadata.reply_to_message_id
                if replied_to in waiting:
                    waiting.discard(replied_to)
                    replies.append((node_of[replied_to], reply))
            if waiting:
                time.sleep(poll)
    return replies, sorted([node_of[i] for i in waiting] + unsent)


# ---------------------------------------------------------------- bundle distribution


def distribute_bundle(
    grid: Grid, bundle: Bundle, nodes: list[int], part_bytes: int, timeout: float, clock: WaitClock | None = None
) -> set[int]:
    """Send every part of the bundle to each node; return the nodes that installed it (or had it)."""
    if not nodes:
        return set()
    files = {name: meta["bytes"] for name, meta in bundle.manifest["files"].items()}
    files["manifest.json"] = (bundle.root / "manifest.json").stat().st_size
    if (bundle.root / SIGNATURE).is_file():  # a data owner with a pinned coordinator key installs only a signed bundle
        files[SIGNATURE] = (bundle.root / SIGNATURE).stat().st_size
    plan = plan_bundle_parts(files, part_bytes)
    log.info("bundle %s: %d bytes in %d part(s) to nodes %s", bundle.digest[:12], sum(files.values()), len(plan), nodes)
    messages = []
    for index in range(len(plan)):
        content = bundle_part_to_content(read_bundle_part(bundle.root, bundle.digest, plan, index))
        for node in nodes:
            messages.append(
                Message(content, dst_node_id=node, message_type=BUNDLE_PART, group_id=f"bundle-{bundle.digest[:12]}", ttl=timeout)
            )
    replies, _ = exchange(grid, messages, timeout, clock=clock)
    statuses: dict[int, list[str]] = {node: [] for node in nodes}
    for node, reply in replies:
        try:
            if reply.has_error():
                log.warning("node %d: bundle part refused: %s", node, str(reply.error.reason)[:300])
                statuses[node].append("error")
            else:
                statuses[node].append(str(reply.content.config_records[BUNDLE_STATUS]["status"])[:40])
        except Exception as error:  # noqa: BLE001 - a malformed status reply: this node has no bundle, the round goes on
            log.warning("node %d: unreadable bundle status reply (%s: %s)", node, type(error).__name__, str(error)[:200])
            statuses[node].append("error")
    ready = set()
    for node, got in statuses.items():
        if any(status in ("installed", "cached") for status in got) and "error" not in got:
            ready.add(node)
        else:
            log.warning("node %d: bundle not installed (replies: %s of %d parts)", node, got or "none", len(plan))
    return ready


# ---------------------------------------------------------------- one round


def check_update(node: int, update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update cast to the global adapter's dtypes, or ValueError naming node and tensor."""
    check_like(update, reference, ValueError, f"node {node}", finite=True)
    return {key: update[key].to(like.dtype) for key, like in reference.items()}


# what a client may report about its round (numbers only); anything else in a reply is ignored
CLIENT_METRICS = ("num-examples", "train-loss", "train-loss-first", "steps", "tokens", "seconds", "client-seconds")


def client_metrics(node: int, values: dict) -> dict[str, float]:
    """The known, finite numeric metrics in ``values``; ValueError naming the node otherwise."""
    metrics = {}
    for key in CLIENT_METRICS:
        if key in values:
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"node {node}: metric {key!r} is {value!r}, not a finite number")
            metrics[key] = value
    return metrics


def update_weight(node: int, metrics: dict, dp: bool) -> float:
    """FedAvg weight: the example count, or 1 with DP (equal weights: the sensitivity argument of
    :mod:`offsite.protocol.dp`, and no example count leaves a DP client)."""
    if dp:
        return 1.0
    num_examples = metrics.get("num-examples")
    if not isinstance(num_examples, (int, float)) or not math.isfinite(num_examples) or num_examples <= 0:
        raise ValueError(f"node {node}: num-examples {num_examples!r} is not a positive number")
    return float(num_examples)


def read_plain_reply(node: int, reply: Message, reference: dict[str, torch.Tensor], dp: bool) -> tuple[dict, float, dict]:
    """``(update, weight, metrics)`` of a plain train reply."""
    record = reply.content.array_records[ADAPTER]
    metrics = client_metrics(node, dict(reply.content.metric_records[METRICS]))
    return check_update(node, state_from_record(record), reference), update_weight(node, metrics, dp), metrics


def open_envelope_reply(node: int, reply: Message, opener: UpdateOpener):
    """The :class:`~offsite.protocol.envelope.OpenedUpdate` in a reply, or :class:`Rejected`.

    A reply that carries the update in plaintext as well is refused: in envelope mode nothing
    but the envelope may carry it."""
    content = reply.content
    if ADAPTER in content.array_records:
        raise Rejected(Reason.MALFORMED_FRAME, f"update from node {node}: the reply carries a plaintext {ADAPTER!r} record in envelope mode")
    if ENVELOPE not in content.array_records:
        raise Rejected(Reason.MALFORMED_FRAME, f"update from node {node}: the reply carries no {ENVELOPE!r} record")
    data = envelope_from_record(content.array_records[ENVELOPE], max_envelope_bytes(opener.max_payload_bytes), node)
    return opener.open(data, node)


def read_envelope_reply(node: int, reply: Message, opener: UpdateOpener, dp: bool) -> tuple[dict, float, dict, str]:
    """``(update, weight, metrics, sender)`` of a sealed train reply: the metrics are the sealed
    ones (authenticated); from outside the envelope only ``client-seconds`` is read."""
    opened = open_envelope_reply(node, reply, opener)
    metrics = client_metrics(node, opened.metadata)
    outside = dict(reply.content.metric_records[METRICS]) if METRICS in reply.content.metric_records else {}
    metrics |= client_metrics(node, {key: outside[key] for key in ("client-seconds",) if key in outside})
    return opened.tensors, update_weight(node, metrics, dp), metrics, opened.sender


def spend_privacy(state: JobState, config: FedJobConfig) -> dict:
    """Charge the job's accountant for one round of released updates; return the round's record."""
    from offsite.protocol.dp import PrivacyAccountant

    sec = config.security
    accountant = PrivacyAccountant.from_json(state.privacy) if state.privacy else PrivacyAccountant()
    # local: every update is a Gaussian mechanism with multiplier z (the mean is post-processing);
    # distributed: the sum of >= min_replies honest updates is; every client takes part (q = 1)
    accountant.step(sec.dp_noise_multiplier)
    state.privacy = accountant.to_json()
    spent = accountant.spent(sec.dp_delta)
    return {
        **spent.to_json(), "mode": sec.dp_mode, "clip_norm": sec.dp_clip_norm, "noise_multiplier": sec.dp_noise_multiplier,
        "min_clients": config.security.dp_config(config.min_replies).min_clients,
    }


@dataclass
class RoundReplies:
    """What a round's replies came to: usable updates, failures (node -> reason), no-replies."""

    updates: dict[int, tuple[dict[str, torch.Tensor], float]]
    failed: dict[int, str]
    no_reply: dict[int, str]
    metrics: dict[int, dict]
    rejected: dict[int, str]  # node -> Reason value, for refused envelopes
    senders: dict[int, str]  # node -> enrolled sender id of its accepted envelope


def sort_replies(replies: list[tuple[int, Message]], unanswered: list[int], timeout: float, state: JobState) -> tuple[list[tuple[int, Message]], RoundReplies]:
    """Split replies into answers, failures (error replies) and no-replies (the SuperLink's own
    errors, and silence); a BUNDLE_MISSING node is forgotten as a bundle holder."""
    result = RoundReplies({}, {}, {node: f"no reply within {timeout:.0f}s" for node in unanswered}, {}, {}, {})
    answers = []
    for node, reply in replies:
        if reply.has_error() and reply.error.code in NO_REPLY_CODES:
            result.no_reply[node] = f"the SuperLink answered for it: {error_text(reply.error.code, reply.error.reason)}"
        elif reply.has_error():
            result.failed[node] = error_text(reply.error.code, reply.error.reason)
            if reply.error.code == ErrorCode.BUNDLE_MISSING:
                state.nodes_with_bundle = [n for n in state.nodes_with_bundle if n != node]
        else:
            answers.append((node, reply))
    return answers, result


def refuse_reply(outcome: RoundReplies, node: int, error: Exception, prefix: str = "INVALID_UPDATE") -> None:
    """Record why ``node``'s reply is not used: a refused envelope as ``REJECTED: <reason>: ...``
    (and its :class:`Reason` in ``rejected``), anything else as ``<prefix>: ...``, an unexpected
    exception type named. :func:`log_outcome` logs it with the node; the round goes on."""
    if isinstance(error, Rejected):
        outcome.failed[node] = f"REJECTED: {error}"
        outcome.rejected[node] = error.reason.value
        return
    known = isinstance(error, (KeyError, ValueError))  # RecordError, SecAggError and the metric checks included
    outcome.failed[node] = f"{prefix}: {error}" if known else f"{prefix}: {type(error).__name__}: {str(error)[:300]}"
    if not known:
        log.debug("node %d: %s reading its reply", node, type(error).__name__, exc_info=error)


def log_outcome(round_number: int, outcome: RoundReplies, dropped: list[int]) -> None:
    for node, reason in sorted(outcome.failed.items()):
        sender = f" (sender {outcome.senders[node]!r})" if node in outcome.senders else ""
        log.warning("round %d: node %d%s failed: %s", round_number, node, sender, reason)
    for node in dropped:
        log.warning("round %d: node %d dropped: %s", round_number, node, outcome.no_reply[node])


def round_history(
    round_number: int, lr: float, nodes: list[int], sent: list[int], replied: list[int], failed: dict, outcome: RoundReplies,
    dropped: list[int], started: float, clock, aggregate_seconds: float, envelopes: bool, privacy: dict | None, **fields,
) -> dict:
    """The round's entry in ``state.json``: who was asked, who answered and why not, timings, and
    ``fields`` (what the plain and the secure-aggregation rounds record differently)."""
    elapsed = time.perf_counter() - started
    history = {
        "round": round_number,
        "lr": lr,
        "connected": nodes,
        "sent": sent,
        "replied": replied,
        "failed": {str(n): reason for n, reason in failed.items()},
        "dropped": dropped,
        "dropped_reasons": {str(n): outcome.no_reply[n] for n in dropped},
        **fields,
        "seconds": round(elapsed, 2),
        "wait_seconds": round(clock.seconds, 4),
        "coordinator_seconds": round(elapsed - clock.seconds, 4),
        "aggregate_seconds": round(aggregate_seconds, 4),
    }
    if envelopes:
        history["rejected"] = {str(n): reason for n, reason in outcome.rejected.items()}
        history["senders"] = {str(n): sender for n, sender in outcome.senders.items() if n in replied}
    if privacy is not None:
        history["privacy"] = privacy
    return history


def run_round(
    grid: Grid, job_dir: Path, config: FedJobConfig, bundle: Bundle, state: JobState, round_number: int, global_adapter: dict,
    security: JobSecurity | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """One round; returns the new global adapter and the round's record for ``state.json``.

    Timings in the record: ``seconds`` (the round, checkpoint excluded), ``wait_seconds`` (waiting
    for nodes to connect and reply), ``coordinator_seconds`` (the difference: reading and sending
    the bundle, building and pushing the train messages, checking and aggregating the updates),
    ``aggregate_seconds`` (decoding, checking and aggregating the updates), and per node
    ``client_train_seconds`` (the local tuning loop) and ``client_seconds`` (the whole ClientApp
    handler), as the clients report them. :func:`~offsite.cloud.fed_job.save_checkpoint` adds
    ``checkpoint_seconds``. With envelopes, ``rejected`` (node -> reason) and ``senders`` (node ->
    sender id); with secure aggregation, ``secagg``; with DP, ``privacy`` (epsilon at delta).
    """
    started, clock = time.perf_counter(), WaitClock()
    with clock.waiting():
        nodes = wait_for_nodes(grid, config.min_nodes, config.node_wait_timeout)
    fresh = [node for node in nodes if node not in state.nodes_with_bundle]
    installed = distribute_bundle(grid, bundle, fresh, config.bundle_part_bytes, config.bundle_timeout, clock)
    state.nodes_with_bundle = sorted(set(state.nodes_with_bundle) | installed)
    ready = [node for node in nodes if node in state.nodes_with_bundle]
    instruction = config.instruction(round_number, bundle.digest)
    if config.security.secure_aggregation:
        return run_secagg_round(grid, config, state, round_number, global_adapter, instruction, nodes, ready, security, started, clock)
    content = RecordDict({ADAPTER: state_to_record(global_adapter), CONFIG: instruction.to_record()})
    messages = [
        Message(content, dst_node_id=node, message_type=TRAIN, group_id=str(round_number), ttl=config.round_timeout)
        for node in ready
    ]
    log.info("round %d: train on %d node(s) %s (%d connected)", round_number, len(ready), ready, len(nodes))
    replies, unanswered = exchange(grid, messages, config.round_timeout, clock=clock)

    aggregating = time.perf_counter()
    answers, outcome = sort_replies(replies, unanswered, config.round_timeout, state)
    dp = config.security.dp
    opener = security.opener(round_number, global_adapter) if config.security.envelopes else None  # the registry as it is now
    for node, reply in answers:
        try:
            if opener is not None:
                update, weight, metrics, outcome.senders[node] = read_envelope_reply(node, reply, opener, dp)
            else:
                update, weight, metrics = read_plain_reply(node, reply, global_adapter, dp)
            outcome.updates[node] = (update, weight)
            outcome.metrics[node] = metrics
        except Exception as error:  # noqa: BLE001 - one bad reply is refused; it never ends the round
            refuse_reply(outcome, node, error)
    updates, failed, metrics = outcome.updates, outcome.failed, outcome.metrics
    dropped = sorted(outcome.no_reply)
    log_outcome(round_number, outcome, dropped)
    privacy = spend_privacy(state, config) if dp and updates else None  # released to the coordinator: spent, even if the round fails
    log.info("round %d: replies from %s", round_number, sorted(updates))
    if len(updates) < config.min_replies:
        raise RoundFailed(f"round {round_number}: {len(updates)} usable replies, need {config.min_replies} (failed: {failed}, dropped: {dropped})")

    ordered = sorted(updates)
    new_global = aggregate(config.aggregator, [updates[node] for node in ordered], config.trim_fraction)
    aggregate_seconds = time.perf_counter() - aggregating
    if config.record_updates:
        for node in ordered:
            record_client_update(job_dir, round_number, node, updates[node][0], int(updates[node][1]), bundle.digest)
    losses = {str(n): metrics[n]["train-loss"] for n in ordered if "train-loss" in metrics[n]}
    weights = {str(n): updates[n][1] for n in ordered}
    history = round_history(
        round_number, instruction.tuning.lr, nodes, ready, ordered, failed, outcome, dropped, started, clock, aggregate_seconds,
        config.security.envelopes, privacy,
        num_examples=weights,
        train_loss=losses,
        mean_train_loss=(
            sum(losses[str(n)] * updates[n][1] for n in ordered) / sum(weights.values()) if len(losses) == len(ordered) else None
        ),
        client_train_seconds={str(n): metrics[n].get("seconds") for n in ordered},
        client_seconds={str(n): metrics[n].get("client-seconds") for n in ordered},
    )
    loss = history["mean_train_loss"]
    log.info("round %d: aggregated %d update(s), weighted train loss %s%s", round_number, len(ordered),
             "-" if loss is None else f"{loss:.4f}", privacy_text(privacy))
    return new_global, history


def privacy_text(privacy: dict | None) -> str:
    return "" if privacy is None else f"; DP epsilon {privacy['epsilon']:.4g} at delta {privacy['delta']:g} after {privacy['rounds']} round(s)"


# ---------------------------------------------------------------- one round, secure aggregation


def secagg_stage(
    grid: Grid, requests: dict[int, RecordDict], round_number: int, timeout: float, clock: WaitClock, outcome: RoundReplies,
    state: JobState, message_type: str = SECAGG_QUERY,
) -> list[tuple[int, Message]]:
    """Send each node its stage request; the answers (failures and silences go to ``outcome``)."""
    messages = [
        Message(content, dst_node_id=node, message_type=message_type, group_id=str(round_number), ttl=timeout)
        for node, content in sorted(requests.items())
    ]
    replies, unanswered = exchange(grid, messages, timeout, clock=clock)
    answers, stage = sort_replies(replies, unanswered, timeout, state)
    outcome.failed |= stage.failed
    outcome.no_reply |= stage.no_reply
    return answers


def run_secagg_round(
    grid: Grid, config: FedJobConfig, state: JobState, round_number: int, global_adapter: dict, instruction: TrainInstruction,
    nodes: list[int], ready: list[int], security: JobSecurity | None, started: float, clock: WaitClock,
) -> tuple[dict[str, torch.Tensor], dict]:
    """A round with secure aggregation: stages 0, 1 (``query.secagg``), 2 (``train`` with this
    node's share bundle; the reply is its masked delta, sealed in an envelope when envelopes are
    on) and 3 (``query.secagg``); the new global adapter is the old one plus the unmasked
    weighted mean delta. Fewer than the threshold's nodes at any stage: :class:`RoundFailed`."""
    from offsite.protocol.secagg import (
        EncryptedShares,
        KeyAdvertisement,
        MaskedInput,
        SecAggConfig,
        SecAggError,
        UnmaskShares,
        from_content,
        masked_input_from_tensors,
        masked_input_reference,
        state_dimension,
        to_content,
        unflatten_state,
    )

    from .secagg_server import SecAggServer

    sec = config.security
    outcome = RoundReplies({}, {}, {}, {}, {}, {})
    n = len(ready)
    threshold = max(sec.secagg_threshold, n // 2 + 1)
    try:
        secagg_config = SecAggConfig.for_job(
            secagg_session(config.job_id, round_number), state_dimension(global_adapter), n, sec.secagg_clip_range,
            max_weight=1 if sec.dp else sec.secagg_max_weight, bits=sec.secagg_ring_bits, threshold=threshold,
        )
        server = SecAggServer(secagg_config)
        setup = server.start(ready)
    except SecAggError as error:
        raise RoundFailed(f"round {round_number}: secure aggregation cannot start on {n} node(s) {ready}: {error}") from None
    session_record = ConfigRecord({"job-id": config.job_id, "round": round_number})

    def query(message) -> RecordDict:
        content = to_content(message)
        content[SECAGG_ROUND] = session_record
        return content

    def parse(answers, kind) -> dict:
        parsed = {}
        for node, reply in answers:
            try:
                parsed[node] = from_content(reply.content, kind)
            except Exception as error:  # noqa: BLE001 - one bad reply is refused; it never ends the round
                refuse_reply(outcome, node, error, "SECAGG")
        return parsed

    log.info("round %d: secure aggregation on %d node(s) %s, threshold %d, clip range %g, 2**-%d scale, %d-bit ring",
             round_number, n, ready, threshold, sec.secagg_clip_range, secagg_config.scale_bits, sec.secagg_ring_bits)
    masked: dict[int, MaskedInput] = {}
    try:
        timeout = config.round_timeout
        answers = secagg_stage(grid, {node: query(setup) for node in ready}, round_number, timeout, clock, outcome, state)
        rosters = server.collect_keys(parse(answers, KeyAdvertisement))
        answers = secagg_stage(grid, {node: query(roster) for node, roster in rosters.items()}, round_number, timeout, clock, outcome, state)
        bundles = server.collect_shares(parse(answers, EncryptedShares))

        adapter_record, config_record = state_to_record(global_adapter), instruction.to_record()
        train_requests = {}
        for node, share_bundle in bundles.items():
            content = to_content(share_bundle)
            content[ADAPTER], content[CONFIG] = adapter_record, config_record
            train_requests[node] = content
        log.info("round %d: train on %d node(s) %s (%d connected)", round_number, len(train_requests), sorted(train_requests), len(nodes))
        answers = secagg_stage(grid, train_requests, round_number, timeout, clock, outcome, state, message_type=TRAIN)
        aggregating = time.perf_counter()
        if security is not None:  # each masked input sealed and signed by an enrolled sender
            policy = UpdatePolicy(max_payload_bytes=sec.max_payload_bytes)  # masked values are uniform: no norm to check
            opener = security.opener(round_number, masked_input_reference(secagg_config), policy)
            for node, reply in answers:
                try:
                    opened = open_envelope_reply(node, reply, opener)
                    masked[node] = masked_input_from_tensors(secagg_config.session, node, opened.tensors, secagg_config.bits)
                    outcome.senders[node] = opened.sender
                except Exception as error:  # noqa: BLE001 - as above
                    refuse_reply(outcome, node, error, "SECAGG")
        else:
            masked = parse(answers, MaskedInput)
        privacy = spend_privacy(state, config) if sec.dp and masked else None
        unmask_requests = server.collect_masked(masked)
        aggregate_seconds = time.perf_counter() - aggregating
        answers = secagg_stage(grid, {node: query(request) for node, request in unmask_requests.items()}, round_number, timeout, clock, outcome, state)
        unmasking = time.perf_counter()
        result = server.collect_unmask(parse(answers, UnmaskShares))
    except SecAggError as error:  # SecAggAbort included: too few nodes left at some stage
        for node, reason in server.failures.items():
            outcome.failed.setdefault(node, f"SECAGG: {reason}")
        log_outcome(round_number, outcome, sorted(outcome.no_reply))
        raise RoundFailed(f"round {round_number}: secure aggregation aborted: {error}") from None
    for node, reason in server.failures.items():
        outcome.failed.setdefault(node, f"SECAGG: {reason}")
    survivors = list(result.survivors)
    dropped = sorted(set(outcome.no_reply) - set(survivors))
    log_outcome(round_number, outcome, dropped)
    if len(survivors) < config.min_replies:
        raise RoundFailed(f"round {round_number}: {len(survivors)} masked update(s) in the sum, need {config.min_replies}")
    mean = result.mean()  # float64, sorted-name order
    delta = unflatten_state(mean, {key: torch.empty(tensor.shape, dtype=torch.float64) for key, tensor in global_adapter.items()})
    new_global = {key: (tensor.detach().to("cpu", torch.float64) + delta[key]).to(tensor.dtype) for key, tensor in global_adapter.items()}
    aggregate_seconds += time.perf_counter() - unmasking
    history = round_history(
        round_number, instruction.tuning.lr, nodes, ready, survivors, outcome.failed, outcome, dropped, started, clock, aggregate_seconds,
        sec.envelopes, privacy,
        num_examples={},  # never seen: the weights are inside the masked sum
        train_loss={},
        mean_train_loss=None,
        client_train_seconds={},
        client_seconds={},
        secagg={
            "survivors": survivors,
            "dropped": list(result.dropped),  # sent shares, no (accepted) masked input: unmasked out
            "threshold": threshold,
            "clip_range": sec.secagg_clip_range,
            "scale_bits": secagg_config.scale_bits,
            "ring_bits": sec.secagg_ring_bits,
            "max_weight": secagg_config.max_weight,
            "error_bound": result.error_bound,
            "total_weight": result.total_weight,
        },
    )
    log.info("round %d: secure aggregate of %d masked update(s) %s (total weight %d, error bound %.3g)%s", round_number,
             len(survivors), survivors, result.total_weight, result.error_bound, privacy_text(privacy))
    return new_global, history


# ---------------------------------------------------------------- the app


def run_job(grid: Grid, job_dir: Path) -> JobState:
    config, bundle, state, global_adapter = open_job(job_dir)
    security = JobSecurity.open(job_dir, config)
    if state.completed_round:
        log.info("job %s: resuming after round %d of %d", job_dir, state.completed_round, config.rounds)
    for round_number in range(state.completed_round + 1, config.rounds + 1):
        spent = dict(state.privacy)
        try:
            global_adapter, history = run_round(grid, job_dir, config, bundle, state, round_number, global_adapter, security)
        except RoundFailed:
            if state.privacy != spent:  # updates were released in the failed round: keep the privacy they cost
                save_state(job_dir, state)
            raise
        save_checkpoint(job_dir, state, round_number, global_adapter, history)
    log.info("job %s: %d round(s) completed; global adapter at %s", job_dir, state.completed_round, job_dir / state.checkpoint)
    if config.base_model is not None:
        from .finish import finish_job

        finish_job(job_dir)
    return state


@app.main()
def main(grid: Grid, context: Context) -> None:
    job_dir = context.run_config.get("job-dir")
    if not isinstance(job_dir, str) or not job_dir:
        raise JobError("run config 'job-dir' is not set: flwr run <app> <connection> -c \"job-dir='/abs/path/to/job'\"")
    run_job(grid, Path(job_dir).expanduser())
