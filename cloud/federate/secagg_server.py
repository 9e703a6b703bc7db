"""The coordinator's side of secure aggregation (:mod:`offsite.protocol.secagg`): a
:class:`SecAggServer` per session, driven stage by stage with the replies that arrived.

Pure of Flower: each ``collect_*`` takes ``{source node: reply}`` for the replies that came in
(the source being Flower's ``message.metadata.src_node_id``, not what the reply claims), drops
a node whose reply is invalid (reason kept in :attr:`SecAggServer.failures`, naming the node),
and returns the next stage's request per node. Fewer than ``t`` usable replies at any stage
raise :class:`~offsite.protocol.secagg.SecAggAbort`: the round has to be redone.

::

    server = SecAggServer(SecAggConfig.for_job(session, dimension, len(nodes), clip_range))
    setup = server.start(nodes)                                  # SetupRequest, same for all
    rosters = server.collect_keys({node: KeyAdvertisement})      # KeyRoster per node of U1
    bundles = server.collect_shares({node: EncryptedShares})     # ShareBundle per node of U2
    requests = server.collect_masked({node: MaskedInput})        # UnmaskRequest per node of U3
    result = server.collect_unmask({node: UnmaskShares})         # SecAggResult
    new_adapter = add_mean(global_adapter, result)               # global + weighted mean delta

What the coordinator holds for one client: its two public keys, its ciphertexts (AES-GCM under
keys it cannot derive), a commitment to its self-mask seed, its masked vector (uniform on the
ring to anyone without all of its masks) and, after unmasking, ``t`` or more shares of exactly
one of its two secrets: the self-mask seed if it survived, the mask key if it dropped.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from offsite.protocol.secagg import (
    CIPHERTEXT_BYTES,
    MAX_SUBSETS,
    EncryptedShares,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    SecAggAbort,
    SecAggConfig,
    SecAggError,
    SetupRequest,
    Share,
    ShareBundle,
    UnmaskRequest,
    UnmaskShares,
    apply_mask,
    from_ring,
    pairwise_seed,
    public_key,
    ring_dtype,
    self_mask_commitment,
    self_mask_seed,
    shamir_combine,
    unflatten_state,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecAggResult:
    """What the coordinator learns: ``weighted_sum = sum_i w_i x_i`` (float64, ``d`` values,
    within ``error_bound * total_weight`` of exact), ``total_weight = sum_i w_i``, over the
    ``survivors``; ``dropped`` sent shares but no masked input."""

    weighted_sum: np.ndarray
    total_weight: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    error_bound: float  # per coordinate, on mean()

    def mean(self) -> np.ndarray:
        """The weighted mean ``sum_i w_i x_i / sum_i w_i`` (float64)."""
        if self.total_weight <= 0:
            raise SecAggError(f"the survivors' weights sum to {self.total_weight}: no mean")
        return self.weighted_sum / self.total_weight

    def mean_state(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`mean` as a state dict with ``like``'s names, shapes and dtypes."""
        return unflatten_state(self.mean(), like)


def reconstruct(
    owner: int, what: str, shares: Mapping[int, Share], threshold: int, check: Callable[[bytes], bool]
) -> bytes:
    """The secret of ``owner`` from ``{holder: share}``, the first ``t``-subset (in holder
    order) whose interpolation passes ``check``; at most :data:`MAX_SUBSETS` subsets are tried."""
    if len(shares) < threshold:
        raise SecAggAbort(f"{len(shares)} share(s) of the {what} of node {owner}, threshold {threshold}")
    holders = sorted(shares)
    for count, subset in enumerate(itertools.combinations(holders, threshold)):
        if count >= MAX_SUBSETS:
            break
        try:
            secret = shamir_combine([shares[holder] for holder in subset], threshold)
        except SecAggError:
            continue
        if check(secret):
            if count:
                log.warning("the %s of node %d: shares of some of %s are inconsistent", what, owner, holders)
            return secret
    raise SecAggAbort(f"the {what} of node {owner}: no {threshold} of the shares from nodes {holders} reconstruct it")


