"""Ring arithmetic and quantisation: float updates clipped to ``[-c, c]``, scaled by ``2**f`` and
rounded to integers in ``Z_{2^k}``, the headroom that keeps a sum of ``n`` weighted inputs from
wrapping, the error bound of the decoded mean, and state dicts <-> flat float64 vectors.
The derivation of the bound is in ``docs/security.md`` ("Secure aggregation")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from .errors import SecAggError

if TYPE_CHECKING:  # torch is imported where tensors are handled: the key-exchange stages never need it
    import torch

RING_BITS = (32, 64)
ROUNDINGS = ("stochastic", "nearest")
MAX_SCALED = 2.0**48  # s * c at most this: float64 has no use for a finer scale
FLOAT_ERROR = 2.0**-50  # times c: float64 evaluation of the mean


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
            f"{max_weight} can overflow a {bits}-bit ring "
            f"(at most 2**{max_scale_bits(bits, clip_range, max_weight, num_clients)})"
        )


def quantisation_error_bound(
    clip_range: float,
    scale_bits: int,
    num_clients: int,
    *,
    rounding: str = "stochastic",
    bits: int = 64,
    max_weight: int = 1,
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


def quantise(
    values: np.ndarray, clip_range: float, scale_bits: int, rounding: str, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, int]:
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
        raise SecAggError(
            f"vector of shape {vector.shape} does not fill the {state_dimension(like)} values of the state dict"
        )
    pieces, offset = {}, 0
    for name in sorted(like):
        reference = like[name]
        count = int(reference.numel())
        piece = torch.from_numpy(vector[offset : offset + count].copy())
        pieces[name] = piece.reshape(reference.shape).to(reference.dtype)
        offset += count
    return {name: pieces[name] for name in like}
