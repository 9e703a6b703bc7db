"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, "Practical Secure Aggregation
for Privacy-Preserving Machine Learning"), with dropout recovery: the shared primitives, the
stage messages and the data owner's state machine :class:`SecAggClient`. The coordinator's side
is :class:`offsite.cloud.secagg_server.SecAggServer`.

What it gives: the coordinator learns ``sum_i w_i x_i`` and ``sum_i w_i`` over the clients that
sent a masked input, and nothing about any single ``x_i`` or ``w_i`` (honest-but-curious
coordinator; together with fewer than ``t`` clients it learns only the sum of the others). It does not protect
the aggregate itself (that is :mod:`offsite.protocol.dp`'s job) and it does not make the
aggregate correct against a lying client or an active coordinator (see "Threat model").

Quantisation (client side)
    Each coordinate of the flattened update ``x`` (float64) is clipped to ``[-c, c]`` and scaled
    by ``s = 2**f``; ``round(s * x)`` is an exact integer (stochastic rounding: ``floor(s x) + [u
    < frac(s x)]``, unbiased; or nearest, ties to even). The client's integer weight ``w`` (its
    example count) multiplies the integers *after* rounding, exactly, in integer arithmetic, and
    ``w`` itself rides as one extra coordinate. Everything lives in the ring ``Z_{2^k}`` (``k``
    = 32 or 64, NumPy ``uint32``/``uint64`` arithmetic wraps by itself).

    Decoding: the coordinator reads the unmasked sum as a signed ``k``-bit integer and divides by
    ``s * sum_i w_i``. With every ``x_i`` inside ``[-c, c]``, the weighted mean it returns is,
    per coordinate, within

        ``bound = rho * 2**-f + c * 2**-50``

    of the exact ``sum_i w_i x_i / sum_i w_i``: ``rho = 1/2`` for nearest rounding, ``rho = 1``
    (strictly less) for stochastic rounding, since each client's rounding error ``|e_i| <= rho``
    enters weighted by ``w_i`` and ``|sum_i w_i e_i| / (s sum_i w_i) <= rho / s`` for any number
    of clients and any weights; ``c * 2**-50`` covers evaluating the quotient in float64 (two
    roundings of relative size ``2**-53`` on a value of size at most ``c``). The condition is
    that the sum cannot wrap: ``n * w_max * (s * c + 1) <= 2**(k-1) - 1``; and ``s * c <=
    2**48``, since float64 cannot use a finer scale. :func:`max_scale_bits` returns the largest
    such ``f``:

        ``f = floor(log2(min(((2**(k-1) - 1) / (n * w_max) - 1) / c, 2**48 / c)))``

    so that, unless the float64 cap binds, ``rho * 2**-f <= 2 * rho * c * n * w_max / (2**(k-1)
    - 1 - n * w_max)``. :func:`quantisation_error_bound` evaluates it (``k=64, c=8, n=5,
    w_max=10**6``: ``f=37``, ``7.3e-12`` with stochastic rounding; ``k=32``, same: ``f=5``, ``0.031``;
    ``k=32, c=1, n=5, w_max=1000``: ``f=18``, ``3.8e-6``; ``k=64, c=1, n=5, w_max=1``: ``f=48``,
    the float64 cap, ``4.4e-15``). The bound is on the float64 mean;
    casting it to the adapter's dtype (float32, bfloat16) adds that dtype's own rounding.

Weights
    Weighted FedAvg needs ``sum_i w_i x_i`` and ``sum_i w_i``: the client masks the vector
    ``[w_i * q(x_i), w_i]`` (length ``d + 1``), the coordinator unmasks the sum and divides.
    Weights must be integers in ``[0, w_max]`` (example counts); the coordinator never sees a
    single ``w_i``.

Masks
    Every client makes two X25519 key pairs per session: ``c`` (the channel for its encrypted
    shares) and ``s`` (mask agreement), and a 32-byte self-mask seed ``b_i``. For every pair
    ``i < j`` in ``U2`` (the clients that distributed shares), the seed ``s_ij = HKDF(X25519(s_i,
    S_j), session, i, j)`` is expanded by AES-256-CTR into ``d + 1`` ring elements; ``i`` adds
    that mask and ``j`` subtracts it, so pairwise masks cancel in the sum. The self mask
    ``PRG(HKDF(b_i))`` is added too, so a client whose masked input arrives late (after the
    coordinator declared it dropped and learnt its ``s`` key) is still hidden.

Dropout recovery
    ``s_i`` (the private mask key) and ``b_i`` are each ``t``-of-``|U1|`` Shamir-shared over the
    prime field ``GF(2**521 - 1)``; the share for ``j`` is encrypted to ``j`` with AES-256-GCM
    under ``HKDF(X25519(c_i, C_j))`` (associated data: session, sender, recipient) and relayed by
    the coordinator. After the masked inputs, each survivor reveals, once, its shares of the
    *dropped* clients' ``s`` keys and of the *surviving* clients' ``b`` seeds, never both for
    the same client. The coordinator reconstructs them (checking each ``s`` key against its
    advertised public key and each ``b`` against the commitment the client sent with its
    shares), removes the self masks of the survivors and the survivors' pairwise masks with the
    dropped clients, and decodes.

Stages (each a request from the coordinator and one reply per client; sizes for ``n`` clients
and ``d`` coordinates):

====================  =========================================  ==========================================
stage                 coordinator -> client                      client -> coordinator
====================  =========================================  ==========================================
0 advertise keys      :class:`SetupRequest` (config, invited     :class:`KeyAdvertisement` (2 x 32-byte
                      nodes; < 1 KB)                             X25519 public keys)
1 share keys          :class:`KeyRoster` (the ``U1`` nodes and   :class:`EncryptedShares` (a 32-byte
                      their keys; 64 B per node)                 commitment and ``n - 1`` ciphertexts of
                                                                 184 bytes)
2 masked input        :class:`ShareBundle` (the ``n - 1``        :class:`MaskedInput` (``d + 1`` ring
                      ciphertexts addressed to this client)      elements: a ``uint64`` array, ``8 (d+1)`` B)
3 unmasking           :class:`UnmaskRequest` (survivors,         :class:`UnmaskShares` (one 70-byte Shamir
                      dropped)                                   share per node of ``U2``)
====================  =========================================  ==========================================

