"""How an update travels from a data owner to the coordinator, the coordinator's half: one small
:class:`UpdateChannel` protocol and its implementations, so the round never branches on the mode.

- :class:`PlainChannel`: the reply carries the tuned adapter and its metrics in the clear;
- :class:`EnvelopeChannel`: the reply carries only an update envelope, sealed to the coordinator
  and signed by an enrolled sender; an :class:`~offsite.protocol.envelope.UpdateOpener` per round
  (the sender registry re-read, so revocations apply; the replay cache in ``JOB/replay.jsonl``, so
  a restart still refuses a replay) opens it or refuses it with a reason, and the update never
  reaches the aggregate;
- :class:`~offsite.cloud.federate.secagg_channel.SecAggChannel`: secure aggregation; the
  coordinator only ever decodes the sum.

The client halves are :mod:`offsite.client.channels`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from flwr.app import Message, RecordDict

from offsite.protocol.envelope import (
    OpenedUpdate,
    Reason,
    Rejected,
    ReplayCache,
    UpdateOpener,
    UpdatePolicy,
    max_envelope_bytes,
)
from offsite.protocol.envelope_wire import ENVELOPE, envelope_from_record
from offsite.protocol.keys import CoordinatorKeys, KeyFileError, SenderRegistry
from offsite.protocol.messages import ADAPTER, CONFIG, METRICS
from offsite.protocol.records import state_from_record, state_to_record
from offsite.protocol.tensors import check_like

from ..fed_job import REPLAY_FILE, FedJobConfig, JobError, job_path
from .round import Aggregate, RoundFailed, RoundState, TrainStats

log = logging.getLogger("flwr").getChild("offsite")  # flwr's handlers reach `flwr log` / --stream

Update = tuple[dict[str, torch.Tensor], float, dict]  # (adapter, FedAvg weight, metrics) of one reply


class UpdateChannel(Protocol):
    """The coordinator's half of how one round's updates travel; the strategy calls, once a round and
    in this order, :meth:`train_requests`, (sends them,) :meth:`read_replies`, :meth:`combine`."""

    sealed: bool  # envelopes: the round's record names refused and accepted senders

    def train_requests(self, round_state: RoundState) -> dict[int, RecordDict]:
        """Each node's train message (the global adapter and the instruction, and what this channel adds)."""
        ...

    def read_replies(self, round_state: RoundState, answers: list[tuple[int, Message]]) -> int:
        """Read the train answers (a bad one is that node's refusal); the number of updates released to
        the coordinator (what DP accounting charges for)."""
        ...

    def combine(self, round_state: RoundState) -> Aggregate:
        """The new global adapter from what was read; :class:`RoundFailed` if too few made it."""
        ...


def train_content(round_state: RoundState) -> RecordDict:
    """What every train message carries: the global adapter and the round's instruction."""
    return RecordDict({ADAPTER: state_to_record(round_state.adapter), CONFIG: round_state.instruction.to_record()})


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


