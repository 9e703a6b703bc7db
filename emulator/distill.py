"""Distil an emulator so that its middle reproduces the real middle's hidden state.

Teacher: the full model (frozen). Student: the emulator; only its kept middle blocks train,
the adapter blocks, embeddings and head stay as shipped. The loss is

    kd_weight * mean(((h_T - h_S) / rms(h_T))^2)       (normalised MSE at the middle's output)
  + lm_weight * CE(student logits, next token)
  + kl_weight * KL(teacher logits || student logits)

where ``rms`` is taken over the hidden dimension of each token. With ``per_block`` the
normalised MSE is also applied after every kept block, against the teacher's hidden state
just before the next kept block (each kept block learns to stand in for the span it replaces).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .arch import get_path, spec_for
from .score import autocast_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-4
    warmup_steps: int = 10
    kd_weight: float = 1.0
    lm_weight: float = 0.0
    kl_weight: float = 0.0
    per_block: bool = False
    logit_positions: int = 32  # per sequence, for the LM and KL terms (0: every position)
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps must be >= 0, batch_size >= 1 and seq_len >= 2")
        if self.logit_positions < 0:
            raise ValueError(f"logit_positions must be >= 0, got {self.logit_positions}")
        if (
            min(self.kd_weight, self.lm_weight, self.kl_weight) < 0
            or self.kd_weight + self.lm_weight + self.kl_weight == 0
        ):
            raise ValueError("loss weights must be >= 0 and not all zero")


def normalised_mse(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``mean(((h_T - h_S) / rms(h_T))^2)`` over (B, T, D) hidden states; rms over D."""
    teacher = teacher.float()
    rms = teacher.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)  # (B, T, 1)
    return ((teacher - student.float()) / rms).pow(2).mean()


class _StopForward(Exception):
    """Raised by a tap once the deepest hidden state needed is recorded."""


