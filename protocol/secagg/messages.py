"""The eight stage messages of secure aggregation (one request and one reply per stage), each
with ``to_bytes`` / ``from_bytes``: a JSON header with byte strings in base64, and for
:class:`MaskedInput` the raw little-endian ring elements after it."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .config import SecAggConfig
from .crypto import CIPHERTEXT_BYTES
from .errors import SecAggError
from .shamir import KEY_BYTES, SHARE_BYTES
from .wire import MAX_DIMENSION, b64, decode_message, encode_message, node_id, node_ids, node_pairs, unb64

M = TypeVar(
    "M",
    "SetupRequest",
    "KeyAdvertisement",
    "KeyRoster",
    "EncryptedShares",
    "ShareBundle",
    "MaskedInput",
    "UnmaskRequest",
    "UnmaskShares",
)


@dataclass(frozen=True)
class SetupRequest:
    """Stage 0, coordinator -> every invited node: the session's config and who is invited."""

    KIND = "secagg.setup"
    config: SecAggConfig
    nodes: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return encode_message(self.KIND, {"config": self.config.to_json(), "nodes": list(self.nodes)})

    @classmethod
    def from_bytes(cls, data: bytes) -> SetupRequest:
        body = decode_message(data, cls.KIND, {"config", "nodes"})
        return cls(SecAggConfig.from_json(body["config"]), node_ids(body["nodes"], "setup nodes"))


