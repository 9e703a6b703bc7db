"""One check for "this state dict has the same tensors as that one": the coordinator (updates
against the global adapter), the aggregator (updates against each other), client-side DP
(tuned against global) and serving (an adapter against the base model) all ask it."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def check_like(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    error: type[Exception] = ValueError,
    where: str = "",
    *,
    prefix: str = "",
    floating: bool = False,
    finite: bool = False,
) -> None:
    """Raise ``error`` unless ``state`` holds exactly ``reference``'s tensor names with the same
    shapes; with ``floating`` every tensor must be floating point, with ``finite`` also free of
    NaN and inf. The message starts with ``where`` and names the tensor (``prefix + name``)."""
    lead = f"{where}: " if where else ""
    if set(state) != set(reference):
        extra, missing = sorted(set(state) - set(reference)), sorted(set(reference) - set(state))
        raise error(
            f"{lead}unexpected tensors {[prefix + k for k in extra[:3]]}, missing {[prefix + k for k in missing[:3]]}"
        )
    for name, like in reference.items():
        tensor = state[name]
        if tuple(tensor.shape) != tuple(like.shape):
            raise error(f"{lead}tensor {prefix + name!r}: shape {tuple(tensor.shape)}, expected {tuple(like.shape)}")
        if (floating or finite) and not tensor.dtype.is_floating_point:
            raise error(f"{lead}tensor {prefix + name!r}: non-float dtype {tensor.dtype}")
        if finite and not bool(torch.isfinite(tensor).all()):
            raise error(f"{lead}tensor {prefix + name!r}: non-finite values")
