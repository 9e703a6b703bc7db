"""Log-likelihood scoring: multiple-choice rows (lm-eval's ``acc`` and ``acc_norm``), SFT rows by
the negative log-likelihood of their completion tokens, and the answer-only loss.

Both only need the logits at the positions that predict an answer token, so the head (for a
135M model with a 49k vocabulary, about a third of the forward cost) runs on those alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import DynamicCache

from .arch import get_path, spec_for
from .data import IGNORE_INDEX, Batch, Example, MCRow, collate, encode_pair, pad_id_of

PROMPT_TOKENS = 2048  # prompt tokens per shared-prompt pass: bounds its activations and cached keys and values


def answer_states(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last hidden states at the positions that predict labelled tokens.

    Returns (states (n, D), targets (n,), row index (n,)) where n counts the answer tokens
    of the batch: position t of row r predicts token t+1.
    """
    spec = spec_for(model)
    hidden = get_path(model, spec.backbone)(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # (B, T, D)
    targets = batch.labels[:, 1:]  # (B, T-1)
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return hidden[rows, positions], targets[rows, positions], rows


def answer_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict labelled tokens: (logits (n, V), targets (n,), row index (n,))."""
    states, targets, rows = answer_states(model, batch)
    return get_path(model, spec_for(model).head)(states), targets, rows


def answer_loss(model: nn.Module, batch: Batch, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the batch.

    ``chunk``: run the head and the cross-entropy on at most this many positions at a time, each
    chunk recomputed in the backward pass instead of keeping its logits (a 49k vocabulary's
    logits are most of a small model's activation memory); the same loss and gradients.
    """
    if chunk is None:
        logits, targets, _ = answer_logits(model, batch)
        return F.cross_entropy(logits.float(), targets)
    picked, wanted, _ = answer_states(model, batch)  # (n, D), (n,)
    head = get_path(model, spec_for(model).head)

    def summed(states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(states).float(), labels, reduction="sum")

    total = sum(
        checkpoint(summed, picked[start : start + chunk], wanted[start : start + chunk], use_reentrant=False)
        for start in range(0, len(wanted), chunk)
    )
    return total / max(len(wanted), 1)


def answer_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed log-probability of each row's answer tokens, (B,)."""
    logits, targets, rows = answer_logits(model, batch)
    picked = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)
    return torch.zeros(batch.input_ids.shape[0], device=picked.device).index_add_(0, rows, picked)


def binomial_stderr(accuracy: float, rows: int) -> float:
    """Standard error of an accuracy measured on ``rows`` rows."""
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(rows, 1))


@dataclass
class MCResult:
    accuracy: float
    rows: int
    correct: int
    predictions: list[int]
    scores: list[list[float]]  # summed log-likelihood of each choice, row by row
    norm_predictions: list[int] | None = None  # argmax of log-likelihood / choice length in characters
    acc_norm: float | None = None  # lm-eval's acc_norm: accuracy of norm_predictions

    @property
    def stderr(self) -> float:
        """Binomial standard error of the accuracy."""
        return binomial_stderr(self.accuracy, self.rows)


def normalised_predictions(rows: list[MCRow], scores: list[list[float]]) -> list[int]:
    """lm-eval's ``acc_norm`` picks: each choice's summed log-likelihood divided by its length in
    characters (the choice string as scored, leading space included)."""
    return [
        max(range(len(row.choices)), key=lambda c: score[c] / max(1, len(row.choices[c])))
        for row, score in zip(rows, scores)
    ]


@dataclass
class _MCPlan:
    """How each row of a multiple-choice file is scored: rows whose choices all follow the same
    prompt tokens share one forward pass of that prompt, its keys and values reused for every
    choice; the other rows' (row, choice) pairs are scored whole."""

    prompts: list[list[int]]  # shared-prompt rows: the prompt's ids (empty for the others)
    choice_ids: list[list[list[int]]]  # shared-prompt rows: each choice's tokens
    shared: dict[int, list[int]]  # prompt length -> shared-prompt rows
    pairs: list[tuple[int, int, tuple[list[int], int]]]  # (row, choice, encoded) scored whole


