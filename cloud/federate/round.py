"""One round in progress (:class:`RoundState`: what it started from, whom it asked, what came
back) and what it leaves in ``state.json`` (:class:`RoundRecord`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode as FlowerErrorCode

from offsite.protocol.envelope import Rejected
from offsite.protocol.messages import SECAGG_QUERY, ErrorCode, TrainInstruction

if TYPE_CHECKING:  # transport raises RoundFailed, so it imports this module
    from offsite.cloud.adapter_rule import AdapterRule
    from offsite.cloud.fed_job import JobState

    from .transport import NodeTransport

log = logging.getLogger("flwr").getChild("offsite")  # flwr's handlers reach `flwr log` / --stream


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


@dataclass
class RoundReplies:
    """What a round's replies came to so far: usable updates, failures (node -> reason), no-replies."""

    updates: dict[int, tuple[dict[str, torch.Tensor], float]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    no_reply: dict[int, str] = field(default_factory=dict)
    metrics: dict[int, dict] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)  # node -> Reason value, for refused envelopes
    senders: dict[int, str] = field(default_factory=dict)  # node -> enrolled sender id of its accepted envelope

    def refuse(self, node: int, error: Exception, prefix: str = "INVALID_UPDATE") -> None:
        """Record why ``node``'s reply is not used: a refused envelope as ``REJECTED: <reason>: ...``
        (and its :class:`Reason` in ``rejected``), anything else as ``<prefix>: ...``, an unexpected
        exception type named. :meth:`log` logs it with the node; the round goes on."""
        if isinstance(error, Rejected):
            self.failed[node] = f"REJECTED: {error}"
            self.rejected[node] = error.reason.value
            return
        known = isinstance(error, (KeyError, ValueError))  # RecordError, SecAggError and the metric checks included
        self.failed[node] = f"{prefix}: {error}" if known else f"{prefix}: {type(error).__name__}: {str(error)[:300]}"
        if not known:
            log.debug("node %d: %s reading its reply", node, type(error).__name__, exc_info=error)

    def log(self, round_number: int, dropped: list[int]) -> None:
        for node, reason in sorted(self.failed.items()):
            sender = f" (sender {self.senders[node]!r})" if node in self.senders else ""
            log.warning("round %d: node %d%s failed: %s", round_number, node, sender, reason)
        for node in dropped:
            log.warning("round %d: node %d dropped: %s", round_number, node, self.no_reply[node])


@dataclass
class RoundState:
    """One round in progress: the global adapter it started from, the instruction, the nodes connected
    and those asked (``ready``: holding the bundle), and the replies so far."""

    number: int
    adapter: dict[str, torch.Tensor]
    instruction: TrainInstruction
    connected: list[int]
    ready: list[int]
    transport: NodeTransport
    job: JobState  # a node that answers BUNDLE_MISSING is forgotten as a bundle holder
    timeout: float  # of every exchange of the round
    rule: AdapterRule  # what the global adapter is, what a reply looks like, how replies combine
    started: float = field(default_factory=time.perf_counter)
    replies: RoundReplies = field(default_factory=RoundReplies)
    aggregate_seconds: float = 0.0  # the coordinator's own time reading and combining the updates

    @property
    def reply_like(self) -> dict[str, torch.Tensor]:
        """What every reply must look like: the global adapter, or (stacked LoRA) the job's factors."""
        return self.rule.reply_like(self.adapter)

    def exchange(
        self, requests: Mapping[int, RecordDict], message_type: str = SECAGG_QUERY
    ) -> list[tuple[int, Message]]:
        """Send each node its request; the answers (failures and silences go to :attr:`replies`)."""
        replies, unanswered = self.transport.send(requests, message_type, str(self.number), self.timeout)
        return self.sort(replies, unanswered)

    def sort(self, replies: list[tuple[int, Message]], unanswered: list[int]) -> list[tuple[int, Message]]:
        """The answers among ``replies``; error replies become failures, the SuperLink's own errors and
        silence no-replies."""
        self.replies.no_reply |= {node: f"no reply within {self.timeout:.0f}s" for node in unanswered}
        answers = []
        for node, reply in replies:
            if reply.has_error() and reply.error.code in NO_REPLY_CODES:
                reason = error_text(reply.error.code, reply.error.reason)
                self.replies.no_reply[node] = f"the SuperLink answered for it: {reason}"
            elif reply.has_error():
                self.replies.failed[node] = error_text(reply.error.code, reply.error.reason)
                if reply.error.code == ErrorCode.BUNDLE_MISSING:
                    self.job.nodes_with_bundle = [n for n in self.job.nodes_with_bundle if n != node]
            else:
                answers.append((node, reply))
        return answers


