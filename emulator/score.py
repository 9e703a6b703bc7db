"""Log-likelihood scoring of multiple-choice rows (lm-eval's ``acc``) and the answer-only loss.

Both only need the logits at the positions that predict an answer token, so the head (for a
135M model with a 49k vocabulary, about a third of the forward cost) runs on those alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import get_path, spec_for
from .data import IGNORE_INDEX, Batch, MCRow, collate, encode_pair, pad_id_of


def answer_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict labelled tokens.

    Returns (logits (n, V), targets (n,), row index (n,)) where n counts the answer tokens
    of the batch: position t of row r predicts token t+1.
    """
    spec = spec_for(model)
    hidden = get_path(model, spec.backbone)(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # (B, T, D)
    targets = batch.labels[:, 1:]  # (B, T-1)
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    logits = get_path(model, spec.head)(hidden[rows, positions])  # (n, V)
    return logits, targets[rows, positions], rows


def answer_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of the batch."""
    logits, targets, _ = answer_logits(model, batch)
    return F.cross_entropy(logits.float(), targets)


def answer_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed log-probability of each row's answer tokens, (B,)."""
    logits, targets, rows = answer_logits(model, batch)
    picked = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)
    return torch.zeros(batch.input_ids.shape[0], device=picked.device).index_add_(0, rows, picked)


@dataclass
class MCResult:
    accuracy: float
    rows: int
    correct: int
    predictions: list[int]
    scores: list[list[float]]  # summed log-likelihood of each choice, row by row

    @property
    def stderr(self) -> float:
        """Binomial standard error of the accuracy."""
        return math.sqrt(max(self.accuracy * (1 - self.accuracy), 1e-12) / max(self.rows, 1))


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

    Choices that are one token long share one forward pass of their prompt (rows of equal
    prompt length are batched without padding); longer choices are scored on the whole
    prompt+choice sequence. Both give the same log-likelihoods as scoring every pair alone.
    """
    model.eval()
    pad_id = pad_id_of(tokenizer)
    scores = [[0.0] * len(row.choices) for row in rows]
    single: dict[int, list[int]] = {}  # prompt length -> rows whose choices all are single tokens
    pairs: list[tuple[int, int, tuple[list[int], int]]] = []  # (row, choice, encoded) scored whole
    prompts: list[list[int]] = []
    choice_ids: list[list[int]] = []
    for r, row in enumerate(rows):
        encoded = [encode_pair(tokenizer, row.prompt, choice, max_length) for choice in row.choices]
        heads = [ids[start:] for ids, start in encoded]
        if all(len(h) == 1 for h in heads) and len({tuple(ids[:start]) for ids, start in encoded}) == 1:
            ids, start = encoded[0]
            prompts.append(ids[:start])
            choice_ids.append([h[0] for h in heads])
            single.setdefault(start, []).append(r)
        else:
            prompts.append([])
            choice_ids.append([])
            pairs.extend((r, c, e) for c, e in enumerate(encoded))
    spec = spec_for(model)
    backbone, head = get_path(model, spec.backbone), get_path(model, spec.head)
    autocast = autocast_for(device)
    chunks = [group[i : i + batch_size] for _, group in sorted(single.items()) for i in range(0, len(group), batch_size)]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][2][0]))
    pair_chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=len(chunks) + len(pair_chunks), desc=desc, leave=False, unit="batch", disable=not progress)
    for chunk in chunks:
        ids = torch.tensor([prompts[r] for r in chunk], device=device)  # (B, L), no padding
        with autocast:
            hidden = backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
            logprobs = torch.log_softmax(head(hidden[:, -1]).float(), -1)  # (B, V)
        for b, r in enumerate(chunk):
            scores[r] = logprobs[b, choice_ids[r]].tolist()
        bar.update()
    for chunk in pair_chunks:
        batch = collate([pairs[i][2] for i in chunk], pad_id).to(device)
        with autocast:
            values = answer_logprobs(model, batch).tolist()
        for i, value in zip(chunk, values):
            r, c, _ = pairs[i]
            scores[r][c] = value
        bar.update()
    bar.close()
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(int(p == row.answer) for p, row in zip(predictions, rows))
    return MCResult(correct / len(rows), len(rows), correct, predictions, scores)


def autocast_for(device) -> torch.autocast:
    """bf16 autocast on CUDA; disabled elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
