"""Which middle blocks an emulator keeps: chosen by representation similarity (CKA), in the
manner of CRaSh (Zhang et al., 2023, "CRaSh: Clustering, Removing, and Sharing").

The middle's hidden states on a few corpus blocks are compared with linear CKA (Kornblith et
al., 2019). The middle is cut into ``k`` contiguous runs of blocks and each run keeps its one
block that changes the representation most (``1 - CKA`` between the block's input and output).
The runs are chosen so that what the kept blocks leave out is least: a run costs how far its
output is from its input (``1 - CKA``) beyond what its kept block's own change accounts for, and
the summed cost is minimised exactly. A stretch of blocks that barely change what they pass on
collapses into one kept block; two blocks that each transform a lot fall into runs of their own.
Uniform layer drop
(:meth:`SandwichShape.kept_middle`) ignores all of this.
"""

from __future__ import annotations

import torch
from torch import nn

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
    (``N - a - b + 1`` of them), on the (rows, T) token blocks ``ids``."""
    n = num_blocks(model)
    model.eval()
    hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden[i] is the input of block i (hidden[0]: the embeddings); hidden[n - b] leaves the middle
    return [hidden[i].reshape(-1, hidden[i].shape[-1]).float() for i in range(a, n - b + 1)]


def segment(cost: list[list[float]], k: int) -> list[tuple[int, int]]:
    """Cut items ``1..m`` into ``k`` contiguous runs, run ``(s, e)`` holding items ``s+1..e``
    (``0 = s_1 < e_1 = s_2 < ... < e_k = m``), minimising the summed ``cost[s][e]`` (exact, by
    dynamic programming; ``cost`` is (m+1) x (m+1))."""
    m = len(cost) - 1
    if not 1 <= k <= m:
        raise ValueError(f"cannot cut a middle of {m} blocks into {k} runs")
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(k + 1)]  # best[j][e]: the cheapest j runs holding items 1..e
    back = [[0] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for e in range(j, m + 1):
            for s in range(j - 1, e):
                total = best[j - 1][s] + cost[s][e]
                if total < best[j][e]:
                    best[j][e], back[j][e] = total, s
    runs, e = [], m
    for j in range(k, 0, -1):
        runs.append((back[j][e], e))
        e = back[j][e]
    return runs[::-1]


def cka_kept_middle(model: nn.Module, ids: torch.Tensor, shape: SandwichShape) -> list[int]:
    """Original indices of the ``k`` middle blocks to keep, chosen by CKA on the token blocks ``ids``."""
    n = num_blocks(model)
    shape.check(n)
    reps = middle_representations(model, ids, shape.a, shape.b)  # middle block j (1-based) maps reps[j-1] to reps[j]
    m = len(reps) - 1
    apart = [[1.0 - linear_cka(reps[i], reps[j]) if i < j else 0.0 for j in range(m + 1)] for i in range(m + 1)]
    step = [0.0] + [apart[j - 1][j] for j in range(1, m + 1)]
    # run (s, e) holds middle blocks s+1..e: its change beyond its strongest block's
    left_out = [
        [max(0.0, apart[s][e] - max(step[s + 1 : e + 1])) if s < e else 0.0 for e in range(m + 1)] for s in range(m + 1)
    ]
    kept = []
    for s, e in segment(left_out, shape.k):
        strongest = max(range(s + 1, e + 1), key=lambda j: (step[j], -j))
        kept.append(shape.a + strongest - 1)
    return kept
