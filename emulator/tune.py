"""The adapter tuning loop: train the adapter blocks (whole, or LoRA inside them) of a
sandwich model on answer-only loss, everything else frozen.

The same loop runs on a data owner's emulator (``client``) and, for the "full fine-tuning"
baseline, on the full model with the real middle in place (``cloud`` evaluation).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from offsite.protocol.config_record import config_from_dict

from .arch import get_path, spec_for
from .data import Example, ExampleStream
from .lora import LoRASpec, attach_lora, load_lora_state, lora_state_dict
from .sandwich import adapter_state_dict, only_positions
from .score import answer_loss, autocast_for

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
LOSS_CHUNK = 256  # answer positions per head + cross-entropy chunk when checkpointing
MODES = ("blocks", "lora")
TRAINED = ("both", "bottom", "top")


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; anything else is taken as given."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class TuneConfig:
    """One adapter tuning run. A federated job nests one (``FedJobConfig.tuning``) and sends it to the
    data owners with each round's learning rate and seed set."""

    steps: int = field(default=120, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (after the warm-up steps)"})
    warmup_steps: int = field(default=10, metadata={"help": "steps of linear warm-up to lr"})
    schedule: Literal["cosine", "constant"] = field(default="cosine", metadata={"help": "lr after the warm-up"})
    weight_decay: float = 0.0
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient to this L2 norm (0: no clipping)"})
    max_length: int = field(default=256, metadata={"help": "tokens per example, prompt and answer"})
    mode: Literal["blocks", "lora"] = field(default="blocks", metadata={"help": "whole adapter blocks or LoRA"})
    lora: LoRASpec = field(default_factory=LoRASpec)
    train: Literal["both", "bottom", "top"] = field(default="both", metadata={"help": "which adapter blocks train"})
    prox: float = field(default=0.0, metadata={"help": "weight mu of the proximal term (mu/2)*||theta-theta_0||^2"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and the LoRA init"})
    device: str = field(default="auto", metadata={"help": "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.max_length < 2:
            raise ValueError(
                f"warmup_steps must be >= 0 and max_length >= 2 (got {self.warmup_steps}, {self.max_length})"
            )
        if not (self.prox >= 0 and self.weight_decay >= 0 and self.max_grad_norm >= 0):
            raise ValueError(
                "prox, weight_decay and max_grad_norm must be >= 0 "
                f"(got {self.prox}, {self.weight_decay}, {self.max_grad_norm})"
            )
        for name, choices in (("schedule", SCHEDULES), ("mode", MODES), ("train", TRAINED)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    def blocks_to_train(self, adapter_blocks: list[int], a: int) -> list[int]:
        bottom = [i for i in adapter_blocks if i < a]
        top = [i for i in adapter_blocks if i >= a]
        return {"both": adapter_blocks, "bottom": bottom, "top": top}[self.train]


def recorded_tuning(value: object) -> object:
    """A tuning recorded in a report or a sweep (``dataclasses.asdict`` of a :class:`TuneConfig`, read
    back from JSON) as today's settings: one added since it was written takes its default, as an old
    job.json's does. What does not read as a TuneConfig is returned as it is."""
    try:
        return dataclasses.asdict(config_from_dict(TuneConfig, value))
    except (ValueError, TypeError, AttributeError):
        return value


@dataclass
class TuneResult:
    adapter: dict[str, torch.Tensor]  # whole blocks, or LoRA factors in "lora" mode
    losses: list[float]
    tokens: int
    seconds: float
    mode: str


class StochasticDepth:
    """Which block positions run this step: every adapter block, and each other block with
    probability ``1 - drop`` (at least one middle block always runs)."""

    def __init__(self, layout: list[int], adapter_blocks: list[int], drop: float, seed: int) -> None:
        self.adapter = [p for p, original in enumerate(layout) if original in adapter_blocks]
        self.middle = [p for p, original in enumerate(layout) if original not in adapter_blocks]
        self.drop = drop
        self.generator = torch.Generator().manual_seed(seed + 1)

    def sample(self) -> list[int]:
        if not self.drop or not self.middle:
            return sorted(self.adapter + self.middle)
        keep = torch.rand(len(self.middle), generator=self.generator) >= self.drop
        if not keep.any():
            keep[torch.randint(len(self.middle), (1,), generator=self.generator)] = True
        return sorted(self.adapter + [p for p, k in zip(self.middle, keep.tolist()) if k])


def lr_at(step: int, config: TuneConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def trainable_parameters(
    model: nn.Module, layout: list[int], blocks: list[int], mode: str, freeze_a: bool = False
) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the chosen blocks (whole) or their LoRA factors (B only with ``freeze_a``)."""
    trained_factors = ("lora_B",) if freeze_a else ("lora_A", "lora_B")
    for param in model.parameters():
        param.requires_grad_(False)
    block_list = get_path(model, spec_for(model).blocks)
    params = []
    for position, original in enumerate(layout):
        if original not in blocks:
            continue
        for name, param in block_list[position].named_parameters():
            if mode == "blocks" or name.endswith(trained_factors):
                param.requires_grad_(True)
                params.append(param)
    if not params:
        raise ValueError(f"nothing to train: blocks {blocks} are not in layout {layout}")
    return params


def tune_adapter(
    model: nn.Module,
    tokenizer,
    layout: list[int],
    adapter_blocks: list[int],
    examples: list[Example],
    config: TuneConfig,
    a: int,
    progress: bool = True,
    desc: str = "tuning",
    on_step: Callable[[int, nn.Module], None] | None = None,
    middle_drop: float = 0.0,
    lora_start: dict[str, torch.Tensor] | None = None,
    checkpointing: bool = False,
) -> TuneResult:
    """Tune ``model``'s adapter in place on ``examples`` and return the adapter state.

    ``layout`` maps block positions to original indices; ``adapter_blocks`` are original
    indices; ``a`` is the number of bottom adapter blocks (to tell bottom from top).
    In "blocks" mode the result holds every adapter block (trained or not); in "lora" mode
    it holds the LoRA factors of the trained blocks. ``on_step(step, model)`` runs after each
    optimiser step (1-based), e.g. to evaluate along the way; it must leave the model as it found it.
    ``middle_drop``: stochastic depth, each step skips each non-adapter block with this
    probability (an experiment's lever, see ``experiments/levers.py``; 0 runs every block).
    ``lora_start``: LoRA factors to start from (a federated LoRA job's global factors; all of
    them, or only the B factors when A is frozen and drawn from ``config.lora.init_seed``).
    With ``config.lora.freeze_a`` the result holds the B factors only. ``checkpointing``: a data
    owner's memory-for-time trade (same result): every block's activations and the head's logits
    are recomputed in the backward pass instead of kept (:data:`LOSS_CHUNK` positions at a time).
    """
    if not 0.0 <= middle_drop < 1.0:
        raise ValueError(f"middle_drop must be in [0, 1), got {middle_drop}")
    device = pick_device(config.device)
    params = _trainable(model, layout, config.blocks_to_train(adapter_blocks, a), config, device, lora_start)
    anchors = [p.detach().clone() for p in params] if config.prox > 0 else None
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    stream = ExampleStream(tokenizer, examples, config.batch_size, config.max_length, seed=config.seed)
    autocast = autocast_for(device)
    depth = StochasticDepth(layout, adapter_blocks, middle_drop, config.seed)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chunk = LOSS_CHUNK if checkpointing else None
    losses, tokens, started = [], 0, time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        batch = stream.next().to(device)
        with autocast, only_positions(model, depth.sample()):
            loss = answer_loss(model, batch, chunk)
        _optimiser_step(loss, params, anchors, optimizer, config)
        losses.append(loss.item())
        tokens += batch.num_tokens
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if on_step is not None:
            on_step(step + 1, model)
    state = _tuned_state(model, layout, adapter_blocks, config)
    return TuneResult(state, losses, tokens, time.perf_counter() - started, config.mode)


def _trainable(
    model: nn.Module,
    layout: list[int],
    trained: list[int],
    config: TuneConfig,
    device: torch.device,
    lora_start: dict[str, torch.Tensor] | None = None,
) -> list[nn.Parameter]:
    """Attach LoRA (in "lora" mode; from ``lora_start`` when given), move the model to ``device``,
    and unfreeze what trains."""
    if config.mode == "lora":
        seed = config.seed if config.lora.init_seed is None else config.lora.init_seed
        attach_lora(model, layout, trained, config.lora, seed=seed)
        if lora_start is not None:
            load_lora_state(model, layout, lora_start, partial=True)
    elif lora_start is not None:
        raise ValueError("LoRA factors to start from, but the tuning mode is 'blocks'")
    model.to(device)
    return trainable_parameters(model, layout, trained, config.mode, config.mode == "lora" and config.lora.freeze_a)


def _optimiser_step(loss: torch.Tensor, params, anchors, optimizer, config: TuneConfig) -> None:
    """One step on ``loss`` plus the proximal term ``(mu/2) * sum ||p - p0||^2`` (with ``anchors``)."""
    total = loss
    if anchors is not None:
        total = total + 0.5 * config.prox * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, anchors))
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()


def _tuned_state(
    model: nn.Module, layout: list[int], adapter_blocks: list[int], config: TuneConfig
) -> dict[str, torch.Tensor]:
    """Leave the model as found (frozen, eval, no activation checkpointing) and return its adapter on
    the CPU: whole blocks, or the LoRA factors (B only when A was frozen)."""
    model.eval()
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    for param in model.parameters():
        param.requires_grad_(False)
    if config.mode != "lora":
        state = adapter_state_dict(model, layout, adapter_blocks)
    else:
        kept = (".lora_B",) if config.lora.freeze_a else (".lora_A", ".lora_B")
        state = {key: tensor for key, tensor in lora_state_dict(model, layout).items() if key.endswith(kept)}
    return {key: tensor.cpu() for key, tensor in state.items()}
