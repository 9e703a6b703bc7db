"""Which middle blocks an emulator keeps: the ones that change the representation most, measured
with linear CKA (Kornblith et al., 2019).

CRaSh (Zhang et al., 2023) observed that a model's consecutive layers fall into runs whose
representations barely differ; ShortGPT (Men et al., 2024) ranks blocks by how much each changes
its input ("block influence"). Here a block's influence is ``1 - CKA`` between its input and its
output hidden states on a few corpus blocks, and the emulator keeps the ``k`` middle blocks of
highest influence, in order: runs of near-identity blocks are removed, blocks that transform a
lot are kept. Uniform layer drop (:meth:`SandwichShape.kept_middle`) ignores all of this.

The first position of every sequence is left out: its hidden states carry the attention sink's
outliers, which would otherwise decide a linear CKA on their own.
"""

from __future__ import annotations

import torch
from torch import nn

from .distill import BlockTap
from .sandwich import SandwichShape, num_blocks

SELECTIONS = ("uniform", "cka")


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two (n, d) representations of the same n inputs: 1 for representations equal
    up to an orthogonal map and a scale, near 0 for unrelated ones."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norm = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return float(cross / norm) if norm > 0 else 0.0


@torch.no_grad()
def middle_representations(model: nn.Module, ids: torch.Tensor, a: int, b: int) -> list[torch.Tensor]:
    """The (tokens, d) hidden states entering the middle and leaving each of its blocks, in order
    (``N - a - b + 1`` of them), on the (rows, T) token blocks ``ids``, without each row's first
    position."""
    n = num_blocks(model)
    model.eval()
    tap = BlockTap(model, list(range(a, n - b)))  # block outputs as they leave the block (never final-normed)
    try:
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        tap.close()
    states = [hidden[a]] + [tap.outputs[i] for i in range(a, n - b)]  # hidden[a]: block a's input (a < n)
    return [h[:, 1:].reshape(-1, h.shape[-1]).float() for h in states]


def influence(reps: list[torch.Tensor]) -> list[float]:
    """``1 - CKA`` between each block's input and output: ``reps[j]`` to ``reps[j + 1]``."""
    return [1.0 - linear_cka(before, after) for before, after in zip(reps, reps[1:])]


def cka_kept_middle(model: nn.Module, ids: torch.Tensor, shape: SandwichShape) -> list[int]:
    """Original indices of the ``k`` middle blocks of highest influence on the token blocks ``ids``
    (ties to the lower index), in increasing order."""
    shape.check(num_blocks(model))
    scores = influence(middle_representations(model, ids, shape.a, shape.b))
    strongest = sorted(range(len(scores)), key=lambda j: (-scores[j], j))[: shape.k]
    return sorted(shape.a + j for j in strongest)
