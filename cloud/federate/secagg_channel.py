"""Secure aggregation, the coordinator's half of the channel: each round runs the four stages of
:mod:`offsite.protocol.secagg` with a :class:`SecAggServer`. Stages 0 and 1 are ``query.secagg``
messages before the train messages; stage 2 rides in ``train`` (each node's share bundle with the
global adapter; the reply is its masked delta, sealed in an envelope when envelopes are on too);
stage 3 follows. The new global adapter is the old one plus the unmasked weighted mean delta; no
individual update is ever decoded here. Fewer than the threshold's nodes at any stage, or fewer
than ``min_replies`` in the sum: :class:`RoundFailed`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from flwr.app import ConfigRecord, Message, RecordDict

from offsite.protocol.envelope import UpdatePolicy
from offsite.protocol.messages import ADAPTER, CONFIG, SECAGG_ROUND, secagg_session
from offsite.protocol.secagg import (
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    SecAggConfig,
    SecAggError,
    SetupRequest,
    UnmaskShares,
    from_content,
    masked_input_from_tensors,
    masked_input_reference,
    state_dimension,
    to_content,
)

from ..fed_job import FedJobConfig
from .channels import Envelopes, open_envelope_reply, train_content
from .round import Aggregate, RoundFailed, RoundState
from .secagg_server import SecAggResult, SecAggServer, add_mean

log = logging.getLogger("flwr").getChild("offsite")  # flwr's handlers reach `flwr log` / --stream


class SecAggChannel:
    """One secure-aggregation session per round (:meth:`train_requests` starts it); with
    ``envelopes``, each masked input is also sealed and signed by an enrolled sender."""

    def __init__(self, config: FedJobConfig, envelopes: Envelopes | None) -> None:
        self.config = config
        self.envelopes = envelopes
        self.sealed = envelopes is not None
        self.server: SecAggServer | None = None  # this round's session
        self.masked: dict[int, MaskedInput] = {}

    def train_requests(self, round_state: RoundState) -> dict[int, RecordDict]:
        """Stages 0 (keys) and 1 (shares); each node of ``U2`` gets its share bundle with the train content."""
        setup = self.start(round_state)
        with self.aborting(round_state):
            setups = {node: setup for node in round_state.ready}
            rosters = self.server.collect_keys(self.ask(round_state, setups, KeyAdvertisement))
            bundles = self.server.collect_shares(self.ask(round_state, rosters, EncryptedShares))
        content = train_content(round_state)
        requests = {}
        for node, share_bundle in bundles.items():
            request = to_content(share_bundle)
            request[ADAPTER], request[CONFIG] = content[ADAPTER], content[CONFIG]
            requests[node] = request
        return requests

    def read_replies(self, round_state: RoundState, answers: list[tuple[int, Message]]) -> int:
        """Stage 2's masked inputs (opened from their envelopes when sealed)."""
        with self.aborting(round_state):
            if self.sealed:
                self.masked = self.open_masked(round_state, answers)
            else:
                self.masked = self.parse(round_state, answers, MaskedInput)
        return len(self.masked)

    def combine(self, round_state: RoundState) -> Aggregate:
        """Stage 3: unmask the sum of the masked inputs; the global adapter plus the weighted mean delta."""
        with self.aborting(round_state):
            requests = self.server.collect_masked(self.masked)
            result = self.server.collect_unmask(self.ask(round_state, requests, UnmaskShares))
        replies = round_state.replies
        self.record_failures(round_state)
        survivors = list(result.survivors)
        dropped = sorted(set(replies.no_reply) - set(survivors))
        replies.log(round_state.number, dropped)
        if len(survivors) < self.config.min_replies:
            raise RoundFailed(
                f"round {round_state.number}: {len(survivors)} masked update(s) in the sum, "
                f"need {self.config.min_replies}"
            )
        summary = (
            f"secure aggregate of {len(survivors)} masked update(s) {survivors} "
            f"(total weight {result.total_weight}, error bound {result.error_bound:.3g})"
        )
        return Aggregate(add_mean(round_state.adapter, result), survivors, dropped, summary, secagg=self.record(result))

    # -- the stages' pieces

    def start(self, round_state: RoundState) -> SetupRequest:
        """This round's session and its setup request (stage 0)."""
        sec, nodes, number = self.config.security, round_state.ready, round_state.number
        threshold = max(sec.secagg_threshold, len(nodes) // 2 + 1)
        try:
            config = SecAggConfig.for_job(
                secagg_session(self.config.job_id, number),
                state_dimension(round_state.adapter),
                len(nodes),
                sec.secagg_clip_range,
                max_weight=1 if sec.dp else sec.secagg_max_weight,
                bits=sec.secagg_ring_bits,
                threshold=threshold,
            )
            self.server, self.masked = SecAggServer(config), {}
            setup = self.server.start(nodes)
        except SecAggError as error:
            raise RoundFailed(
                f"round {number}: secure aggregation cannot start on {len(nodes)} node(s) {nodes}: {error}"
            ) from None
        log.info(
            "round %d: secure aggregation on %d node(s) %s, threshold %d, clip range %g, 2**-%d scale, %d-bit ring",
            number,
            len(nodes),
            nodes,
            threshold,
            sec.secagg_clip_range,
            config.scale_bits,
            sec.secagg_ring_bits,
        )
        return setup

    def ask(self, round_state: RoundState, requests: Mapping[int, object], kind: type) -> dict:
        """Send each node its stage request (``query.secagg``); the well-formed answers of ``kind``."""
        session = ConfigRecord({"job-id": self.config.job_id, "round": round_state.number})
        queries = {}
        for node, request in requests.items():
            queries[node] = to_content(request)
            queries[node][SECAGG_ROUND] = session
        return self.parse(round_state, round_state.exchange(queries), kind)

    def parse(self, round_state: RoundState, answers: list[tuple[int, Message]], kind: type) -> dict:
        parsed = {}
        for node, reply in answers:
            try:
                parsed[node] = from_content(reply.content, kind)
            except Exception as error:  # noqa: BLE001 - one bad reply is refused; it never ends the round
                round_state.replies.refuse(node, error, "SECAGG")
        return parsed

    def open_masked(self, round_state: RoundState, answers: list[tuple[int, Message]]) -> dict[int, MaskedInput]:
        """The masked inputs sealed in the answers' envelopes (sender recorded; a refusal is that node's)."""
        config = self.server.config
        # masked values are uniform on the ring: no norm to check
        policy = UpdatePolicy(max_payload_bytes=self.config.security.max_payload_bytes)
        opener = self.envelopes.opener(round_state.number, masked_input_reference(config), policy)
        masked = {}
        for node, reply in answers:
            try:
                opened = open_envelope_reply(node, reply, opener)
                masked[node] = masked_input_from_tensors(config.session, node, opened.tensors, config.bits)
                round_state.replies.senders[node] = opened.sender
            except Exception as error:  # noqa: BLE001 - one bad reply is refused; it never ends the round
                round_state.replies.refuse(node, error, "SECAGG")
        return masked

    @contextmanager
    def aborting(self, round_state: RoundState) -> Iterator[None]:
        """A stage with too few nodes left (SecAggAbort) or any other SecAggError fails the round."""
        try:
            yield
        except SecAggError as error:
            self.record_failures(round_state)
            round_state.replies.log(round_state.number, sorted(round_state.replies.no_reply))
            raise RoundFailed(f"round {round_state.number}: secure aggregation aborted: {error}") from None

    def record_failures(self, round_state: RoundState) -> None:
        for node, reason in self.server.failures.items():
            round_state.replies.failed.setdefault(node, f"SECAGG: {reason}")

    def record(self, result: SecAggResult) -> dict:
        """The round record's ``secagg``: who is in the sum, the bounds and the total weight."""
        sec, config = self.config.security, self.server.config
        return {
            "survivors": list(result.survivors),
            "dropped": list(result.dropped),  # sent shares, no (accepted) masked input: unmasked out
            "threshold": config.threshold,
            "clip_range": sec.secagg_clip_range,
            "scale_bits": config.scale_bits,
            "ring_bits": sec.secagg_ring_bits,
            "max_weight": config.max_weight,
            "error_bound": result.error_bound,
            "total_weight": result.total_weight,
        }
