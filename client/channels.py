"""How this data owner's update travels to the coordinator, the data owner's half: one small
:class:`UpdateChannel` protocol and its implementations, the mirror of
:mod:`offsite.cloud.federate.channels`:

- :class:`PlainChannel`: the adapter (in the global adapter's dtypes) and its metrics in the clear;
- :class:`EnvelopeChannel`: only the update sealed to the coordinator and signed by this data
  owner, its metrics sealed with it; outside only ``client-seconds`` (the handler's wall time,
  which the relay sees anyway);
- :class:`SecAggChannel`: only this node's masked delta (sealed too when the job seals its
  updates) and ``client-seconds``: no plaintext update, no example count, no loss.

Whatever the channel, DP comes first (:meth:`TunedUpdate.of`): the delta is clipped and noised
here, and no data-dependent metric (example count, loss) leaves the node.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict

from offsite.protocol.dp import PrivateUpdate, privatize_update, update_delta
from offsite.protocol.envelope import seal_update
from offsite.protocol.envelope_wire import ENVELOPE, envelope_to_record
from offsite.protocol.keys import ClientIdentity, CoordinatorPublicKeys
from offsite.protocol.messages import ADAPTER, METRICS, TrainInstruction
from offsite.protocol.records import state_to_record
from offsite.protocol.secagg import SecAggClient, ShareBundle, from_content, masked_input_tensors, to_content

from .secagg_session import load_secagg_client, save_secagg_client
from .settings import NodeConfigError, NodeSettings

log = logging.getLogger(__name__)

# metrics that depend only on timing; with DP nothing else leaves the node (the example count and
# the loss are functions of the data that the DP mechanism does not cover)
TIMING_METRICS = ("seconds", "client-seconds")


@dataclass(frozen=True)
class TunedUpdate:
    """This round's tuned adapter as it may leave the node: with DP, ``private`` holds the clipped and
    noised delta and ``metrics`` only the timing ones."""

    instruction: TrainInstruction
    global_adapter: dict[str, torch.Tensor]
    tuned: dict[str, torch.Tensor]
    metrics: dict[str, float]
    private: PrivateUpdate | None = None

    @classmethod
    def of(
        cls,
        instruction: TrainInstruction,
        global_adapter: dict,
        tuned: dict,
        metrics: dict[str, float],
        noise_seed: int | None = None,
    ) -> TunedUpdate:
        """DP applied as ``instruction.dp`` says (``noise_seed`` for tests only)."""
        dp = instruction.dp
        if dp is None:
            return cls(instruction, global_adapter, tuned, metrics)
        private = privatize_update(tuned, global_adapter, dp, seed=noise_seed)
        log.info(
            "round %d: DP: update norm %.4g %s to %g, noise std %.4g",
            instruction.round,
            private.norm,
            "clipped" if private.clipped else "within",
            dp.clip_norm,
            private.noise_std,
        )
        timing = {key: value for key, value in metrics.items() if key in TIMING_METRICS}
        return cls(instruction, global_adapter, tuned, timing, private)

    def adapter(self) -> dict[str, torch.Tensor]:
        """The adapter to send, in the global adapter's dtypes (with DP: global + private delta). In a
        LoRA job that merges stacked factors the global is whole blocks and the reply this round's
        factors: those are sent as tuned."""
        if self.private is not None:
            return self.private.adapter(self.global_adapter)
        like = self.global_adapter if set(self.tuned) == set(self.global_adapter) else self.tuned
        return {key: self.tuned[key].detach().to("cpu", like[key].dtype) for key in like}

    def delta(self) -> dict[str, torch.Tensor]:
        """``tuned - global`` in float64 (with DP: clipped and noised)."""
        return self.private.delta if self.private is not None else update_delta(self.tuned, self.global_adapter)

    @property
    def weight(self) -> int:
        """Its weight in a weighted sum: the example count, 1 with DP (no count leaves the node)."""
        return 1 if self.private is not None else int(self.metrics["num-examples"])

    def public_metrics(self) -> MetricRecord:
        """What a sealed or masked reply shows outside: the handler's wall time only."""
        return MetricRecord({key: value for key, value in self.metrics.items() if key == "client-seconds"})

    def info(self, mode: str, **more) -> dict:
        """The audit copy's description: job, round, DP, how it left (``mode``), and ``more``."""
        return {
            "job": self.instruction.job_id,
            "round": self.instruction.round,
            "dp": self.private is not None,
            "mode": mode,
            **more,
        }