def _plan_mc(tokenizer, rows: list[MCRow], max_length: int) -> _MCPlan:
    plan = _MCPlan([], [], {}, [])
    for r, row in enumerate(rows):
        encoded = [encode_pair(tokenizer, row.prompt, choice, max_length) for choice in row.choices]
        heads = [ids[start:] for ids, start in encoded]
        shared = all(heads) and len({tuple(ids[:start]) for ids, start in encoded}) == 1
        ids, start = encoded[0]
        plan.prompts.append(ids[:start] if shared else [])
        plan.choice_ids.append(heads if shared else [])
        if shared:
            plan.shared.setdefault(start, []).append(r)
        else:
            plan.pairs.extend((r, c, e) for c, e in enumerate(encoded))
    return plan


def _summed_logprobs(
    model: nn.Module, encoded: list[tuple[list[int], int]], batch_size: int, pad_id: int, device, bar
) -> list[float]:
    """Summed log-probability of each sequence's answer tokens, in the order given; batched by
    length so that padding stays small."""
    values = [0.0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    autocast = autocast_for(device)
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        batch = collate([encoded[j] for j in chunk], pad_id).to(device)
        with autocast:
            for j, value in zip(chunk, answer_logprobs(model, batch).tolist()):
                values[j] = value
        bar.update()
    return values


def _prompt_chunks(plan: _MCPlan) -> list[tuple[int, list[int], list[tuple[int, int, list[int]]]]]:
    """The shared-prompt rows in chunks of one prompt length and at most PROMPT_TOKENS tokens:
    (prompt length, rows, the chunk's choices longer than one token)."""
    chunks = []
    for length, group in sorted(plan.shared.items()):
        rows = max(1, PROMPT_TOKENS // length)
        chunks.extend((length, group[i : i + rows]) for i in range(0, len(group), rows))
    return [(length, chunk, _longer_choices(plan, chunk)) for length, chunk in chunks]


def _longer_choices(plan: _MCPlan, chunk: list[int]) -> list[tuple[int, int, list[int]]]:
    """(row in chunk, choice, tokens) of the chunk's choices longer than one token, shortest first."""
    pairs = [(b, c, tokens) for b, r in enumerate(chunk) for c, tokens in enumerate(plan.choice_ids[r])]
    return sorted((pair for pair in pairs if len(pair[2]) > 1), key=lambda pair: len(pair[2]))


def _shared_passes(chunks, batch_size: int) -> int:
    return sum(1 + -(-len(longer) // batch_size) for _, _, longer in chunks)


def _shared_prompt_scores(
    model: nn.Module, plan: _MCPlan, chunks, batch_size: int, device, bar
) -> dict[int, list[float]]:
    """Each shared-prompt row's choice log-probabilities: one pass over a chunk of prompts of one
    length (no padding), then the choices longer than one token, sorted by length and batched,
    each on a copy of its prompt's keys and values."""
    spec = spec_for(model)
    backbone, head = get_path(model, spec.backbone), get_path(model, spec.head)
    scores = {}
    for length, chunk, longer in chunks:
        ids = torch.tensor([plan.prompts[r] for r in chunk], device=device)  # (B, L)
        with autocast_for(device):
            out = backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=bool(longer))
            first = torch.log_softmax(head(out.last_hidden_state[:, -1]).float(), -1)  # (B, V)
        bar.update()
        prompt_cache = out.past_key_values.to_legacy_cache() if longer else ()
        tails = {}
        for i in range(0, len(longer), batch_size):
            batch = longer[i : i + batch_size]
            index = torch.tensor([b for b, _, _ in batch], device=ids.device)
            cache = DynamicCache.from_legacy_cache(tuple((k[index], v[index]) for k, v in prompt_cache))
            with autocast_for(device):
                values = _continuation_logprobs(backbone, head, cache, [t for _, _, t in batch], length, ids.device)
            tails.update(zip(((b, c) for b, c, _ in batch), values))
            bar.update()
        for b, r in enumerate(chunk):
            scores[r] = [first[b, t[0]].item() + tails.get((b, c), 0.0) for c, t in enumerate(plan.choice_ids[r])]
    return scores


def _continuation_logprobs(backbone: nn.Module, head: nn.Module, cache, choices: list[list[int]], length: int, device):
    """Summed log-probability of each choice's tokens after its first, run on ``cache`` (its
    prompt's keys and values, one row per choice, prompts of ``length`` tokens). The choices are
    right-padded: a causal model never attends to the padding."""
    width = max(len(tokens) for tokens in choices) - 1  # token j of a choice predicts token j + 1

    def padded(values: list[int]) -> list[int]:
        return values + [0] * (width - len(values))

    ids = torch.tensor([padded(tokens[:-1]) for tokens in choices], device=device)  # (N, W)
    targets = torch.tensor([padded(tokens[1:]) for tokens in choices], device=device)
    mask = torch.tensor([padded([1] * (len(tokens) - 1)) for tokens in choices], device=device)
    hidden = backbone(
        input_ids=ids,
        attention_mask=torch.cat([torch.ones(len(choices), length, dtype=mask.dtype, device=device), mask], 1),
        position_ids=(length + torch.arange(width, device=device)).expand(len(choices), width),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state  # (N, W, D)
    rows, positions = mask.nonzero(as_tuple=True)
    logprobs = torch.log_softmax(head(hidden[rows, positions]).float(), -1)
    picked = logprobs.gather(-1, targets[rows, positions].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(len(choices), device=device).index_add_(0, rows, picked).tolist()


@torch.no_grad()
def score_mc(
    model: nn.Module,
    tokenizer,
    rows: list[MCRow],
    batch_size: int = 16,
    max_length: int = 1024,
    device: torch.device | str = "cpu",
    desc: str = "scoring",
    progress: bool = True,
) -> MCResult:
    """Accuracy by the highest summed log-likelihood of each choice given the prompt.

    A row whose choices all follow the same prompt tokens runs its prompt once (rows of equal
    prompt length are batched without padding) and its choices on the prompt's keys and values;
    a row whose choices change how the prompt tokenizes is scored pair by pair on the whole
    prompt+choice sequence. Both give the log-likelihoods of scoring every pair alone.
    """
    model.eval()
    plan = _plan_mc(tokenizer, rows, max_length)
    chunks = _prompt_chunks(plan)
    batches = _shared_passes(chunks, batch_size) + -(-len(plan.pairs) // batch_size)
    with tqdm(total=batches, desc=desc, leave=False, unit="batch", disable=not progress) as bar:
        scores = [[0.0] * len(row.choices) for row in rows]
        for r, values in _shared_prompt_scores(model, plan, chunks, batch_size, device, bar).items():
            scores[r] = values
        whole = _summed_logprobs(model, [e for _, _, e in plan.pairs], batch_size, pad_id_of(tokenizer), device, bar)
        for (r, c, _), value in zip(plan.pairs, whole):
            scores[r][c] = value
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(int(p == row.answer) for p, row in zip(predictions, rows))
    norm = normalised_predictions(rows, scores)
    acc_norm = sum(int(p == row.answer) for p, row in zip(norm, rows)) / len(rows)
    return MCResult(correct / len(rows), len(rows), correct, predictions, scores, norm, acc_norm)


@dataclass
class SFTResult:
    """Completion negative log-likelihood of SFT rows, in nats per token (lower is better)."""

    nll: float  # summed NLL over all completion tokens / their number
    rows: int
    tokens: int
    row_nll: list[float]  # summed NLL of each row's completion tokens
    row_tokens: list[int]  # how many completion tokens each row has

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def stderr(self) -> float:
        """Standard error of the per-token NLL over rows (a ratio estimator, delta method): the rows
        are the sampled units and each carries its own number of tokens."""
        n = self.rows
        if n < 2:
            return 0.0
        mean_tokens = self.tokens / n
        residuals = sum((s - self.nll * t) ** 2 for s, t in zip(self.row_nll, self.row_tokens))
        return math.sqrt(residuals / (n * (n - 1))) / mean_tokens


@torch.no_grad()
def score_sft(
    model: nn.Module,
    tokenizer,
    rows: list[Example],
    batch_size: int = 16,
    max_length: int = 1024,
    device: torch.device | str = "cpu",
    desc: str = "scoring",
    progress: bool = True,
) -> SFTResult:
    """Mean negative log-likelihood of each row's completion tokens given its prompt (the
    prompt's tokens are context only); rows are batched by length to keep padding small."""
    model.eval()
    encoded = [encode_pair(tokenizer, row.prompt, row.completion, max_length) for row in rows]
    row_tokens = [len(ids) - start for ids, start in encoded]
    with tqdm(total=-(-len(rows) // batch_size), desc=desc, leave=False, unit="batch", disable=not progress) as bar:
        row_nll = [-value for value in _summed_logprobs(model, encoded, batch_size, pad_id_of(tokenizer), device, bar)]
    tokens = sum(row_tokens)
    return SFTResult(sum(row_nll) / tokens, len(rows), tokens, row_nll, row_tokens)


def autocast_for(device) -> torch.autocast:
    """bf16 autocast on CUDA; disabled elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
