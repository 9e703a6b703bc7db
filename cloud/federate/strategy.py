"""The job's strategy, shaped like Flower's: :meth:`FederatedTuning.start` loops over the rounds
left; each round :meth:`~FederatedTuning.configure_train` says what every node is sent, one
exchange carries it, and :meth:`~FederatedTuning.aggregate_train` turns the replies into the new
global adapter and the round's record. How the updates travel is the job's
:class:`~.channels.UpdateChannel`; the arithmetic is :mod:`offsite.cloud.aggregate`'s and the
channel's pure functions."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from offsite.protocol.bundle import Bundle
from offsite.protocol.dp import PrivacyAccountant
from offsite.protocol.messages import TRAIN

from ..adapter_rule import AdapterRule
from ..fed_job import FedJobConfig, JobState, record_client_update, save_checkpoint, save_state
from .channels import UpdateChannel
from .round import Aggregate, RoundFailed, RoundRecord, RoundState, privacy_text
from .transport import NodeTransport

log = logging.getLogger("flwr").getChild("offsite")  # flwr's handlers reach `flwr log` / --stream


@dataclass
class OpenJob:
    """A job ready to run: its directory, settings, verified bundle, state, and the global adapter
    to resume from (the bundle's own after round 0)."""

    job_dir: Path
    config: FedJobConfig
    bundle: Bundle
    state: JobState
    adapter: dict[str, torch.Tensor]
    rule: AdapterRule  # whole blocks or LoRA: what travels and how it combines


@dataclass
class Result:
    """What :meth:`FederatedTuning.start` comes to (Flower's ``Result``): the global adapter after the
    last completed round and the job's state (its checkpoint, every round's record, privacy spent)."""

    adapter: dict[str, torch.Tensor]
    state: JobState


def spend_privacy(state: JobState, config: FedJobConfig) -> dict:
    """Charge the job's accountant for one round of released updates; return the round's record."""
    sec = config.security
    accountant = PrivacyAccountant.from_json(state.privacy) if state.privacy else PrivacyAccountant()
    # local: every update is a Gaussian mechanism with multiplier z (the mean is post-processing);
    # distributed: the sum of >= min_replies honest updates is; every client takes part (q = 1)
    accountant.step(sec.dp_noise_multiplier)
    state.privacy = accountant.to_json()
    spent = accountant.spent(sec.dp_delta)
    return {
        **spent.to_json(),
        "mode": sec.dp_mode,
        "clip_norm": sec.dp_clip_norm,
        "noise_multiplier": sec.dp_noise_multiplier,
        "min_clients": sec.dp_config(config.min_replies).min_clients,
    }


class FederatedTuning:
    """Rounds of offsite-tuning over the SuperNodes of ``grid``, the updates carried by ``channel``."""

    def __init__(self, job: OpenJob, channel: UpdateChannel, grid: Grid) -> None:
        self.job = job
        self.config = job.config
        self.channel = channel
        self.grid = grid

    def start(self) -> Result:
        """Every round after the last completed one; each completed round is checkpointed with its
        record. A failed round raises :class:`RoundFailed` (the privacy it spent saved first)."""
        job, state, adapter = self.job, self.job.state, self.job.adapter
        for number in range(state.completed_round + 1, self.config.rounds + 1):
            spent = dict(state.privacy)
            try:
                adapter, record = self.run_round(number, adapter)
            except RoundFailed:
                if state.privacy != spent:  # updates were released in the failed round: keep the privacy they cost
                    save_state(job.job_dir, state)
                raise
            self.save(number, adapter, record.to_json())
        return Result(adapter, state)

    def save(self, number: int, adapter: dict[str, torch.Tensor], record: dict | None) -> None:
        """Checkpoint round ``number``'s global adapter (a LoRA rule's factors as a LoRA update)."""
        rule, job = self.job.rule, self.job
        save_checkpoint(job.job_dir, job.state, number, rule.checkpoint(adapter), record, rule.kind)

    def run_round(self, number: int, adapter: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], RoundRecord]:
        """One round: the new global adapter and the round's record."""
        round_state = self.configure_round(number, adapter)
        requests = self.configure_train(round_state)
        replies, unanswered = round_state.transport.send(requests, TRAIN, str(number), self.config.round_timeout)
        return self.aggregate_train(round_state, replies, unanswered)

    def configure_round(self, number: int, adapter: dict[str, torch.Tensor]) -> RoundState:
        """Wait for ``min_nodes`` SuperNodes and send the bundle to those not yet known to hold it."""
        config, state, started = self.config, self.job.state, time.perf_counter()
        transport = NodeTransport(self.grid)
        nodes = transport.wait_for_nodes(config.min_nodes, config.node_wait_timeout)
        fresh = [node for node in nodes if node not in state.nodes_with_bundle]
        installed = transport.distribute_bundle(self.job.bundle, fresh, config.bundle_part_bytes, config.bundle_timeout)
        state.nodes_with_bundle = sorted(set(state.nodes_with_bundle) | installed)
        ready = [node for node in nodes if node in state.nodes_with_bundle]
        instruction = config.instruction(number, self.job.bundle.digest)
        timeout, rule = config.round_timeout, self.job.rule
        return RoundState(number, adapter, instruction, nodes, ready, transport, state, timeout, rule, started)

    def configure_train(self, round_state: RoundState) -> dict[int, RecordDict]:
        """Each node's train message: the global adapter, the round's instruction, and what the channel adds."""
        requests = self.channel.train_requests(round_state)
        log.info(
            "round %d: train on %d node(s) %s (%d connected)",
            round_state.number,
            len(requests),
            sorted(requests),
            len(round_state.connected),
        )
        return requests

    def aggregate_train(
        self, round_state: RoundState, replies: list[tuple[int, Message]], unanswered: list[int]
    ) -> tuple[dict[str, torch.Tensor], RoundRecord]:
        """Read the train replies, charge the privacy they release, combine them; checkpointing is :meth:`start`'s."""
        started, waited = time.perf_counter(), round_state.transport.clock.seconds
        answers = round_state.sort(replies, unanswered)
        released = self.channel.read_replies(round_state, answers)
        # released to the coordinator: spent, even if the round then fails
        privacy = spend_privacy(self.job.state, self.config) if self.config.security.dp and released else None
        aggregate = self.channel.combine(round_state)
        round_state.aggregate_seconds += time.perf_counter() - started - (round_state.transport.clock.seconds - waited)
        self.record_updates(round_state.number, aggregate)
        record = RoundRecord.of(round_state, aggregate, self.channel.sealed, privacy)
        log.info("round %d: %s%s", round_state.number, aggregate.summary, privacy_text(privacy))
        return aggregate.adapter, record

    def record_updates(self, number: int, aggregate: Aggregate) -> None:
        """With ``record_updates``: keep each client's update under ``updates/`` (plain and envelope rounds)."""
        if self.config.record_updates:
            job = self.job
            for node, (update, weight) in aggregate.updates.items():
                record_client_update(
                    job.job_dir, number, node, update, int(weight), job.bundle.digest, job.rule.reply_kind
                )