@dataclass(frozen=True)
class Sent:
    """A train reply's records, the update as it left this node (before sealing or masking: what the
    audit copy keeps; under secure aggregation the float64 delta) and the audit copy's description."""

    content: RecordDict
    tensors: dict[str, torch.Tensor]
    info: dict


class UpdateChannel(Protocol):
    """The data owner's half of how a round's update travels."""

    def reply(self, update: TunedUpdate) -> Sent:
        """The train reply for ``update``."""
        ...


@dataclass(frozen=True)
class Sealer:
    """Seals for the coordinator (its pinned public keys) and signs as this data owner."""

    identity: ClientIdentity
    coordinator: CoordinatorPublicKeys

    def seal(
        self, tensors: Mapping[str, torch.Tensor], instruction: TrainInstruction, metadata: dict | None = None
    ) -> ArrayRecord:
        sealed = seal_update(
            tensors,
            job=instruction.job_id,
            round=instruction.round,
            identity=self.identity,
            recipient=self.coordinator,
            metadata=metadata,
        )
        return envelope_to_record(sealed)


class PlainChannel:
    """The adapter and every metric in the clear."""

    def reply(self, update: TunedUpdate) -> Sent:
        adapter = update.adapter()
        content = RecordDict({ADAPTER: state_to_record(adapter), METRICS: MetricRecord(update.metrics)})
        return Sent(content, adapter, update.info("plain"))


class EnvelopeChannel:
    """The adapter sealed with its metrics; ``client-seconds`` outside."""

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer

    def reply(self, update: TunedUpdate) -> Sent:
        adapter = update.adapter()
        sealed_metrics = {key: value for key, value in update.metrics.items() if key != "client-seconds"}
        envelope = self.sealer.seal(adapter, update.instruction, sealed_metrics)
        content = RecordDict({ENVELOPE: envelope, METRICS: update.public_metrics()})
        return Sent(content, adapter, update.info("envelope"))


class SecAggChannel:
    """Stage 2 of this node's secure-aggregation session: the delta masked with the round's share
    bundle and weighted by :attr:`TunedUpdate.weight`, sealed too with a ``sealer``; the session is
    saved in ``context.state`` for stage 3."""

    def __init__(
        self, client: SecAggClient, share_bundle: ShareBundle, context: Context, sealer: Sealer | None
    ) -> None:
        self.client, self.share_bundle, self.context, self.sealer = client, share_bundle, context, sealer

    def reply(self, update: TunedUpdate) -> Sent:
        instruction, delta, weight = update.instruction, update.delta(), update.weight
        masked = self.client.masked_input(self.share_bundle, delta, weight)
        if self.client.clipped:
            log.warning(
                "round %d: %d value(s) of the delta clipped to the secure-aggregation range %g",
                instruction.round,
                self.client.clipped,
                self.client.config.clip_range,
            )
        if self.sealer is not None:
            envelope = self.sealer.seal(masked_input_tensors(masked), instruction)
            content = RecordDict({ENVELOPE: envelope, METRICS: update.public_metrics()})
        else:
            content = to_content(masked)
            content[METRICS] = update.public_metrics()
        save_secagg_client(self.context, instruction.job_id, instruction.round, self.client)
        return Sent(content, delta, update.info("secagg", weight=weight, clipped=self.client.clipped))


def open_channel(
    instruction: TrainInstruction, settings: NodeSettings, content: RecordDict, context: Context
) -> UpdateChannel:
    """The channel ``instruction``'s modes ask for, with everything it needs loaded before a round's
    training is spent: NodeConfigError for a missing identity or pinned key, SecAggError /
    SecAggStateError for a missing share bundle or session."""
    coordinator = settings.coordinator()
    sealer = None
    if instruction.envelope:
        identity = settings.identity()
        if coordinator is None:
            raise NodeConfigError(
                "the job seals updates in envelopes but node config lacks 'coordinator-key' "
                "(the coordinator.pub.json you pinned)"
            )
        sealer = Sealer(identity, coordinator)
    if instruction.secagg:
        share_bundle = from_content(content, ShareBundle)
        client = load_secagg_client(context, instruction.job_id, instruction.round)
        return SecAggChannel(client, share_bundle, context, sealer)
    return PlainChannel() if sealer is None else EnvelopeChannel(sealer)