Every message has ``to_bytes()`` / ``from_bytes()`` (a JSON header, byte strings in base64, plus
the raw little-endian vector for :class:`MaskedInput`) and :func:`to_content` /
:func:`from_content` carry it in a Flower ``RecordDict``: a ``ConfigRecord`` ``"secagg"``
``{"kind": str, "body": bytes}`` and, for :class:`MaskedInput` only, an ``ArrayRecord``
``"secagg-vector"`` with one ``uint64`` (or ``uint32``) NumPy array. Only JSON and raw array
bytes are ever parsed.

Wiring into our ServerApp / ClientApp (plan)
    One session per round, ``session = sha256(job id || bundle digest || round)``;
    ``SecAggConfig.for_job(session, state_dimension(global adapter), len(nodes), clip_range)``.
    Stages 0, 1 and 3 are ``query.secagg`` messages (content: :func:`to_content`; reply:
    :func:`to_content` of the client's reply, or an ``Error``). Stage 2 is the round's ``train``
    message: ``{"adapter", "config"}`` plus the :class:`ShareBundle` records; the ClientApp
    tunes, then replies with the :class:`MaskedInput` records and ``train-loss`` only (no
    plaintext adapter, no ``num-examples``: the weight is inside the masked vector). Mask the
    *delta* (tuned - global, small range: clip range ~1, or ``C`` plus a few noise sd with
    :mod:`offsite.protocol.dp`) rather than the adapter; the coordinator adds the mean delta to
    the global adapter. A node that fails or times out at a stage is simply absent from that
    stage's replies; :class:`~offsite.protocol.secagg.SecAggAbort` means redo the round.
    Flower's ClientApp runs in a fresh process for every message: keep the client between
    stages with :meth:`SecAggClient.to_bytes` in ``context.state`` (the SuperNode keeps it per
    run, on the data owner's machine; it holds private keys and shares: never send or log it).
    Update envelopes (:mod:`offsite.protocol.envelope`) can wrap each stage's bytes unchanged.

Threat model
    Honest-but-curious coordinator and SuperLink: they follow the protocol and try to learn a
    single update from what they see. Each client answers the unmasking stage once, and checks
    that the survivors and the dropped nodes partition the nodes it masked with, with at least
    ``t`` survivors; ``t > n/2`` (enforced) means no coordinator can collect ``t`` shares of both
    secrets of one client by telling different clients different stories. Not covered: an active
    coordinator substituting public keys in stage 1 (the advertisements would need signatures by
    the data owners' enrolled Ed25519 keys, :mod:`offsite.protocol.keys`, and a consistency
    round, Bonawitz et al. section 4.2), and clients sending garbage (a masked input cannot be
    range-checked; a client's bad share is caught by the commitments, and the coordinator then
    tries other ``t``-subsets).

Flower's own SecAgg+ (checked in flwr 1.41.0)
    ``flwr.server.workflow.SecAggPlusWorkflow.__call__(grid, context)`` raises ``TypeError``
    unless ``context`` is a ``flwr.server.compat.LegacyContext``: it samples and aggregates
    through a legacy ``Strategy`` (``configure_fit`` / ``aggregate_fit`` with ``ClientProxy``
    objects and ``FitIns``/``FitRes`` converted by ``flwr.compat``), as the ``fit_workflow`` of
    ``flwr.server.workflow.DefaultWorkflow``. It does talk through a ``Grid``
    (``grid.send_and_receive``), so a Message-API ``main(grid, context)`` could wrap its context
    in a ``LegacyContext`` with a legacy strategy and a client manager, but the rounds, message
    types (all ``train``) and contents would then be Flower's legacy ones, not our
    ``TrainInstruction``, bundle distribution, error codes and checkpoints. The client half,
    ``flwr.client.mod.secaggplus_mod``, can be a mod of a Message-API ``ClientApp``, but it
    handles every ``train`` message and expects the app's reply in legacy ``FitRes`` form. It
    quantises with unseeded ``np.random`` to ``2**22`` levels over ``[-8, 8]`` (step
    ``3.8e-6``) and weights by ``num_examples / max_weight`` quantised too. So it is usable only
    through the legacy strategy/workflow compatibility layer; this module is our primary path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .safe_json import JSONRefused, parse_json

if TYPE_CHECKING:  # torch is imported where tensors are handled: the key-exchange stages never need it
    import torch

RandomBytes = Callable[[int], bytes]

PROTOCOL = b"offsite/secagg/v1"
PRIME = 2**521 - 1  # Mersenne prime: the Shamir field; holds any 32-byte secret
SHARE_BYTES = 4 + 66  # x (uint32) + y (66 bytes, big-endian)
KEY_BYTES = 32
NONCE_BYTES = 12
SHARE_PLAINTEXT_BYTES = 16 + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + 16  # nonce + plaintext + GCM tag
RING_BITS = (32, 64)
ROUNDINGS = ("stochastic", "nearest")
MAX_NODES = 10_000
MAX_DIMENSION = 1 << 34
MAX_NODE_ID = 2**64 - 1
MAX_SUBSETS = 2_000  # t-subsets tried when a reconstruction fails its check
MAX_SCALED = 2.0**48  # s * c at most this: float64 has no use for a finer scale
FLOAT_ERROR = 2.0**-50  # times c: float64 evaluation of the mean

SECAGG = "secagg"  # ConfigRecord {"kind": str, "body": bytes}
SECAGG_VECTOR = "secagg-vector"  # ArrayRecord {"masked": Array} (MaskedInput only)


class SecAggError(ValueError):
    """A secure-aggregation message or state is invalid; the message names the node."""


class SecAggAbort(SecAggError):
    """The session cannot complete (fewer than ``t`` clients left at some stage)."""


# ---------------------------------------------------------------- quantisation


def ring_dtype(bits: int) -> np.dtype:
    if bits not in RING_BITS:
        raise SecAggError(f"ring bits must be one of {RING_BITS}, got {bits!r}")
    return np.dtype(np.uint64 if bits == 64 else np.uint32)


def max_scale_bits(bits: int, clip_range: float, max_weight: int, num_clients: int) -> int:
    """The largest ``f`` with ``n * w_max * (2**f * c + 1) <= 2**(bits-1) - 1`` and ``2**f * c <=
    2**48``: the finest scale at which the signed sum of ``n`` clients' weighted integers cannot
    wrap around the ring (and that float64 can still tell apart)."""
    ring_dtype(bits)
    if not (isinstance(clip_range, (int, float)) and math.isfinite(clip_range) and clip_range > 0):
        raise SecAggError(f"clip range must be a finite number > 0, got {clip_range!r}")
    if isinstance(max_weight, bool) or not isinstance(max_weight, int) or max_weight < 1:
        raise SecAggError(f"max weight must be an integer >= 1, got {max_weight!r}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise SecAggError(f"number of clients must be an integer >= 1, got {num_clients!r}")
    room = Fraction(2 ** (bits - 1) - 1, num_clients * max_weight) - 1  # 2**f * c may reach this
    if room <= 0:
        raise SecAggError(f"{num_clients} clients of weight up to {max_weight} overflow a {bits}-bit ring")
    room = min(room, Fraction(MAX_SCALED))
    scale_bits = math.floor(math.log2(room / Fraction(clip_range)))
    while Fraction(2) ** scale_bits * Fraction(clip_range) > room:  # guard float log2 at the edge
        scale_bits -= 1
    while Fraction(2) ** (scale_bits + 1) * Fraction(clip_range) <= room:
        scale_bits += 1
    return scale_bits


def check_headroom(bits: int, clip_range: float, scale_bits: int, max_weight: int, num_clients: int) -> None:
    """Raise :class:`SecAggError` if ``n`` clients' weighted integers could wrap the ring."""
    if scale_bits > max_scale_bits(bits, clip_range, max_weight, num_clients):
        raise SecAggError(
            f"scale 2**{scale_bits} with clip range {clip_range}, {num_clients} clients and weights up to "
            f"{max_weight} can overflow a {bits}-bit ring (at most 2**{max_scale_bits(bits, clip_range, max_weight, num_clients)})"
        )


def quantisation_error_bound(
    clip_range: float, scale_bits: int, num_clients: int, *, rounding: str = "stochastic", bits: int = 64, max_weight: int = 1
) -> float:
    """Per-coordinate bound on ``|secagg weighted mean - exact weighted mean|`` for updates inside
    ``[-clip_range, clip_range]``: ``rho * 2**-scale_bits + clip_range * 2**-50`` (``rho = 1``
    stochastic, ``1/2`` nearest; the second term is float64 evaluation), for any number of
    clients up to ``num_clients`` and any weights up to ``max_weight``, provided the ring has
    the headroom (checked: :class:`SecAggError` otherwise)."""
    if rounding not in ROUNDINGS:
        raise SecAggError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    check_headroom(bits, clip_range, scale_bits, max_weight, num_clients)
    return (1.0 if rounding == "stochastic" else 0.5) * 2.0**-scale_bits + clip_range * FLOAT_ERROR


def quantise(values: np.ndarray, clip_range: float, scale_bits: int, rounding: str, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
    """Clip float ``values`` to ``[-c, c]`` and round ``values * 2**scale_bits`` to int64.

    Returns the integers and how many values were clipped. Stochastic rounding is
    ``floor(v) + (u < v - floor(v))`` with ``u ~ U[0, 1)`` from ``rng``: unbiased, error < 1.
    """
    values = np.asarray(values, dtype=np.float64)
    clipped = int(np.count_nonzero(np.abs(values) > clip_range))
    scaled = np.ldexp(np.clip(values, -clip_range, clip_range), scale_bits)  # exact: power-of-two scaling
    if rounding == "nearest":
        return np.rint(scaled).astype(np.int64), clipped
    if rounding != "stochastic":
        raise SecAggError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rng is None:
        raise SecAggError("stochastic rounding needs a random generator")
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)  # scaled - low is exact
    return low.astype(np.int64) + up.astype(np.int64), clipped


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers -> ``Z_{2^bits}`` (two's complement: exactly ``values mod 2**bits``)."""
    return np.asarray(values, dtype=np.int64).astype(ring_dtype(bits))


def from_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """``Z_{2^bits}`` -> signed integers in ``[-2**(bits-1), 2**(bits-1))`` (int64)."""
    signed = np.int64 if bits == 64 else np.int32
    return np.asarray(values, dtype=ring_dtype(bits)).view(signed).astype(np.int64)


# ---------------------------------------------------------------- state dicts <-> vectors


def flatten_state(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The tensors in sorted-name order, flattened into one float64 vector; a non-finite or
    non-float tensor raises :class:`SecAggError` naming it."""
    import torch

    parts = []
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            raise SecAggError(f"tensor {name!r} is not a floating-point torch tensor")
        values = tensor.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if not np.isfinite(values).all():
            raise SecAggError(f"tensor {name!r} has non-finite values")
        parts.append(values)
    return np.concatenate(parts) if parts else np.zeros(0)


def state_dimension(state: Mapping[str, torch.Tensor]) -> int:
    return sum(int(tensor.numel()) for tensor in state.values())


def unflatten_state(vector: np.ndarray, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_state`: cut ``vector`` into ``like``'s tensors (sorted-name
    order), with ``like``'s shapes and dtypes, in ``like``'s key order."""
    import torch

    vector = np.asarray(vector, dtype=np.float64)
    if vector.ndim != 1 or vector.size != state_dimension(like):
        raise SecAggError(f"vector of shape {vector.shape} does not fill the {state_dimension(like)} values of the state dict")
    pieces, offset = {}, 0
    for name in sorted(like):
        reference = like[name]
        count = int(reference.numel())
        pieces[name] = torch.from_numpy(vector[offset : offset + count].copy()).reshape(reference.shape).to(reference.dtype)
        offset += count
    return {name: pieces[name] for name in like}


# ---------------------------------------------------------------- keys, seeds, masks


def _node_bytes(*nodes: int) -> bytes:
    return b"".join(struct.pack(">Q", node) for node in nodes)


def _kdf(secret: bytes, session: bytes, label: bytes) -> bytes:
    salt = hashlib.sha256(PROTOCOL + b"/salt/" + session).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=PROTOCOL + b"/" + label).derive(secret)


def _agree(private: bytes, public: bytes, what: str) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as error:  # low-order public key: all-zero shared secret
        raise SecAggError(f"{what}: key agreement failed ({error})") from None


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def pairwise_seed(private: bytes, peer_public: bytes, session: bytes, node: int, peer: int) -> bytes:
    """The mask seed of the pair ``{node, peer}``: the same from either side."""
    shared = _agree(private, peer_public, f"mask key of nodes {node} and {peer}")
    return _kdf(shared, session, b"pairwise-mask" + _node_bytes(min(node, peer), max(node, peer)))


def channel_key(private: bytes, peer_public: bytes, session: bytes, node: int, peer: int) -> bytes:
    """The AES-256-GCM key that carries shares between ``node`` and ``peer``."""
    shared = _agree(private, peer_public, f"channel key of nodes {node} and {peer}")
    return _kdf(shared, session, b"share-channel" + _node_bytes(min(node, peer), max(node, peer)))


def self_mask_seed(seed: bytes, session: bytes, node: int) -> bytes:
    return _kdf(seed, session, b"self-mask" + _node_bytes(node))


def self_mask_commitment(seed: bytes, session: bytes, node: int) -> bytes:
    """What a client publishes about its self-mask seed ``b`` (a hash), so that the coordinator
    can check a reconstruction without learning ``b`` early."""
    return hashlib.sha256(PROTOCOL + b"/commit/" + session + _node_bytes(node) + seed).digest()


_CHUNK = 1 << 22  # ring elements per keystream chunk


def apply_mask(target: np.ndarray, seed: bytes, sign: int) -> None:
    """``target += sign * PRG(seed)`` in place, mod ``2**k``: AES-256-CTR keystream (zero IV, a
    fresh key per seed) read as little-endian ring elements, chunk by chunk."""
    dtype = target.dtype
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(min(_CHUNK, target.size) * dtype.itemsize)
    for start in range(0, target.size, _CHUNK):
        stop = min(start + _CHUNK, target.size)
        stream = encryptor.update(zeros[: (stop - start) * dtype.itemsize])
        mask = np.frombuffer(stream, dtype=dtype.newbyteorder("<"))
        if sign > 0:
            np.add(target[start:stop], mask, out=target[start:stop])
        else:
            np.subtract(target[start:stop], mask, out=target[start:stop])


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``PRG(seed)``: ``length`` ring elements."""
    mask = np.zeros(length, dtype=ring_dtype(bits))
    apply_mask(mask, seed, +1)
    return mask


# ---------------------------------------------------------------- Shamir over GF(2**521 - 1)


@dataclass(frozen=True)
class Share:
    """One Shamir share: the point ``(x, y)`` of the sharing polynomial, ``1 <= x``, ``y < p``."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return struct.pack(">I", self.x) + self.y.to_bytes(66, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise SecAggError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x, y = struct.unpack(">I", data[:4])[0], int.from_bytes(data[4:], "big")
        if x < 1 or y >= PRIME:
            raise SecAggError(f"share ({x}, ...) is outside the field")
        return cls(x, y)


def _field_element(random_bytes: RandomBytes) -> int:
    while True:  # rejection sampling: uniform on [0, p), p = 2**521 - 1
        value = int.from_bytes(random_bytes(66), "big") & PRIME
        if value < PRIME:
            return value


def shamir_split(secret: bytes, threshold: int, xs: Sequence[int], random_bytes: RandomBytes = os.urandom) -> list[Share]:
    """Shares of ``secret`` (at most 65 bytes) at the points ``xs``: any ``threshold`` of them
    determine it, fewer reveal nothing (the polynomial has ``threshold - 1`` uniform coefficients)."""
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 1 <= x < 2**32 for x in xs):
        raise SecAggError(f"share points {list(xs)[:5]} must be distinct integers in [1, 2**32)")
    if len(secret) > 65:
        raise SecAggError(f"a secret is at most 65 bytes, got {len(secret)}")
    coefficients = [int.from_bytes(secret, "big")] + [_field_element(random_bytes) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares.append(Share(x, y))
    return shares


def shamir_combine(shares: Sequence[Share], threshold: int, length: int = KEY_BYTES) -> bytes:
    """The secret (``length`` bytes) from at least ``threshold`` shares (Lagrange interpolation at
    0 over the first ``threshold``); fewer raise :class:`SecAggError`."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} share(s) cannot reconstruct a {threshold}-of-n secret")
    points = list(shares)[:threshold]
    xs = [share.x for share in points]
    if len(set(xs)) != len(xs):
        raise SecAggError(f"duplicate share points {sorted(xs)}")
    secret = 0
    for j, share in enumerate(points):
        numerator, denominator = 1, 1
        for m, other in enumerate(xs):
            if m != j:
                numerator = numerator * other % PRIME
                denominator = denominator * (other - share.x) % PRIME
        secret = (secret + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise SecAggError(f"the shares interpolate to a value wider than {length} bytes (corrupt shares)")
    return secret.to_bytes(length, "big")


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class SecAggConfig:
    """One session's parameters, chosen by the coordinator and checked by every client.

    ``session``: 16..64 bytes binding every key, share and mask to one job and round (e.g.
    ``sha256(job id || round)``); ``threshold``: ``t``, the shares needed to reconstruct a
    secret (``t > n/2``); ``dimension``: ``d``, values in the flattened update; ``clip_range``:
    ``c``; ``scale_bits``: ``f``, the scale ``s = 2**f``; ``max_weight``: the largest integer
    weight a client may send; ``bits``: ``k``, the ring ``Z_{2^k}``; ``rounding``:
    ``stochastic`` or ``nearest``.
    """

    session: bytes
    threshold: int
    dimension: int
    clip_range: float
    scale_bits: int
    max_weight: int = 1 << 20
    bits: int = 64
    rounding: str = "stochastic"

    def __post_init__(self) -> None:
        if not isinstance(self.session, bytes) or not 16 <= len(self.session) <= 64:
            raise SecAggError(f"session must be 16 to 64 bytes, got {self.session!r}")
        for name in ("threshold", "dimension", "scale_bits", "max_weight", "bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SecAggError(f"config {name} must be an integer, got {value!r}")
        if not 2 <= self.threshold <= MAX_NODES:
            raise SecAggError(f"threshold must be in [2, {MAX_NODES}], got {self.threshold}")
        if not 1 <= self.dimension <= MAX_DIMENSION:
            raise SecAggError(f"dimension must be in [1, {MAX_DIMENSION}], got {self.dimension}")
        if not -1074 <= self.scale_bits <= 1000:
            raise SecAggError(f"scale bits out of range: {self.scale_bits}")
        if self.rounding not in ROUNDINGS:
            raise SecAggError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        ring_dtype(self.bits)
        max_scale_bits(self.bits, self.clip_range, self.max_weight, 1)  # validates clip_range, max_weight

    @classmethod
    def for_job(
        cls, session: bytes, dimension: int, num_clients: int, clip_range: float, *, max_weight: int = 1 << 20,
        bits: int = 64, threshold: int | None = None, rounding: str = "stochastic",
    ) -> SecAggConfig:
        """The finest scale that ``num_clients`` can use without overflow, and ``t = n//2 + 1`` unless given."""
        return cls(
            session=session,
            threshold=num_clients // 2 + 1 if threshold is None else threshold,
            dimension=dimension,
            clip_range=float(clip_range),
            scale_bits=max_scale_bits(bits, float(clip_range), max_weight, num_clients),
            max_weight=max_weight,
            bits=bits,
            rounding=rounding,
        )

    def check_nodes(self, num_nodes: int) -> None:
        """Raise unless ``num_nodes`` invited clients fit: ``n/2 < t <= n`` and the ring's headroom."""
        if not self.threshold <= num_nodes <= MAX_NODES:
            raise SecAggError(f"{num_nodes} node(s) for threshold {self.threshold}: need between t and {MAX_NODES}")
        if 2 * self.threshold <= num_nodes:
            raise SecAggError(f"threshold {self.threshold} must be more than half of the {num_nodes} nodes")
        check_headroom(self.bits, self.clip_range, self.scale_bits, self.max_weight, num_nodes)

    def error_bound(self, num_nodes: int) -> float:
        """:func:`quantisation_error_bound` for this config and ``num_nodes`` clients."""
        return quantisation_error_bound(
            self.clip_range, self.scale_bits, num_nodes, rounding=self.rounding, bits=self.bits, max_weight=self.max_weight
        )

    def to_json(self) -> dict:
        return {
            "session": _b64(self.session), "threshold": self.threshold, "dimension": self.dimension,
            "clip_range": self.clip_range, "scale_bits": self.scale_bits, "max_weight": self.max_weight,
            "bits": self.bits, "rounding": self.rounding,
        }

    @classmethod
    def from_json(cls, value: object) -> SecAggConfig:
        fields = _fields(value, "config", {"session", "threshold", "dimension", "clip_range", "scale_bits", "max_weight", "bits", "rounding"})
        clip = fields["clip_range"]
        if isinstance(clip, bool) or not isinstance(clip, (int, float)):
            raise SecAggError(f"config clip_range must be a number, got {clip!r}")
        if not isinstance(fields["rounding"], str):
            raise SecAggError(f"config rounding must be a string, got {fields['rounding']!r}")
        return cls(
            session=_unb64(fields["session"], "config session"),
            threshold=fields["threshold"], dimension=fields["dimension"], clip_range=float(clip),
            scale_bits=fields["scale_bits"], max_weight=fields["max_weight"], bits=fields["bits"], rounding=fields["rounding"],
        )


# ---------------------------------------------------------------- JSON helpers (the only parser used on received bytes)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, length: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise SecAggError(f"{what}: expected base64 text, got {type(value).__name__}")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise SecAggError(f"{what}: not base64") from None
    if length is not None and len(data) != length:
        raise SecAggError(f"{what}: expected {length} bytes, got {len(data)}")
    return data


def _fields(value: object, what: str, names: set[str]) -> dict:
    if not isinstance(value, dict) or set(value) != names:
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise SecAggError(f"{what}: expected fields {sorted(names)}, got {got}")
    return value


def _node(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NODE_ID:
        raise SecAggError(f"{what}: {value!r} is not a node id")
    return value


def _nodes(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NODES:
        raise SecAggError(f"{what}: expected a list of at most {MAX_NODES} node ids")
    nodes = tuple(_node(item, what) for item in value)
    if list(nodes) != sorted(set(nodes)):
        raise SecAggError(f"{what}: node ids must be sorted and distinct")
    return nodes


def _pairs(value: object, what: str, length: int) -> tuple[tuple[int, bytes], ...]:
    """``[[node, base64], ...]`` sorted by distinct node -> ``((node, bytes), ...)``."""
    if not isinstance(value, list) or len(value) > MAX_NODES:
        raise SecAggError(f"{what}: expected a list of at most {MAX_NODES} [node, data] pairs")
    pairs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise SecAggError(f"{what}: expected [node, data] pairs")
        node = _node(item[0], what)
        pairs.append((node, _unb64(item[1], f"{what} of node {node}", length)))
    nodes = [node for node, _ in pairs]
    if nodes != sorted(set(nodes)):
        raise SecAggError(f"{what}: nodes must be sorted and distinct")
    return tuple(pairs)


def _encode(kind: str, body: dict) -> bytes:
    return json.dumps({"kind": kind, **body}, sort_keys=True, separators=(",", ":")).encode("utf-8")


MAX_HEADER_BYTES = 64 << 20


def _decode(data: bytes, kind: str, names: set[str]) -> dict:
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_HEADER_BYTES:
        raise SecAggError(f"{kind}: expected at most {MAX_HEADER_BYTES} bytes")
    try:
        value = parse_json(data)
    except JSONRefused as error:
        raise SecAggError(f"{kind}: not a JSON message ({error})") from None
    if not isinstance(value, dict) or value.get("kind") != kind:
        got = value.get("kind") if isinstance(value, dict) else type(value).__name__
        raise SecAggError(f"expected a {kind!r} message, got {got!r}")
    del value["kind"]
    return _fields(value, kind, names)


# ---------------------------------------------------------------- messages


M = TypeVar("M", "SetupRequest", "KeyAdvertisement", "KeyRoster", "EncryptedShares", "ShareBundle", "MaskedInput", "UnmaskRequest", "UnmaskShares")


@dataclass(frozen=True)
class SetupRequest:
    """Stage 0, coordinator -> every invited node: the session's config and who is invited."""

    KIND = "secagg.setup"
    config: SecAggConfig
    nodes: tuple[int, ...]

    def to_bytes(self) -> bytes:
        return _encode(self.KIND, {"config": self.config.to_json(), "nodes": list(self.nodes)})

    @classmethod
    def from_bytes(cls, data: bytes) -> SetupRequest:
        body = _decode(data, cls.KIND, {"config", "nodes"})
        return cls(SecAggConfig.from_json(body["config"]), _nodes(body["nodes"], "setup nodes"))


@dataclass(frozen=True)
class KeyAdvertisement:
    """Stage 0 reply: the node's two X25519 public keys for this session."""

    KIND = "secagg.keys"
    session: bytes
    node: int
    channel_key: bytes  # X25519 public key for the share channel
    mask_key: bytes  # X25519 public key for mask agreement

    def to_bytes(self) -> bytes:
        return _encode(self.KIND, {"session": _b64(self.session), "node": self.node, "channel_key": _b64(self.channel_key), "mask_key": _b64(self.mask_key)})

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyAdvertisement:
        body = _decode(data, cls.KIND, {"session", "node", "channel_key", "mask_key"})
        return cls(
            _unb64(body["session"], "keys session"), _node(body["node"], "keys node"),
            _unb64(body["channel_key"], "channel key", KEY_BYTES), _unb64(body["mask_key"], "mask key", KEY_BYTES),
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
        return _encode(self.KIND, {
            "session": _b64(self.session), "nodes": list(self.nodes),
            "channel_keys": [_b64(key) for key in self.channel_keys], "mask_keys": [_b64(key) for key in self.mask_keys],
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRoster:
        body = _decode(data, cls.KIND, {"session", "nodes", "channel_keys", "mask_keys"})
        nodes = _nodes(body["nodes"], "roster nodes")
        keys = []
        for name in ("channel_keys", "mask_keys"):
            if not isinstance(body[name], list) or len(body[name]) != len(nodes):
                raise SecAggError(f"roster {name}: expected {len(nodes)} keys")
            keys.append(tuple(_unb64(key, f"roster {name} of node {node}", KEY_BYTES) for node, key in zip(nodes, body[name], strict=True)))
        return cls(_unb64(body["session"], "roster session"), nodes, keys[0], keys[1])


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
        return _encode(self.KIND, {
            "session": _b64(self.session), "node": self.node, "commitment": _b64(self.commitment),
            "ciphertexts": [[node, _b64(data)] for node, data in self.ciphertexts],
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedShares:
        body = _decode(data, cls.KIND, {"session", "node", "commitment", "ciphertexts"})
        return cls(
            _unb64(body["session"], "shares session"), _node(body["node"], "shares node"),
            _unb64(body["commitment"], "commitment", 32), _pairs(body["ciphertexts"], "ciphertext", CIPHERTEXT_BYTES),
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
        return _encode(self.KIND, {
            "session": _b64(self.session), "recipient": self.recipient,
            "ciphertexts": [[node, _b64(data)] for node, data in self.ciphertexts],
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> ShareBundle:
        body = _decode(data, cls.KIND, {"session", "recipient", "ciphertexts"})
        return cls(_unb64(body["session"], "bundle session"), _node(body["recipient"], "bundle recipient"), _pairs(body["ciphertexts"], "ciphertext", CIPHERTEXT_BYTES))


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Stage 2 reply: ``[w * q(x), w] + masks`` in ``Z_{2^k}``, ``d + 1`` elements."""

    KIND = "secagg.masked-input"
    session: bytes
    node: int
    vector: np.ndarray

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MaskedInput) and (self.session, self.node) == (other.session, other.node)
            and self.vector.dtype == other.vector.dtype and np.array_equal(self.vector, other.vector)
        )

    __hash__ = None

    def header(self) -> bytes:
        return _encode(self.KIND, {"session": _b64(self.session), "node": self.node, "dtype": self.vector.dtype.name, "length": int(self.vector.size)})

    def to_bytes(self) -> bytes:
        """Header length (4 bytes, big-endian), JSON header, then the little-endian elements."""
        header = self.header()
        return struct.pack(">I", len(header)) + header + self.vector.astype(self.vector.dtype.newbyteorder("<")).tobytes()

    @classmethod
    def _parse_header(cls, header: bytes) -> tuple[bytes, int, np.dtype, int]:
        body = _decode(header, cls.KIND, {"session", "node", "dtype", "length"})
        if body["dtype"] not in ("uint64", "uint32"):
            raise SecAggError(f"masked input: dtype {body['dtype']!r} is not uint64 or uint32")
        length = body["length"]
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_DIMENSION + 1:
            raise SecAggError(f"masked input: length {length!r} out of range")
        return _unb64(body["session"], "masked input session"), _node(body["node"], "masked input node"), np.dtype(body["dtype"]), length

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
        return _encode(self.KIND, {"session": _b64(self.session), "survivors": list(self.survivors), "dropped": list(self.dropped)})

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        body = _decode(data, cls.KIND, {"session", "survivors", "dropped"})
        return cls(_unb64(body["session"], "unmask session"), _nodes(body["survivors"], "survivors"), _nodes(body["dropped"], "dropped"))


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
        return _encode(self.KIND, {
            "session": _b64(self.session), "node": self.node,
            "self_mask_shares": [[node, _b64(data)] for node, data in self.self_mask_shares],
            "mask_key_shares": [[node, _b64(data)] for node, data in self.mask_key_shares],
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskShares:
        body = _decode(data, cls.KIND, {"session", "node", "self_mask_shares", "mask_key_shares"})
        return cls(
            _unb64(body["session"], "unmask shares session"), _node(body["node"], "unmask shares node"),
            _pairs(body["self_mask_shares"], "self-mask share", SHARE_BYTES), _pairs(body["mask_key_shares"], "mask-key share", SHARE_BYTES),
        )


MASKED_TENSOR = "masked"  # a MaskedInput's vector as a tensor (to seal it in an update envelope)


def masked_input_tensors(masked: MaskedInput) -> dict[str, torch.Tensor]:
    """``{"masked": int64 (or int32) tensor}``: the ring elements reinterpreted as signed
    integers (same bits), the form an update envelope carries (safetensors has no uint64)."""
    import torch

    signed = np.int64 if masked.vector.dtype.itemsize == 8 else np.int32
    return {MASKED_TENSOR: torch.from_numpy(np.ascontiguousarray(masked.vector).view(signed).copy())}


def masked_input_reference(config: SecAggConfig) -> dict[str, torch.Tensor]:
    """What :func:`masked_input_tensors` must look like for ``config`` (keys, shape, dtype): the
    reference an envelope opener checks a sealed masked input against."""
    import torch

    return {MASKED_TENSOR: torch.zeros(config.dimension + 1, dtype=torch.int64 if config.bits == 64 else torch.int32)}


def masked_input_from_tensors(session: bytes, node: int, tensors: Mapping[str, torch.Tensor], bits: int) -> MaskedInput:
    """Inverse of :func:`masked_input_tensors` (the tensors already checked against
    :func:`masked_input_reference`)."""
    if set(tensors) != {MASKED_TENSOR}:
        raise SecAggError(f"masked input of node {node}: expected the one tensor {MASKED_TENSOR!r}, got {sorted(tensors)[:3]}")
    values = tensors[MASKED_TENSOR].detach().to("cpu").numpy()
    dtype = ring_dtype(bits)
    if values.ndim != 1 or values.dtype.itemsize != dtype.itemsize or values.dtype.kind != "i":
        raise SecAggError(f"masked input of node {node}: {values.dtype}{values.shape} is not a vector of {bits}-bit integers")
    return MaskedInput(session, node, np.ascontiguousarray(values).view(dtype).copy())


MESSAGES: dict[str, type] = {cls.KIND: cls for cls in (SetupRequest, KeyAdvertisement, KeyRoster, EncryptedShares, ShareBundle, MaskedInput, UnmaskRequest, UnmaskShares)}


def to_content(message: object):
    """A stage message as a Flower ``RecordDict``: ``{"secagg": ConfigRecord{"kind", "body"}}``,
    plus ``{"secagg-vector": ArrayRecord{"masked": uint array}}`` for a :class:`MaskedInput`
    (whose ``body`` is then only its JSON header)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    if type(message) not in MESSAGES.values():
        raise SecAggError(f"not a secure-aggregation message: {type(message).__name__}")
    if isinstance(message, MaskedInput):
        vector = ArrayRecord({"masked": Array.from_numpy_ndarray(np.ascontiguousarray(message.vector))})
        return RecordDict({SECAGG: ConfigRecord({"kind": message.KIND, "body": message.header()}), SECAGG_VECTOR: vector})
    return RecordDict({SECAGG: ConfigRecord({"kind": message.KIND, "body": message.to_bytes()})})


def from_content(content, expected: type[M]) -> M:
    """Inverse of :func:`to_content`; :class:`SecAggError` unless it holds an ``expected``."""
    if SECAGG not in content.config_records:
        raise SecAggError(f"message lacks the {SECAGG!r} config record")
    record = content.config_records[SECAGG]
    kind, body = record.get("kind"), record.get("body")
    if kind != expected.KIND or not isinstance(body, bytes):
        raise SecAggError(f"expected a {expected.KIND!r} message, got {kind!r}")
    if expected is not MaskedInput:
        return expected.from_bytes(body)
    session, node, dtype, length = MaskedInput._parse_header(body)
    array = content.array_records[SECAGG_VECTOR].get("masked") if SECAGG_VECTOR in content.array_records else None
    if array is None or array.stype != "numpy.ndarray" or array.dtype != dtype.name or tuple(array.shape) != (length,):
        raise SecAggError(f"masked input of node {node}: the {SECAGG_VECTOR!r} array is not {length} {dtype.name} values")
    try:
        vector = array.numpy()  # np.load(allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - np.load on received bytes: whatever it raises, the array is unreadable
        raise SecAggError(f"masked input of node {node}: unreadable array ({type(error).__name__}: {str(error)[:200]})") from None
    if vector.dtype != dtype or vector.shape != (length,):
        raise SecAggError(f"masked input of node {node}: payload is {vector.dtype}{vector.shape}, header says {dtype.name}({length},)")
    return MaskedInput(session, node, np.ascontiguousarray(vector, dtype=dtype))


# ---------------------------------------------------------------- share encryption


def _share_associated_data(session: bytes, sender: int, recipient: int) -> bytes:
    return PROTOCOL + b"/share/" + session + _node_bytes(sender, recipient)


def encrypt_shares(key: bytes, session: bytes, sender: int, recipient: int, mask_key_share: Share, self_mask_share: Share, nonce: bytes) -> bytes:
    plaintext = _node_bytes(sender, recipient) + mask_key_share.to_bytes() + self_mask_share.to_bytes()
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _share_associated_data(session, sender, recipient))


def decrypt_shares(key: bytes, session: bytes, sender: int, recipient: int, ciphertext: bytes) -> tuple[Share, Share]:
    """``(mask-key share, self-mask share)``; a tampered or misrouted ciphertext raises
    :class:`SecAggError` naming the sender."""
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise SecAggError(f"shares from node {sender}: {len(ciphertext)} bytes, expected {CIPHERTEXT_BYTES}")
    try:
        plaintext = AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], _share_associated_data(session, sender, recipient))
    except InvalidTag:
        raise SecAggError(f"shares from node {sender} to node {recipient} fail authentication (tampered, misrouted or another session)") from None
    if plaintext[:16] != _node_bytes(sender, recipient):
        raise SecAggError(f"shares from node {sender}: addressed to another pair")
    return Share.from_bytes(plaintext[16 : 16 + SHARE_BYTES]), Share.from_bytes(plaintext[16 + SHARE_BYTES :])


# ---------------------------------------------------------------- the client


STAGES = ("new", "advertised", "shared", "masked", "done")


class SecAggClient:
    """One data owner's side of one session: ``new -> advertise -> share_keys -> masked_input ->
    unmask -> done``. Each call checks the stage and the message, and raises
    :class:`SecAggError` naming the offending node; after an error, abandon the session.

    ``random_bytes`` is the entropy source (``os.urandom``; tests pass a seeded one).
    """

    def __init__(self, node: int, random_bytes: RandomBytes = os.urandom) -> None:
        self.node = _node(node, "client node")
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
        return KeyAdvertisement(self.config.session, self.node, public_key(self.channel_private), public_key(self.mask_private))

    # -- stage 1
    def share_keys(self, roster: KeyRoster) -> EncryptedShares:
        self._expect("advertised", roster.session)
        config = self.config
        if self.node not in roster.nodes:
            raise SecAggError(f"node {self.node}: not in the key roster")
        if len(roster.nodes) < config.threshold:
            raise SecAggAbort(f"node {self.node}: {len(roster.nodes)} node(s) in the roster, threshold {config.threshold}")
        if 2 * config.threshold <= len(roster.nodes):
            raise SecAggError(f"node {self.node}: threshold {config.threshold} is not more than half of the {len(roster.nodes)} roster nodes")
        mine = roster.position(self.node) - 1
        if roster.channel_keys[mine] != public_key(self.channel_private) or roster.mask_keys[mine] != public_key(self.mask_private):
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
                self.mask_key_shares[self.node], self.self_mask_shares[self.node] = key_shares[index], seed_shares[index]
                continue
            key = channel_key(self.channel_private, roster.channel_keys[index], config.session, self.node, peer)
            nonce = self.random_bytes(NONCE_BYTES)
            ciphertexts.append((peer, encrypt_shares(key, config.session, self.node, peer, key_shares[index], seed_shares[index], nonce)))
        self.stage = "shared"
        return EncryptedShares(config.session, self.node, self_mask_commitment(self.self_seed, config.session, self.node), tuple(ciphertexts))

    # -- stage 2
    def masked_input(self, bundle: ShareBundle, update: Mapping[str, torch.Tensor] | np.ndarray, weight: int, *, strict: bool = False) -> MaskedInput:
        """Decrypt the shares addressed to this node, then quantise and mask ``update`` (a state
        dict or a flat float vector of ``dimension`` values) with integer ``weight``.

        Values outside ``[-c, c]`` are clipped and counted in :attr:`clipped`, or, with
        ``strict``, raise naming the tensor.
        """
        self._expect("shared", bundle.session)
        config, roster = self.config, self.roster
        if bundle.recipient != self.node:
            raise SecAggError(f"node {self.node}: share bundle addressed to node {bundle.recipient}")
        if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or not 0 <= weight <= config.max_weight:
            raise SecAggError(f"node {self.node}: weight {weight!r} is not an integer in [0, {config.max_weight}]")
        vector = self._update_vector(update, strict)
        senders = [sender for sender, _ in bundle.ciphertexts]
        for sender, ciphertext in bundle.ciphertexts:
            if sender == self.node or sender not in roster.nodes:
                raise SecAggError(f"node {self.node}: shares from node {sender}, which is not a peer in the roster")
            key = channel_key(self.channel_private, roster.channel_keys[roster.position(sender) - 1], config.session, self.node, sender)
            key_share, seed_share = decrypt_shares(key, config.session, sender, self.node, ciphertext)
            if key_share.x != roster.position(self.node) or seed_share.x != roster.position(self.node):
                raise SecAggError(f"node {self.node}: shares from node {sender} are for another share point")
            self.mask_key_shares[sender], self.self_mask_shares[sender] = key_share, seed_share
        group = tuple(sorted([*senders, self.node]))
        if len(group) < config.threshold:
            raise SecAggAbort(f"node {self.node}: {len(group)} node(s) distributed shares, threshold {config.threshold}")

        rng = np.random.Generator(np.random.PCG64(int.from_bytes(self.random_bytes(32), "big")))
        integers, self.clipped = quantise(vector, config.clip_range, config.scale_bits, config.rounding, rng)
        masked = np.empty(config.dimension + 1, dtype=ring_dtype(config.bits))
        masked[:-1] = to_ring(integers * np.int64(weight), config.bits)  # |w q| < 2**(k-1): checked headroom
        masked[-1] = weight
        apply_mask(masked, self_mask_seed(self.self_seed, config.session, self.node), +1)
        for peer in group:
            if peer != self.node:
                seed = pairwise_seed(self.mask_private, roster.mask_keys[roster.position(peer) - 1], config.session, self.node, peer)
                apply_mask(masked, seed, +1 if self.node < peer else -1)
        self.group = group
        self.channel_private = self.mask_private = self.self_seed = b""  # the coordinator recovers what it needs from shares
        self.stage = "masked"
        return MaskedInput(config.session, self.node, masked)

    def _update_vector(self, update: Mapping[str, torch.Tensor] | np.ndarray, strict: bool) -> np.ndarray:
        import torch

        config = self.config
        if isinstance(update, Mapping):
            for name, tensor in update.items():
                if strict and isinstance(tensor, torch.Tensor) and tensor.numel() and float(tensor.detach().abs().max()) > config.clip_range:
                    raise SecAggError(f"node {self.node}: tensor {name!r} reaches {float(tensor.detach().abs().max()):.4g}, outside the clip range {config.clip_range}")
            try:
                vector = flatten_state(update)
            except SecAggError as error:
                raise SecAggError(f"node {self.node}: {error}") from None
        else:
            vector = np.asarray(update, dtype=np.float64)
            if vector.ndim != 1 or not np.isfinite(vector).all():
                raise SecAggError(f"node {self.node}: the update vector is not a finite 1-d array")
            if strict and vector.size and np.abs(vector).max() > config.clip_range:
                raise SecAggError(f"node {self.node}: the update reaches {np.abs(vector).max():.4g}, outside the clip range {config.clip_range}")
        if vector.size != config.dimension:
            raise SecAggError(f"node {self.node}: the update has {vector.size} values, the session expects {config.dimension}")
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
            raise SecAggError(f"node {self.node}: survivors and dropped {sorted(survivors | dropped)} are not the nodes masked with {list(self.group)}")
        if len(survivors) < self.config.threshold:
            raise SecAggAbort(f"node {self.node}: {len(survivors)} survivor(s), threshold {self.config.threshold}")
        reply = UnmaskShares(
            self.config.session, self.node,
            tuple((owner, self.self_mask_shares[owner].to_bytes()) for owner in sorted(survivors)),
            tuple((owner, self.mask_key_shares[owner].to_bytes()) for owner in sorted(dropped)),
        )
        self.mask_key_shares, self.self_mask_shares = {}, {}
        self.stage = "done"
        return reply

    # -- persistence between Flower messages (secrets: keep it on the data owner's machine)
    def to_bytes(self) -> bytes:
        return json.dumps({
            "node": self.node, "stage": self.stage,
            "config": None if self.config is None else self.config.to_json(),
            "roster": None if self.roster is None else self.roster.to_bytes().decode("utf-8"),
            "channel_private": _b64(self.channel_private), "mask_private": _b64(self.mask_private), "self_seed": _b64(self.self_seed),
            "group": list(self.group), "clipped": self.clipped,
            "mask_key_shares": [[node, _b64(share.to_bytes())] for node, share in sorted(self.mask_key_shares.items())],
            "self_mask_shares": [[node, _b64(share.to_bytes())] for node, share in sorted(self.self_mask_shares.items())],
        }, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, random_bytes: RandomBytes = os.urandom) -> SecAggClient:
        try:
            value = parse_json(data)
        except JSONRefused as error:
            raise SecAggError(f"client state: not JSON ({error})") from None
        fields = _fields(value, "client state", {
            "node", "stage", "config", "roster", "channel_private", "mask_private", "self_seed", "group", "clipped", "mask_key_shares", "self_mask_shares",
        })
        client = cls(_node(fields["node"], "client state node"), random_bytes)
        if fields["stage"] not in STAGES:
            raise SecAggError(f"client state: unknown stage {fields['stage']!r}")
        client.stage = fields["stage"]
        client.config = None if fields["config"] is None else SecAggConfig.from_json(fields["config"])
        if fields["roster"] is not None:
            if not isinstance(fields["roster"], str):
                raise SecAggError("client state: roster is not text")
            client.roster = KeyRoster.from_bytes(fields["roster"].encode("utf-8"))
        for name in ("channel_private", "mask_private", "self_seed"):
            secret = _unb64(fields[name], f"client state {name}")
            if len(secret) not in (0, KEY_BYTES):
                raise SecAggError(f"client state {name}: expected {KEY_BYTES} bytes")
            setattr(client, name, secret)
        client.group = _nodes(fields["group"], "client state group")
        if isinstance(fields["clipped"], bool) or not isinstance(fields["clipped"], int):
            raise SecAggError("client state: clipped is not an integer")
        client.clipped = fields["clipped"]
        for name in ("mask_key_shares", "self_mask_shares"):
            setattr(client, name, {node: Share.from_bytes(data) for node, data in _pairs(fields[name], f"client state {name}", SHARE_BYTES)})
        return client