class BlockTap:
    """Forward hooks that record the output hidden state of chosen block positions.

    With ``stop=True`` the forward pass ends after the deepest tapped block: when only hidden
    states are needed, the blocks above and the head are not run at all.
    """

    def __init__(self, model: nn.Module, positions: list[int], stop: bool = False) -> None:
        blocks = get_path(model, spec_for(model).blocks)
        self.outputs: dict[int, torch.Tensor] = {}
        self.last = max(positions) if stop else None
        self.handles = [blocks[p].register_forward_hook(self._hook(p)) for p in positions]

    def _hook(self, position: int):
        def record(_module, _inputs, output):
            self.outputs[position] = output[0] if isinstance(output, tuple) else output
            if position == self.last:
                raise _StopForward

        return record

    def run(
        self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Logits of ``model`` on ``input_ids`` (B, T, V), only at sequence ``positions`` (B, P, V)
        when given, or None when the pass stopped early."""
        try:
            if positions is None:
                return model(input_ids=input_ids, use_cache=False).logits
            if "logits_to_keep" in inspect.signature(model.forward).parameters:
                return model(input_ids=input_ids, use_cache=False, logits_to_keep=positions).logits
            return model(input_ids=input_ids, use_cache=False).logits[:, positions]
        except _StopForward:
            return None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def tap_pairs(layout: list[int], a: int, b: int, n_blocks: int, per_block: bool) -> list[tuple[int, int]]:
    """(student position, teacher block) pairs whose outputs the KD term compares; the first
    pair is the middle's output.

    The student's last kept block stands for the whole middle, so its output is compared
    with the teacher's block ``N-b-1``; with ``per_block``, kept block ``m_i`` is also
    compared with the teacher's block ``m_{i+1} - 1``.
    """
    kept = layout[a : len(layout) - b]
    pairs = [(a + len(kept) - 1, n_blocks - b - 1)]
    if per_block:
        pairs += [(a + i, kept[i + 1] - 1) for i in range(len(kept) - 1)]
    return pairs


def logit_positions(seq_len: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Sorted random positions in ``[0, seq_len - 1)`` (each with a next token) at which the LM
    and KL terms are taken, or None for all of them. The head's (T, V) logits, their softmaxes
    and KL are most of a step's cost on CPU with a 49k vocabulary; a sample of positions
    gives the same expected gradient for a fraction of it."""
    if not count or count >= seq_len - 1:
        return None
    return torch.randperm(seq_len - 1, generator=generator)[:count].sort().values


def kd_losses(
    teacher: nn.Module,
    student: nn.Module,
    input_ids: torch.Tensor,
    pairs: list[tuple[int, int]],
    config: DistillConfig,
    positions: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted loss terms for one batch of token ids (B, T); 'total' is their sum.

    ``positions``: where the LM and KL terms are taken (all positions but the last if None)."""
    need_logits = bool(config.lm_weight or config.kl_weight)
    if positions is None:
        positions = torch.arange(input_ids.shape[1] - 1)
    positions = positions.to(input_ids.device)
    teacher_tap = BlockTap(teacher, sorted({t for _, t in pairs}), stop=not config.kl_weight)
    student_tap = BlockTap(student, sorted({s for s, _ in pairs}), stop=not need_logits)
    try:
        with torch.no_grad():
            teacher_logits = teacher_tap.run(teacher, input_ids, positions)
        student_logits = student_tap.run(student, input_ids, positions)
        main_student, main_teacher = pairs[0]
        terms = {"kd": normalised_mse(teacher_tap.outputs[main_teacher], student_tap.outputs[main_student])}
        if len(pairs) > 1:
            terms["kd_blocks"] = torch.stack(
                [normalised_mse(teacher_tap.outputs[t], student_tap.outputs[s]) for s, t in pairs[1:]]
            ).mean()
    finally:
        teacher_tap.close()
        student_tap.close()
    if config.lm_weight:
        vocab = student_logits.shape[-1]
        terms["lm"] = F.cross_entropy(
            student_logits.reshape(-1, vocab).float(), input_ids[:, positions + 1].reshape(-1)
        )
    if config.kl_weight:
        vocab = student_logits.shape[-1]
        terms["kl"] = F.kl_div(
            torch.log_softmax(student_logits.float(), -1).reshape(-1, vocab),
            torch.log_softmax(teacher_logits.float(), -1).reshape(-1, vocab),
            log_target=True,
            reduction="batchmean",
        )
    total = config.kd_weight * (terms["kd"] + terms.get("kd_blocks", 0.0))
    total = total + config.lm_weight * terms.get("lm", 0.0) + config.kl_weight * terms.get("kl", 0.0)
    terms["total"] = total
    return terms


@dataclass
class DistillResult:
    losses: list[float]
    heldout_before: float
    heldout_after: float
    seconds: float

    @property
    def reduction(self) -> float:
        """Relative fall of the held-out normalised-MSE KD loss (0.3 = 30% lower)."""
        return 1 - self.heldout_after / self.heldout_before if self.heldout_before else 0.0


@torch.no_grad()
def heldout_kd(
    teacher: nn.Module,
    student: nn.Module,
    blocks: torch.Tensor,
    layout: list[int],
    a: int,
    b: int,
    batch_size: int = 4,
    device="cpu",
) -> float:
    """Mean normalised-MSE at the middle's output over held-out token blocks (N, T)."""
    pairs = tap_pairs(layout, a, b, len(get_path(teacher, spec_for(teacher).blocks)), per_block=False)
    config = DistillConfig(kd_weight=1.0)
    values = []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        values.append(kd_losses(teacher, student, ids, pairs, config)["kd"].item() * len(ids))
    return sum(values) / len(blocks)


@torch.no_grad()
def answer_position_kd(
    teacher: nn.Module, student: nn.Module, layout: list[int], a: int, b: int, prompts: list[list[int]], device="cpu"
) -> float:
    """Mean normalised MSE between teacher and student middle outputs at each prompt's last
    token, the position whose hidden state the top blocks turn into an answer.

    A diagnostic of how well the emulator stands in for the middle on a task's own prompts
    (the held-out KD above measures it on the distillation corpus).
    """
    ((student_position, teacher_block),) = tap_pairs(
        layout, a, b, len(get_path(teacher, spec_for(teacher).blocks)), per_block=False
    )
    values = []
    for ids in prompts:
        input_ids = torch.tensor([ids], device=device)
        teacher_tap = BlockTap(teacher, [teacher_block], stop=True)
        student_tap = BlockTap(student, [student_position], stop=True)
        try:
            teacher_tap.run(teacher, input_ids)
            student_tap.run(student, input_ids)
        finally:
            teacher_tap.close()
            student_tap.close()
        values.append(
            normalised_mse(
                teacher_tap.outputs[teacher_block][:, -1:], student_tap.outputs[student_position][:, -1:]
            ).item()
        )
    return sum(values) / max(1, len(values))


def distill(
    teacher: nn.Module,
    student: nn.Module,
    layout: list[int],
    a: int,
    b: int,
    train_blocks: torch.Tensor,
    heldout_blocks: torch.Tensor,
    config: DistillConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
    train_top: bool = False,
) -> DistillResult:
    """Train the student's kept middle blocks in place; adapter, embeddings and head stay frozen.

    With ``train_top`` the top adapter blocks train too (fitting a whole shell to the full
    model, not only the middle); the bottom blocks, embeddings and head stay frozen either way.
    Every student parameter is left with ``requires_grad`` off."""
    started = time.perf_counter()
    teacher.to(device).eval()
    student.to(device)
    for param in teacher.parameters():
        param.requires_grad_(False)
    for param in student.parameters():
        param.requires_grad_(False)
    blocks = get_path(student, spec_for(student).blocks)
    params = [p for position in range(a, len(layout) - (0 if train_top else b)) for p in blocks[position].parameters()]
    for param in params:
        param.requires_grad_(True)
    before = heldout_kd(teacher, student, heldout_blocks, layout, a, b, device=device)
    pairs = tap_pairs(layout, a, b, len(get_path(teacher, spec_for(teacher).blocks)), config.per_block)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    autocast = autocast_for(device)
    losses = []
    student.train()
    bar = tqdm(range(config.steps), desc="distilling", disable=not progress, unit="step")
    for step in bar:
        warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * step / max(1, config.steps)))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warm * cosine
        rows = torch.randint(0, len(train_blocks), (config.batch_size,), generator=generator)
        ids = train_blocks[rows].to(device)
        positions = logit_positions(ids.shape[1], config.logit_positions, generator)
        with autocast:
            terms = kd_losses(teacher, student, ids, pairs, config, positions)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        losses.append(terms["total"].item())
        bar.set_postfix(kd=f"{terms['kd'].item():.3f}")
    student.eval()
    for param in params:
        param.requires_grad_(False)
    after = heldout_kd(teacher, student, heldout_blocks, layout, a, b, device=device)
    log.info("distillation: held-out KD %.4f -> %.4f (%.0f%% lower)", before, after, 100 * (1 - after / before))
    return DistillResult(losses, before, after, time.perf_counter() - started)