class SecAggServer:
    """The coordinator's state for one session; see the module docstring for the flow."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self.stage = "new"
        self.invited: tuple[int, ...] = ()
        self.roster: KeyRoster | None = None  # U1 with keys
        self.commitments: dict[int, bytes] = {}  # U2 -> commitment to b
        self.survivors: tuple[int, ...] = ()  # U3
        self.dropped: tuple[int, ...] = ()  # U2 \ U3
        self.total: np.ndarray | None = None  # sum of the masked inputs of U3
        self.failures: dict[int, str] = {}  # node -> why it was dropped from the session

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"secure aggregation is at stage {self.stage!r}, not {stage!r}")

    def _fail(self, node: int, reason: str) -> None:
        log.warning("secure aggregation: node %d dropped from the session: %s", node, reason)
        self.failures[node] = reason

    def _enough(self, nodes: Sequence[int], what: str) -> None:
        if len(nodes) < self.config.threshold:
            self.stage = "aborted"
            raise SecAggAbort(
                f"{len(nodes)} node(s) {what}, threshold {self.config.threshold} (failures: {self.failures})"
            )

    def _replies(self, replies: Mapping[int, object], expected: type, allowed: Sequence[int]):
        """``(node, reply)`` for each well-typed reply from an allowed node claiming to be itself."""
        for node in sorted(replies):
            reply = replies[node]
            if node not in allowed:
                self._fail(node, f"replied to stage {self.stage!r} without being part of it")
            elif not isinstance(reply, expected):
                self._fail(node, f"sent a {type(reply).__name__}, expected a {expected.__name__}")
            elif reply.session != self.config.session:
                self._fail(node, "replied for another session")
            elif reply.node != node:
                self._fail(node, f"its reply claims to come from node {reply.node}")
            else:
                yield node, reply

    # -- stage 0
    def start(self, nodes: Sequence[int]) -> SetupRequest:
        """The setup request to send to every one of ``nodes``."""
        self._expect("new")
        invited = tuple(sorted({int(node) for node in nodes}))
        self.config.check_nodes(len(invited))
        self.invited = invited
        self.stage = "keys"
        return SetupRequest(self.config, invited)

    # -- stage 0 -> 1
    def collect_keys(self, replies: Mapping[int, KeyAdvertisement]) -> dict[int, KeyRoster]:
        """The key roster of ``U1`` (the nodes that advertised valid, distinct keys), per node."""
        self._expect("keys")
        accepted, seen = {}, set()
        for node, reply in self._replies(replies, KeyAdvertisement, self.invited):
            if reply.channel_key in seen or reply.mask_key in seen or reply.channel_key == reply.mask_key:
                self._fail(node, "advertised a public key already in use")
                continue
            seen.update((reply.channel_key, reply.mask_key))
            accepted[node] = reply
        nodes = tuple(sorted(accepted))
        self._enough(nodes, "advertised keys")
        self.roster = KeyRoster(
            self.config.session,
            nodes,
            tuple(accepted[n].channel_key for n in nodes),
            tuple(accepted[n].mask_key for n in nodes),
        )
        self.stage = "shares"
        return {node: self.roster for node in nodes}

    # -- stage 1 -> 2
    def collect_shares(self, replies: Mapping[int, EncryptedShares]) -> dict[int, ShareBundle]:
        """Forward each ciphertext to its recipient: one share bundle per node of ``U2`` (the
        nodes of ``U1`` that sent a ciphertext to every other node of ``U1``)."""
        self._expect("shares")
        roster = self.roster
        accepted: dict[int, EncryptedShares] = {}
        for node, reply in self._replies(replies, EncryptedShares, roster.nodes):
            recipients = [recipient for recipient, _ in reply.ciphertexts]
            if recipients != [peer for peer in roster.nodes if peer != node]:
                self._fail(node, f"sent shares to {recipients}, expected the other roster nodes")
            elif any(len(ciphertext) != CIPHERTEXT_BYTES for _, ciphertext in reply.ciphertexts):
                self._fail(node, "sent a ciphertext of the wrong size")
            else:
                accepted[node] = reply
        group = tuple(sorted(accepted))
        self._enough(group, "distributed shares")
        self.commitments = {node: accepted[node].commitment for node in group}
        addressed = {sender: dict(accepted[sender].ciphertexts) for sender in group}
        bundles = {}
        for recipient in group:
            ciphertexts = tuple((sender, addressed[sender][recipient]) for sender in group if sender != recipient)
            bundles[recipient] = ShareBundle(self.config.session, recipient, ciphertexts)
        self.stage = "masked"
        return bundles

    # -- stage 2 -> 3
    def collect_masked(self, replies: Mapping[int, MaskedInput]) -> dict[int, UnmaskRequest]:
        """Add up the masked inputs of ``U3``; the unmask request for each node of ``U3``."""
        self._expect("masked")
        group = tuple(sorted(self.commitments))
        dtype, length = ring_dtype(self.config.bits), self.config.dimension + 1
        total = np.zeros(length, dtype=dtype)
        survivors = []
        for node, reply in self._replies(replies, MaskedInput, group):
            if reply.vector.dtype != dtype or reply.vector.shape != (length,):
                got = f"{reply.vector.dtype}{reply.vector.shape}"
                self._fail(node, f"masked input is {got}, expected {dtype.name}({length},)")
                continue
            np.add(total, reply.vector, out=total)  # wraps mod 2**k
            survivors.append(node)
        self.survivors = tuple(survivors)
        self.dropped = tuple(node for node in group if node not in survivors)
        self._enough(self.survivors, "sent masked inputs")
        self.total = total
        self.stage = "unmask"
        request = UnmaskRequest(self.config.session, self.survivors, self.dropped)
        return {node: request for node in self.survivors}

    # -- stage 3 -> result
    def collect_unmask(self, replies: Mapping[int, UnmaskShares]) -> SecAggResult:
        """Reconstruct the survivors' self-mask seeds and the dropped nodes' mask keys from the
        shares of at least ``t`` survivors, strip every mask that does not cancel, decode."""
        self._expect("unmask")
        seed_shares, key_shares = self._unmask_shares(replies)
        config, total = self.config, self.total
        for owner in self.survivors:
            seed = reconstruct(
                owner, "self-mask seed", seed_shares[owner], config.threshold, partial(self._is_committed_seed, owner)
            )
            apply_mask(total, self_mask_seed(seed, config.session, owner), -1)
        for owner in self.dropped:
            private = reconstruct(
                owner, "mask key", key_shares[owner], config.threshold, partial(self._is_advertised_key, owner)
            )
            for survivor in self.survivors:
                seed = pairwise_seed(private, self._mask_key(survivor), config.session, owner, survivor)
                apply_mask(total, seed, -1 if survivor < owner else +1)  # undo what the survivor added
        signed = from_ring(total, config.bits)
        self.total = None
        self.stage = "done"
        return SecAggResult(
            weighted_sum=np.ldexp(signed[:-1].astype(np.float64), -config.scale_bits),
            total_weight=int(signed[-1]),
            survivors=self.survivors,
            dropped=self.dropped,
            error_bound=config.error_bound(len(self.invited)),
        )

    def _unmask_shares(self, replies: Mapping[int, UnmaskShares]) -> tuple[dict, dict]:
        """``{owner: {holder: share}}`` of the survivors' self-mask seeds and of the dropped nodes' mask
        keys, from the survivors whose replies are whole and at their own share point."""
        roster = self.roster
        seed_shares: dict[int, dict[int, Share]] = {owner: {} for owner in self.survivors}
        key_shares: dict[int, dict[int, Share]] = {owner: {} for owner in self.dropped}
        responders = []
        for node, reply in self._replies(replies, UnmaskShares, self.survivors):
            seed_owners = [owner for owner, _ in reply.self_mask_shares]
            key_owners = [owner for owner, _ in reply.mask_key_shares]
            if seed_owners != list(self.survivors) or key_owners != list(self.dropped):
                self._fail(node, "revealed shares for other nodes than asked")
                continue
            try:
                seeds = {owner: Share.from_bytes(data) for owner, data in reply.self_mask_shares}
                keys = {owner: Share.from_bytes(data) for owner, data in reply.mask_key_shares}
            except SecAggError as error:
                self._fail(node, f"sent a malformed share: {error}")
                continue
            if any(share.x != roster.position(node) for share in [*seeds.values(), *keys.values()]):
                self._fail(node, "sent shares for another node's share point")
                continue
            for owner, share in seeds.items():
                seed_shares[owner][node] = share
            for owner, share in keys.items():
                key_shares[owner][node] = share
            responders.append(node)
        self._enough(responders, "sent their shares")
        return seed_shares, key_shares

    def _mask_key(self, node: int) -> bytes:
        """The mask public key ``node`` advertised in stage 0."""
        return self.roster.mask_keys[self.roster.position(node) - 1]

    def _is_committed_seed(self, owner: int, secret: bytes) -> bool:
        return self_mask_commitment(secret, self.config.session, owner) == self.commitments[owner]

    def _is_advertised_key(self, owner: int, secret: bytes) -> bool:
        return public_key(secret) == self._mask_key(owner)


def add_mean(global_adapter: Mapping[str, torch.Tensor], result: SecAggResult) -> dict[str, torch.Tensor]:
    """``global + mean delta`` per tensor: added in float64, cast back to each tensor's dtype."""
    like = {key: torch.empty(tensor.shape, dtype=torch.float64) for key, tensor in global_adapter.items()}
    delta = result.mean_state(like)
    return {
        key: (tensor.detach().to("cpu", torch.float64) + delta[key]).to(tensor.dtype)
        for key, tensor in global_adapter.items()
    }
