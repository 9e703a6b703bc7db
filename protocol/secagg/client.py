"""The data owner's side of one secure-aggregation session (:class:`SecAggClient`): a state machine
``new -> advertised -> shared -> masked -> done`` that answers the coordinator's four stage
requests, and its persistence between Flower messages (it holds secrets: never send or log it)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..safe_json import JSONRefused, parse_json
from .config import SecAggConfig
from .crypto import (
    NONCE_BYTES,
    apply_mask,
    channel_key,
    decrypt_shares,
    encrypt_shares,
    pairwise_seed,
    public_key,
    self_mask_commitment,
    self_mask_seed,
)
from .errors import SecAggAbort, SecAggError
from .messages import (
    EncryptedShares,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    SetupRequest,
    ShareBundle,
    UnmaskRequest,
    UnmaskShares,
)
from .ring import flatten_state, quantise, ring_dtype, to_ring
from .shamir import KEY_BYTES, SHARE_BYTES, RandomBytes, Share, shamir_split
from .wire import b64, exact_fields, node_id, node_ids, node_pairs, unb64

if TYPE_CHECKING:  # torch is imported where tensors are handled: the key-exchange stages never need it
    import torch

STAGES = ("new", "advertised", "shared", "masked", "done")
_STATE_FIELDS = frozenset(
    {  # what SecAggClient.to_bytes writes
        "node",
        "stage",
        "config",
        "roster",
        "channel_private",
        "mask_private",
        "self_seed",
        "group",
        "clipped",
        "mask_key_shares",
        "self_mask_shares",
    }
)


class SecAggClient:
    """One data owner's side of one session: ``new -> advertise -> share_keys -> masked_input ->
    unmask -> done``. Each call checks the stage and the message, and raises
    :class:`SecAggError` naming the offending node; after an error, abandon the session.

    ``random_bytes`` is the entropy source (``os.urandom``; tests pass a seeded one).
    """

    def __init__(self, node: int, random_bytes: RandomBytes = os.urandom) -> None:
        self.node = node_id(node, "client node")
        self.random_bytes = random_bytes
        self.stage = "new"
        self.config: SecAggConfig | None = None
        self.roster: KeyRoster | None = None
        self.channel_private = b""
        self.mask_private = b""
        self.self_seed = b""
        self.group: tuple[int, ...] = ()  # U2 as this node saw it: the nodes it masked with
        self.mask_key_shares: dict[int, Share] = {}  # owner -> my share of its mask key
        self.self_mask_shares: dict[int, Share] = {}  # owner -> my share of its self-mask seed
        self.clipped = 0  # values clipped to [-c, c] in the masked input (local information)

    def _expect(self, stage: str, session: bytes | None = None) -> None:
        if self.stage != stage:
            raise SecAggError(f"node {self.node}: at stage {self.stage!r}, cannot handle a message for stage {stage!r}")
        if session is not None and self.config is not None and session != self.config.session:
            raise SecAggError(f"node {self.node}: message for another session")

    # -- stage 0
    def advertise(self, request: SetupRequest) -> KeyAdvertisement:
        self._expect("new")
        if self.node not in request.nodes:
            raise SecAggError(f"node {self.node}: not among the invited nodes")
        request.config.check_nodes(len(request.nodes))
        self.config = request.config
        self.channel_private = self.random_bytes(KEY_BYTES)
        self.mask_private = self.random_bytes(KEY_BYTES)
        self.stage = "advertised"
        return KeyAdvertisement(
            self.config.session, self.node, public_key(self.channel_private), public_key(self.mask_private)
        )

    # -- stage 1
    def share_keys(self, roster: KeyRoster) -> EncryptedShares:
        self._expect("advertised", roster.session)
        config = self.config
        if self.node not in roster.nodes:
            raise SecAggError(f"node {self.node}: not in the key roster")
        if len(roster.nodes) < config.threshold:
            raise SecAggAbort(
                f"node {self.node}: {len(roster.nodes)} node(s) in the roster, threshold {config.threshold}"
            )
        if 2 * config.threshold <= len(roster.nodes):
            raise SecAggError(
                f"node {self.node}: threshold {config.threshold} is not more than half of the "
                f"{len(roster.nodes)} roster nodes"
            )
        mine = roster.position(self.node) - 1
        if roster.channel_keys[mine] != public_key(self.channel_private) or roster.mask_keys[mine] != public_key(
            self.mask_private
        ):
            raise SecAggError(f"node {self.node}: the roster carries other keys for this node")
        if len(set(roster.channel_keys + roster.mask_keys)) != 2 * len(roster.nodes):
            raise SecAggError(f"node {self.node}: the roster repeats a public key")
        self.roster = roster
        self.self_seed = self.random_bytes(KEY_BYTES)
        xs = [roster.position(node) for node in roster.nodes]
        key_shares = shamir_split(self.mask_private, config.threshold, xs, self.random_bytes)
        seed_shares = shamir_split(self.self_seed, config.threshold, xs, self.random_bytes)
        ciphertexts = []
        for index, peer in enumerate(roster.nodes):
            if peer == self.node:
                self.mask_key_shares[self.node] = key_shares[index]
                self.self_mask_shares[self.node] = seed_shares[index]
                continue
            key = channel_key(self.channel_private, roster.channel_keys[index], config.session, self.node, peer)
            nonce = self.random_bytes(NONCE_BYTES)
            sealed = encrypt_shares(key, config.session, self.node, peer, key_shares[index], seed_shares[index], nonce)
            ciphertexts.append((peer, sealed))
        self.stage = "shared"
        commitment = self_mask_commitment(self.self_seed, config.session, self.node)
        return EncryptedShares(config.session, self.node, commitment, tuple(ciphertexts))

    # -- stage 2
    def masked_input(
        self, bundle: ShareBundle, update: Mapping[str, torch.Tensor] | np.ndarray, weight: int, *, strict: bool = False
    ) -> MaskedInput:
        """Decrypt the shares addressed to this node, then quantise and mask ``update`` (a state
        dict or a flat float vector of ``dimension`` values) with integer ``weight``.

        Values outside ``[-c, c]`` are clipped and counted in :attr:`clipped`, or, with
        ``strict``, raise naming the tensor.
        """
        self._expect("shared", bundle.session)
        config = self.config
        if bundle.recipient != self.node:
            raise SecAggError(f"node {self.node}: share bundle addressed to node {bundle.recipient}")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, np.integer))
            or not 0 <= weight <= config.max_weight
        ):
            raise SecAggError(f"node {self.node}: weight {weight!r} is not an integer in [0, {config.max_weight}]")
        vector = self._update_vector(update, strict)
        group = self._receive_shares(bundle)
        masked = self._mask(vector, weight, group)
        self.group = group
        self.channel_private = self.mask_private = self.self_seed = b""  # the coordinator recovers them from shares
        self.stage = "masked"
        return MaskedInput(config.session, self.node, masked)

    def _receive_shares(self, bundle: ShareBundle) -> tuple[int, ...]:
        """Decrypt and keep the shares in ``bundle``; returns ``U2`` as this node sees it (the
        senders and itself), :class:`SecAggAbort` if it is smaller than the threshold."""
        config, roster = self.config, self.roster
        senders = [sender for sender, _ in bundle.ciphertexts]
        for sender, ciphertext in bundle.ciphertexts:
            if sender == self.node or sender not in roster.nodes:
                raise SecAggError(f"node {self.node}: shares from node {sender}, which is not a peer in the roster")
            peer_key = roster.channel_keys[roster.position(sender) - 1]
            key = channel_key(self.channel_private, peer_key, config.session, self.node, sender)
            key_share, seed_share = decrypt_shares(key, config.session, sender, self.node, ciphertext)
            if key_share.x != roster.position(self.node) or seed_share.x != roster.position(self.node):
                raise SecAggError(f"node {self.node}: shares from node {sender} are for another share point")
            self.mask_key_shares[sender], self.self_mask_shares[sender] = key_share, seed_share
        group = tuple(sorted([*senders, self.node]))
        if len(group) < config.threshold:
            raise SecAggAbort(
                f"node {self.node}: {len(group)} node(s) distributed shares, threshold {config.threshold}"
            )
        return group

    def _mask(self, vector: np.ndarray, weight: int, group: tuple[int, ...]) -> np.ndarray:
        """``[w * q(x), w]`` plus the self mask and the pairwise masks with ``group``, in ``Z_{2^k}``
        (counts the clipped values in :attr:`clipped`)."""
        config, roster = self.config, self.roster
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(self.random_bytes(32), "big")))
        integers, self.clipped = quantise(vector, config.clip_range, config.scale_bits, config.rounding, rng)
        masked = np.empty(config.dimension + 1, dtype=ring_dtype(config.bits))
        masked[:-1] = to_ring(integers * np.int64(weight), config.bits)  # |w q| < 2**(k-1): checked headroom
        masked[-1] = weight
        apply_mask(masked, self_mask_seed(self.self_seed, config.session, self.node), +1)
        for peer in group:
            if peer != self.node:
                peer_key = roster.mask_keys[roster.position(peer) - 1]
                seed = pairwise_seed(self.mask_private, peer_key, config.session, self.node, peer)
                apply_mask(masked, seed, +1 if self.node < peer else -1)
        return masked

    def _update_vector(self, update: Mapping[str, torch.Tensor] | np.ndarray, strict: bool) -> np.ndarray:
        import torch

        config = self.config
        if isinstance(update, Mapping):
            for name, tensor in update.items():
                if (
                    strict
                    and isinstance(tensor, torch.Tensor)
                    and tensor.numel()
                    and float(tensor.detach().abs().max()) > config.clip_range
                ):
                    raise SecAggError(
                        f"node {self.node}: tensor {name!r} reaches {float(tensor.detach().abs().max()):.4g}, "
                        f"outside the clip range {config.clip_range}"
                    )
            try:
                vector = flatten_state(update)
            except SecAggError as error:
                raise SecAggError(f"node {self.node}: {error}") from None
        else:
            vector = np.asarray(update, dtype=np.float64)
            if vector.ndim != 1 or not np.isfinite(vector).all():
                raise SecAggError(f"node {self.node}: the update vector is not a finite 1-d array")
            if strict and vector.size and np.abs(vector).max() > config.clip_range:
                raise SecAggError(
                    f"node {self.node}: the update reaches {np.abs(vector).max():.4g}, "
                    f"outside the clip range {config.clip_range}"
                )
        if vector.size != config.dimension:
            raise SecAggError(
                f"node {self.node}: the update has {vector.size} values, the session expects {config.dimension}"
            )
        return vector

    # -- stage 3
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Reveal, once, shares of the survivors' self-mask seeds and of the dropped nodes' mask
        keys, after checking that they partition the nodes this client masked with."""
        self._expect("masked", request.session)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if self.node not in survivors:
            raise SecAggError(f"node {self.node}: the unmask request does not count this node as a survivor")
        if survivors & dropped:
            raise SecAggError(f"node {self.node}: nodes {sorted(survivors & dropped)} are both survivors and dropped")
        if survivors | dropped != set(self.group):
            raise SecAggError(
                f"node {self.node}: survivors and dropped {sorted(survivors | dropped)} are not the nodes "
                f"masked with {list(self.group)}"
            )
        if len(survivors) < self.config.threshold:
            raise SecAggAbort(f"node {self.node}: {len(survivors)} survivor(s), threshold {self.config.threshold}")
        reply = UnmaskShares(
            self.config.session,
            self.node,
            tuple((owner, self.self_mask_shares[owner].to_bytes()) for owner in sorted(survivors)),
            tuple((owner, self.mask_key_shares[owner].to_bytes()) for owner in sorted(dropped)),
        )
        self.mask_key_shares, self.self_mask_shares = {}, {}
        self.stage = "done"
        return reply

    # -- persistence between Flower messages (secrets: keep it on the data owner's machine)
    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "node": self.node,
                "stage": self.stage,
                "config": None if self.config is None else self.config.to_json(),
                "roster": None if self.roster is None else self.roster.to_bytes().decode("utf-8"),
                "channel_private": b64(self.channel_private),
                "mask_private": b64(self.mask_private),
                "self_seed": b64(self.self_seed),
                "group": list(self.group),
                "clipped": self.clipped,
                "mask_key_shares": [
                    [node, b64(share.to_bytes())] for node, share in sorted(self.mask_key_shares.items())
                ],
                "self_mask_shares": [
                    [node, b64(share.to_bytes())] for node, share in sorted(self.self_mask_shares.items())
                ],
            },
            sort_keys=True,
        ).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, random_bytes: RandomBytes = os.urandom) -> SecAggClient:
        try:
            value = parse_json(data)
        except JSONRefused as error:
            raise SecAggError(f"client state: not JSON ({error})") from None
        fields = exact_fields(value, "client state", _STATE_FIELDS)
        client = cls(node_id(fields["node"], "client state node"), random_bytes)
        if fields["stage"] not in STAGES:
            raise SecAggError(f"client state: unknown stage {fields['stage']!r}")
        client.stage = fields["stage"]
        client.config = None if fields["config"] is None else SecAggConfig.from_json(fields["config"])
        if fields["roster"] is not None:
            if not isinstance(fields["roster"], str):
                raise SecAggError("client state: roster is not text")
            client.roster = KeyRoster.from_bytes(fields["roster"].encode("utf-8"))
        for name in ("channel_private", "mask_private", "self_seed"):
            secret = unb64(fields[name], f"client state {name}")
            if len(secret) not in (0, KEY_BYTES):
                raise SecAggError(f"client state {name}: expected {KEY_BYTES} bytes")
            setattr(client, name, secret)
        client.group = node_ids(fields["group"], "client state group")
        if isinstance(fields["clipped"], bool) or not isinstance(fields["clipped"], int):
            raise SecAggError("client state: clipped is not an integer")
        client.clipped = fields["clipped"]
        for name in ("mask_key_shares", "self_mask_shares"):
            pairs = node_pairs(fields[name], f"client state {name}", SHARE_BYTES)
            setattr(client, name, {node: Share.from_bytes(data) for node, data in pairs})
        return client