@dataclass(frozen=True)
class KeyAdvertisement:
    """Stage 0 reply: the node's two X25519 public keys for this session."""

    KIND = "secagg.keys"
    session: bytes
    node: int
    channel_key: bytes  # X25519 public key for the share channel
    mask_key: bytes  # X25519 public key for mask agreement

    def to_bytes(self) -> bytes:
        return encode_message(
            self.KIND,
            {
                "session": b64(self.session),
                "node": self.node,
                "channel_key": b64(self.channel_key),
                "mask_key": b64(self.mask_key),
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvertisement:
        body = decode_message(data, cls.KIND, {"session", "node", "channel_key", "mask_key"})
        return cls(
            unb64(body["session"], "keys session"),
            node_id(body["node"], "keys node"),
            unb64(body["channel_key"], "channel key", KEY_BYTES),
            unb64(body["mask_key"], "mask key", KEY_BYTES),
        )


@dataclass(frozen=True)
class KeyRoster:
    """Stage 1, coordinator -> every node of ``U1``: the advertisements of all of ``U1``."""

    KIND = "secagg.roster"
    session: bytes
    nodes: tuple[int, ...]
    channel_keys: tuple[bytes, ...]
    mask_keys: tuple[bytes, ...]

    def position(self, node: int) -> int:
        """The node's Shamir point: its 1-based rank in the roster."""
        return self.nodes.index(node) + 1

    def to_bytes(self) -> bytes:
        return encode_message(
            self.KIND,
            {
                "session": b64(self.session),
                "nodes": list(self.nodes),
                "channel_keys": [b64(key) for key in self.channel_keys],
                "mask_keys": [b64(key) for key in self.mask_keys],
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRoster:
        body = decode_message(data, cls.KIND, {"session", "nodes", "channel_keys", "mask_keys"})
        nodes = node_ids(body["nodes"], "roster nodes")
        keys = []
        for name in ("channel_keys", "mask_keys"):
            if not isinstance(body[name], list) or len(body[name]) != len(nodes):
                raise SecAggError(f"roster {name}: expected {len(nodes)} keys")
            keys.append(
                tuple(
                    unb64(key, f"roster {name} of node {node}", KEY_BYTES)
                    for node, key in zip(nodes, body[name], strict=True)
                )
            )
        return cls(unb64(body["session"], "roster session"), nodes, keys[0], keys[1])


@dataclass(frozen=True)
class EncryptedShares:
    """Stage 1 reply: a commitment to the self-mask seed and, for every other node of ``U1``,
    the AEAD ciphertext of its two shares (``(recipient, ciphertext)``, sorted)."""

    KIND = "secagg.shares"
    session: bytes
    node: int
    commitment: bytes
    ciphertexts: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        return encode_message(
            self.KIND,
            {
                "session": b64(self.session),
                "node": self.node,
                "commitment": b64(self.commitment),
                "ciphertexts": [[node, b64(data)] for node, data in self.ciphertexts],
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShares:
        body = decode_message(data, cls.KIND, {"session", "node", "commitment", "ciphertexts"})
        return cls(
            unb64(body["session"], "shares session"),
            node_id(body["node"], "shares node"),
            unb64(body["commitment"], "commitment", 32),
            node_pairs(body["ciphertexts"], "ciphertext", CIPHERTEXT_BYTES),
        )


@dataclass(frozen=True)
class ShareBundle:
    """Stage 2, coordinator -> each node of ``U2``: the ciphertexts addressed to it
    (``(sender, ciphertext)``, sorted); the senders and the recipient make up ``U2``."""

    KIND = "secagg.share-bundle"
    session: bytes
    recipient: int
    ciphertexts: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        return encode_message(
            self.KIND,
            {
                "session": b64(self.session),
                "recipient": self.recipient,
                "ciphertexts": [[node, b64(data)] for node, data in self.ciphertexts],
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        body = decode_message(data, cls.KIND, {"session", "recipient", "ciphertexts"})
        return cls(
            unb64(body["session"], "bundle session"),
            node_id(body["recipient"], "bundle recipient"),
            node_pairs(body["ciphertexts"], "ciphertext", CIPHERTEXT_BYTES),
        )


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Stage 2 reply: ``[w * q(x), w] + masks`` in ``Z_{2^k}``, ``d + 1`` elements."""

    KIND = "secagg.masked-input"
    session: bytes
    node: int
    vector: np.ndarray

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MaskedInput)
            and (self.session, self.node) == (other.session, other.node)
            and self.vector.dtype == other.vector.dtype
            and np.array_equal(self.vector, other.vector)
        )

    __hash__ = None

    def header(self) -> bytes:
        return encode_message(
            self.KIND,
            {
                "session": b64(self.session),
                "node": self.node,
                "dtype": self.vector.dtype.name,
                "length": int(self.vector.size),
            },
        )

    def to_bytes(self) -> bytes:
        """Header length (4 bytes, big-endian), JSON header, then the little-endian elements."""
        header = self.header()
        elements = self.vector.astype(self.vector.dtype.newbyteorder("<")).tobytes()
        return struct.pack(">I", len(header)) + header + elements

    @classmethod
    def _parse_header(cls, header: bytes) -> tuple[bytes, int, np.dtype, int]:
        body = decode_message(header, cls.KIND, {"session", "node", "dtype", "length"})
        if body["dtype"] not in ("uint64", "uint32"):
            raise SecAggError(f"masked input: dtype {body['dtype']!r} is not uint64 or uint32")
        length = body["length"]
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_DIMENSION + 1:
            raise SecAggError(f"masked input: length {length!r} out of range")
        session = unb64(body["session"], "masked input session")
        return session, node_id(body["node"], "masked input node"), np.dtype(body["dtype"]), length

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedInput:
        if len(data) < 4:
            raise SecAggError("masked input: truncated")
        size = struct.unpack(">I", data[:4])[0]
        session, node, dtype, length = cls._parse_header(bytes(data[4 : 4 + size]))
        payload = memoryview(data)[4 + size :]
        if len(payload) != length * dtype.itemsize:
            raise SecAggError(f"masked input of node {node}: {len(payload)} bytes for {length} {dtype.name} elements")
        return cls(session, node, np.frombuffer(payload, dtype=dtype.newbyteorder("<")).astype(dtype))


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, coordinator -> every survivor: who sent a masked input and who did not."""

    KIND = "secagg.unmask-request"
    session: bytes
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return encode_message(
            self.KIND, {"session": b64(self.session), "survivors": list(self.survivors), "dropped": list(self.dropped)}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        body = decode_message(data, cls.KIND, {"session", "survivors", "dropped"})
        return cls(
            unb64(body["session"], "unmask session"),
            node_ids(body["survivors"], "survivors"),
            node_ids(body["dropped"], "dropped"),
        )


@dataclass(frozen=True)
class UnmaskShares:
    """Stage 3 reply: this node's shares of the survivors' self-mask seeds and of the dropped
    nodes' mask keys (``(owner, share bytes)``, sorted)."""

    KIND = "secagg.unmask-shares"
    session: bytes
    node: int
    self_mask_shares: tuple[tuple[int, bytes], ...]
    mask_key_shares: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        return encode_message(
            self.KIND,
            {
                "session": b64(self.session),
                "node": self.node,
                "self_mask_shares": [[node, b64(data)] for node, data in self.self_mask_shares],
                "mask_key_shares": [[node, b64(data)] for node, data in self.mask_key_shares],
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskShares:
        body = decode_message(data, cls.KIND, {"session", "node", "self_mask_shares", "mask_key_shares"})
        return cls(
            unb64(body["session"], "unmask shares session"),
            node_id(body["node"], "unmask shares node"),
            node_pairs(body["self_mask_shares"], "self-mask share", SHARE_BYTES),
            node_pairs(body["mask_key_shares"], "mask-key share", SHARE_BYTES),
        )


MESSAGES: dict[str, type] = {
    cls.KIND: cls
    for cls in (
        SetupRequest,
        KeyAdvertisement,
        KeyRoster,
        EncryptedShares,
        ShareBundle,
        MaskedInput,
        UnmaskRequest,
        UnmaskShares,
    )
}