@dataclass
class TrainStats:
    """What the clients reported of their local training (nothing under secure aggregation)."""

    num_examples: dict[str, float] = field(default_factory=dict)
    train_loss: dict[str, float] = field(default_factory=dict)
    mean_train_loss: float | None = None  # weighted by num_examples, when every client reported a loss
    client_train_seconds: dict[str, float | None] = field(default_factory=dict)  # the local tuning loop
    client_seconds: dict[str, float | None] = field(default_factory=dict)  # the whole ClientApp handler

    @classmethod
    def of(cls, updates: Mapping[int, tuple[dict, float]], metrics: Mapping[int, dict]) -> TrainStats:
        ordered = sorted(updates)
        weights = {str(n): updates[n][1] for n in ordered}
        losses = {str(n): metrics[n]["train-loss"] for n in ordered if "train-loss" in metrics[n]}
        mean = None
        if ordered and len(losses) == len(ordered):
            mean = sum(losses[str(n)] * updates[n][1] for n in ordered) / sum(weights.values())
        return cls(
            num_examples=weights,
            train_loss=losses,
            mean_train_loss=mean,
            client_train_seconds={str(n): metrics[n].get("seconds") for n in ordered},
            client_seconds={str(n): metrics[n].get("client-seconds") for n in ordered},
        )


@dataclass
class Aggregate:
    """What a channel made of a round's updates: the new global adapter, who is in it, who dropped."""

    adapter: dict[str, torch.Tensor]
    replied: list[int]
    dropped: list[int]
    summary: str  # the round's log line after "round N: "
    stats: TrainStats = field(default_factory=TrainStats)
    updates: dict[int, tuple[dict[str, torch.Tensor], float]] = field(default_factory=dict)  # plain and envelope only
    secagg: dict | None = None  # secure aggregation's survivors, bounds and weights


OPTIONAL = ("secagg", "rejected", "senders", "privacy")  # left out of state.json when None


@dataclass
class RoundRecord:
    """A round's entry in ``state.json``.

    Timings: ``seconds`` (the round, checkpoint excluded), ``wait_seconds`` (waiting for nodes to
    connect and reply), ``coordinator_seconds`` (the difference: reading and sending the bundle,
    building and pushing messages, checking and aggregating the updates), ``aggregate_seconds``
    (reading, checking and combining the updates, waits excluded), and per node
    ``client_train_seconds`` and ``client_seconds`` as the clients report them;
    :func:`~offsite.cloud.fed_job.save_checkpoint` adds ``checkpoint_seconds``.
    """

    round: int
    lr: float
    connected: list[int]
    sent: list[int]
    replied: list[int]
    failed: dict[str, str]
    dropped: list[int]
    dropped_reasons: dict[str, str]
    num_examples: dict[str, float]
    train_loss: dict[str, float]
    mean_train_loss: float | None
    client_train_seconds: dict[str, float | None]
    client_seconds: dict[str, float | None]
    seconds: float
    wait_seconds: float
    coordinator_seconds: float
    aggregate_seconds: float
    secagg: dict | None = None
    rejected: dict[str, str] | None = None  # with envelopes: node -> Reason of its refused envelope
    senders: dict[str, str] | None = None  # with envelopes: node -> enrolled sender of its accepted one
    privacy: dict | None = None  # with DP: epsilon at the job's delta after this round

    @classmethod
    def of(cls, current: RoundState, aggregate: Aggregate, sealed: bool, privacy: dict | None) -> RoundRecord:
        """``sealed``: the channel opens envelopes, so the record names refused and accepted senders."""
        replies, waited = current.replies, current.transport.clock.seconds
        elapsed = time.perf_counter() - current.started
        return cls(
            round=current.number,
            lr=current.instruction.tuning.lr,
            connected=current.connected,
            sent=current.ready,
            replied=aggregate.replied,
            failed={str(n): reason for n, reason in replies.failed.items()},
            dropped=aggregate.dropped,
            dropped_reasons={str(n): replies.no_reply[n] for n in aggregate.dropped},
            **dataclasses.asdict(aggregate.stats),
            seconds=round(elapsed, 2),
            wait_seconds=round(waited, 4),
            coordinator_seconds=round(elapsed - waited, 4),
            aggregate_seconds=round(current.aggregate_seconds, 4),
            secagg=aggregate.secagg,
            rejected={str(n): reason for n, reason in replies.rejected.items()} if sealed else None,
            senders={str(n): s for n, s in replies.senders.items() if n in aggregate.replied} if sealed else None,
            privacy=privacy,
        )

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        return {key: value for key, value in record.items() if value is not None or key not in OPTIONAL}


def privacy_text(privacy: dict | None) -> str:
    if privacy is None:
        return ""
    return f"; DP epsilon {privacy['epsilon']:.4g} at delta {privacy['delta']:g} after {privacy['rounds']} round(s)"
