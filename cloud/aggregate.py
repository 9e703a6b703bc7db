"""Aggregation of adapter updates: pure functions over state dicts, no Flower, no I/O.

Every function takes ``updates``: a list of ``(state_dict, weight)`` pairs whose state dicts
share the same keys, shapes and dtypes, and returns one state dict with the dtypes of the
first update. Arithmetic runs in float64 and is cast back at the end.

- :func:`fedavg`: ``theta = sum_i w_i theta_i / sum_i w_i`` (McMahan et al. 2017), the weights
  being the clients' example counts.
- :func:`trimmed_mean`: per coordinate, drop the ``floor(trim_fraction * n)`` smallest and
  largest values and average the rest (unweighted; Yin et al. 2018).
- :func:`coordinate_median`: per coordinate, the median (unweighted; for even ``n`` the mean of
  the two middle values, as ``numpy.median``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from offsite.protocol.tensors import check_like

Update = tuple[dict[str, torch.Tensor], float]


class AggregationError(ValueError):
    """Updates that cannot be combined; the message names the tensor or the update."""


def check_compatible(updates: Sequence[Update]) -> None:
    """Raise :class:`AggregationError` unless every update has the keys and shapes of the first,
    and every weight is a finite number >= 0 with a positive total."""
    if not updates:
        raise AggregationError("nothing to aggregate: no updates")
    reference, _ = updates[0]
    for index, (state, weight) in enumerate(updates):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise AggregationError(f"update {index}: weight {weight!r} is not a finite number >= 0")
        check_like(state, reference, AggregationError, f"update {index} (against update 0)", floating=True)
    if sum(float(weight) for _, weight in updates) <= 0:
        raise AggregationError("the weights of the updates sum to zero")


def _stacked(updates: Sequence[Update], key: str) -> torch.Tensor:
    """``(n, *shape)`` float64 stack of tensor ``key`` across the updates."""
    return torch.stack([state[key].detach().to("cpu", torch.float64) for state, _ in updates])


def fedavg(updates: Sequence[Update]) -> dict[str, torch.Tensor]:
    """Weighted mean ``sum_i w_i theta_i / sum_i w_i`` of every tensor, accumulated in float64."""
    check_compatible(updates)
    weights = torch.tensor([float(weight) for _, weight in updates], dtype=torch.float64)
    weights = weights / weights.sum()  # (n,)
    reference, _ = updates[0]
    merged = {}
    for key, like in reference.items():
        stacked = _stacked(updates, key)  # (n, *shape)
        mean = torch.tensordot(weights, stacked, dims=1)  # (*shape)
        merged[key] = mean.to(like.dtype)
    return merged


def trimmed_mean(updates: Sequence[Update], trim_fraction: float) -> dict[str, torch.Tensor]:
    """Per-coordinate mean after dropping the ``floor(trim_fraction * n)`` lowest and highest
    values. Weights are ignored (only checked); ``0 <= trim_fraction < 0.5``."""
    if not 0 <= trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    check_compatible(updates)
    n = len(updates)
    cut = math.floor(trim_fraction * n)
    reference, _ = updates[0]
    merged = {}
    for key, like in reference.items():
        ordered, _ = torch.sort(_stacked(updates, key), dim=0)  # (n, *shape)
        merged[key] = ordered[cut : n - cut].mean(dim=0).to(like.dtype)
    return merged


def coordinate_median(updates: Sequence[Update]) -> dict[str, torch.Tensor]:
    """Per-coordinate median; for an even number of updates the mean of the two middle values."""
    check_compatible(updates)
    n = len(updates)
    reference, _ = updates[0]
    merged = {}
    for key, like in reference.items():
        ordered, _ = torch.sort(_stacked(updates, key), dim=0)  # (n, *shape)
        middle = ordered[(n - 1) // 2 : n // 2 + 1].mean(dim=0)
        merged[key] = middle.to(like.dtype)
    return merged


AGGREGATORS = ("fedavg", "trimmed-mean", "median")


def aggregate(name: str, updates: Sequence[Update], trim_fraction: float = 0.1) -> dict[str, torch.Tensor]:
    """Dispatch by name: ``fedavg``, ``trimmed-mean`` or ``median``."""
    if name == "fedavg":
        return fedavg(updates)
    if name == "trimmed-mean":
        return trimmed_mean(updates, trim_fraction)
    if name == "median":
        return coordinate_median(updates)
    raise AggregationError(f"unknown aggregator {name!r} (known: {', '.join(AGGREGATORS)})")


def lora_stack(
    blocks: dict[str, torch.Tensor], updates: Sequence[Update], alpha: float, transposed: bool = False
) -> dict[str, torch.Tensor]:
    """Exact FedAvg of LoRA updates merged into whole blocks: ``W + sum_i p_i (alpha/r) B_i A_i``
    with ``p_i = w_i / sum_j w_j``, computed as one product of the stacked factors
    ``[p_1 B_1 | ... | p_n B_n] @ [A_1; ...; A_n]`` (rank ``n r``), in float64.

    The mean of the factors is not this: ``mean(B) mean(A) != mean(B A)`` (:func:`fedavg` of
    the factors, the ``factors`` baseline). ``transposed``: Conv1D weights stored ``(in, out)``.
    """
    check_compatible(updates)
    weights = torch.tensor([float(weight) for _, weight in updates], dtype=torch.float64)
    weights = weights / weights.sum()  # (n,)
    reference, _ = updates[0]
    merged = dict(blocks)
    for key in sorted(reference):
        if not key.endswith(".lora_A"):
            continue
        stem = key[: -len(".lora_A")]
        if stem + ".lora_B" not in reference:
            raise AggregationError(f"LoRA factor {key} has no {stem}.lora_B")
        weight_key = stem + ".weight"
        if weight_key not in blocks:
            raise AggregationError(f"LoRA factor {key} has no weight {weight_key} in the global adapter")
        a_stack = _stacked(updates, key).flatten(0, 1)  # (n r, in)
        b_stack = _stacked(updates, stem + ".lora_B")  # (n, out, r)
        rank = b_stack.shape[-1]
        b_stack = (weights[:, None, None] * b_stack).permute(1, 0, 2).flatten(1)  # (out, n r)
        delta = (alpha / rank) * (b_stack @ a_stack)  # (out, in)
        if transposed:
            delta = delta.T
        like = blocks[weight_key]
        merged[weight_key] = (like.to(torch.float64) + delta).to(like.dtype)
    return merged
