"""Log-probabilities of tokens, from the same logits the scheduler samples from.

``logprob(t | prefix) = log_softmax(logits)[t]`` in float32, over the model's raw scores (no
temperature, no top-p: what a scorer such as lm-eval needs), with the ``k`` most likely tokens
beside it. A prompt's tokens are scored from the final hidden states of its prefill: position
``i`` predicts token ``i + 1``, so the first token has no log-probability (``None``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; a token of probability 0 gets this (as vLLM does)
MAX_TOP_LOGPROBS = 20
PROMPT_CHUNK = 256  # prompt positions whose logits (each a vocabulary wide) exist at once


class NonFiniteScores(ValueError):
    """The model's scores for a row are NaN or infinite (a broken adapter)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the ``k`` most likely tokens at its position, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def score_tokens(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Log-probability of ``targets`` (N,) under ``logits`` (N, V), and the top ``k`` of each row."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteScores("the model's scores are not finite")
    logprobs = torch.log_softmax(logits.float(), -1)  # (N, V)
    chosen = logprobs.gather(-1, targets.view(-1, 1)).squeeze(-1).clamp_min(LOGPROB_FLOOR).tolist()  # (N,)
    if k > 0:
        values, indices = logprobs.topk(min(k, logprobs.shape[-1]), -1)  # (N, k)
        tops = [tuple(zip(i, (max(v, LOGPROB_FLOOR) for v in vs))) for i, vs in zip(indices.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(int(t), lp, top) for t, lp, top in zip(targets.view(-1).tolist(), chosen, tops)]


def prompt_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    states: torch.Tensor,
    prompt: list[int],
    k: int,
    chunk: int = PROMPT_CHUNK,
) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it: ``states`` (T, D) are the
    prompt's final hidden states, ``head`` turns states into logits. ``[None, lp(t1|t0), ...]``."""
    targets = torch.tensor(prompt[1:], dtype=torch.long)  # (T-1,)
    scored: list[TokenLogprob | None] = [None]
    for begin in range(0, len(prompt) - 1, chunk):
        end = min(len(prompt) - 1, begin + chunk)
        scored += score_tokens(head(states[begin:end]), targets[begin:end], k)
    return scored