def check_update(
    node: int, update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The update cast to the global adapter's dtypes, or ValueError naming node and tensor."""
    check_like(update, reference, ValueError, f"node {node}", finite=True)
    return {key: update[key].to(like.dtype) for key, like in reference.items()}


def read_plain_reply(node: int, reply: Message, reference: dict[str, torch.Tensor], dp: bool) -> Update:
    """``(update, weight, metrics)`` of a plain train reply."""
    record = reply.content.array_records[ADAPTER]
    metrics = client_metrics(node, dict(reply.content.metric_records[METRICS]))
    return check_update(node, state_from_record(record), reference), update_weight(node, metrics, dp), metrics


def open_envelope_reply(node: int, reply: Message, opener: UpdateOpener) -> OpenedUpdate:
    """The :class:`~offsite.protocol.envelope.OpenedUpdate` in a reply, or :class:`Rejected`.

    A reply that carries the update in plaintext as well is refused: in envelope mode nothing
    but the envelope may carry it."""
    content = reply.content
    if ADAPTER in content.array_records:
        raise Rejected(
            Reason.MALFORMED_FRAME,
            f"update from node {node}: the reply carries a plaintext {ADAPTER!r} record in envelope mode",
        )
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


@dataclass
class Envelopes:
    """The coordinator's side of a job's envelopes, opened once per ServerApp run: its keys, the
    sender registry's path (re-read for every round's opener), the persisted replay cache."""

    job_id: str
    keys: CoordinatorKeys
    registry: Path
    replay: ReplayCache
    policy: UpdatePolicy

    @classmethod
    def open(cls, job_dir: Path, config: FedJobConfig) -> Envelopes | None:
        """None when the job does not seal its updates."""
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

    def opener(
        self, round_number: int, reference: dict[str, torch.Tensor], policy: UpdatePolicy | None = None
    ) -> UpdateOpener:
        """This round's opener, with the registry as it is on disk now (revocations apply)."""
        try:
            registry = SenderRegistry.load(self.registry)
        except KeyFileError as error:
            raise RoundFailed(f"round {round_number}: sender registry unreadable: {error}") from None
        policy = policy or self.policy
        return UpdateOpener(self.keys, registry, self.job_id, round_number, reference, policy, self.replay)


def load_coordinator_keys(job_dir: Path, config: FedJobConfig) -> CoordinatorKeys | None:
    """The coordinator's private keys named by ``security.keys_dir`` (None if not set)."""
    if config.security.keys_dir is None:
        return None
    try:
        return CoordinatorKeys.load(job_path(job_dir, config.security.keys_dir))
    except KeyFileError as error:
        raise JobError(f"security.keys_dir: {error}") from None


class PlainChannel:
    """Updates in the clear: each reply's adapter and metrics, checked against the global adapter
    (keys, shapes, finite values) and aggregated with the job's aggregator, weighted by
    ``num-examples`` (1 each with DP)."""

    sealed = False

    def __init__(self, config: FedJobConfig) -> None:
        self.config = config
        self.dp = config.security.dp

    def train_requests(self, round_state: RoundState) -> dict[int, RecordDict]:
        content = train_content(round_state)
        return {node: content for node in round_state.ready}

    def reader(self, round_state: RoundState) -> Callable[[int, Message], Update]:
        """How this round reads one reply."""
        return lambda node, reply: read_plain_reply(node, reply, round_state.reply_like, self.dp)

    def read_replies(self, round_state: RoundState, answers: list[tuple[int, Message]]) -> int:
        read, replies = self.reader(round_state), round_state.replies
        for node, reply in answers:
            try:
                update, weight, metrics = read(node, reply)
            except Exception as error:  # noqa: BLE001 - one bad reply is refused; it never ends the round
                replies.refuse(node, error)
                continue
            replies.updates[node] = (update, weight)
            replies.metrics[node] = metrics
        return len(replies.updates)

    def combine(self, round_state: RoundState) -> Aggregate:
        replies, number = round_state.replies, round_state.number
        updates, dropped = replies.updates, sorted(replies.no_reply)
        replies.log(number, dropped)
        log.info("round %d: replies from %s", number, sorted(updates))
        if len(updates) < self.config.min_replies:
            raise RoundFailed(
                f"round {number}: {len(updates)} usable replies, need {self.config.min_replies} "
                f"(failed: {replies.failed}, dropped: {dropped})"
            )
        ordered = sorted(updates)
        new_global = round_state.rule.combine(round_state.adapter, [updates[node] for node in ordered])
        stats = TrainStats.of(updates, replies.metrics)
        loss = "-" if stats.mean_train_loss is None else f"{stats.mean_train_loss:.4f}"
        summary = f"aggregated {len(ordered)} update(s), weighted train loss {loss}"
        ordered_updates = {node: updates[node] for node in ordered}
        return Aggregate(new_global, ordered, dropped, summary, stats, updates=ordered_updates)


class EnvelopeChannel(PlainChannel):
    """Updates sealed in envelopes: the reply carries only the envelope (``client-seconds`` outside);
    the update and its metrics are read from the opened envelope, then aggregated as in the clear."""

    sealed = True

    def __init__(self, config: FedJobConfig, envelopes: Envelopes) -> None:
        super().__init__(config)
        self.envelopes = envelopes

    def reader(self, round_state: RoundState) -> Callable[[int, Message], Update]:
        opener = self.envelopes.opener(round_state.number, round_state.reply_like)  # the registry as it is now
        senders = round_state.replies.senders

        def read(node: int, reply: Message) -> Update:
            update, weight, metrics, senders[node] = read_envelope_reply(node, reply, opener, self.dp)
            return update, weight, metrics

        return read
