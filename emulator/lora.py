"""LoRA inside the adapter blocks: ``x -> W0 x + (alpha/r) B A x`` with ``A: (r, in)``, ``B: (out, r)``.

Works on ``nn.Linear`` and on GPT-2's ``Conv1D`` (weight stored as ``(in, out)``). LoRA factors
are keyed like the adapter itself, by original block index:
``blocks.{i}.{module path}.lora_A`` / ``.lora_B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .arch import get_path, set_path, spec_for
from .sandwich import ADAPTER_KEY


def _in_out(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight_is_transposed) of a Linear or a GPT-2 Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W: (in, out)
        return base.weight.shape[0], base.weight.shape[1], True
    raise TypeError(f"LoRA supports Linear and Conv1D modules, not {type(base).__name__}")


class LoRALinear(nn.Module):
    """A frozen linear map plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        in_features, out_features, _ = _in_out(base)
        self.base = base
        self.scale = alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None  # module names inside a block; None: the family's default
    freeze_a: bool = False  # train B only; A stays as initialised (a federated job's "frozen-a")
    init_seed: int | None = None  # seed of A's initialisation; None: the tuning seed (a job fixes it to share A)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha}")


def is_lora_state(state: dict[str, torch.Tensor]) -> bool:
    """True when ``state`` holds LoRA factors (``...lora_A`` / ``...lora_B``), not whole blocks."""
    return bool(state) and all(key.endswith((".lora_A", ".lora_B")) for key in state)


def attach_lora(model: nn.Module, layout: list[int], blocks: list[int], lora: LoRASpec, seed: int = 0) -> None:
    """Wrap the target linears of the given (original-index) blocks in :class:`LoRALinear`."""
    spec = spec_for(model)
    targets = set(lora.targets or spec.lora_targets)
    block_list = get_path(model, spec.blocks)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for position, original in enumerate(layout):
            if original not in blocks:
                continue
            block = block_list[position]
            names = [name for name, module in block.named_modules() if name.split(".")[-1] in targets]
            if not names:
                raise ValueError(f"block {original} has none of the LoRA targets {sorted(targets)}")
            for name in names:
                base = get_path(block, name)
                if isinstance(base, LoRALinear):
                    continue
                set_path(block, name, LoRALinear(base, lora.rank, lora.alpha))
    finally:
        torch.random.set_rng_state(generator_state)


def lora_state_dict(model: nn.Module, layout: list[int]) -> dict[str, torch.Tensor]:
    block_list = get_path(model, spec_for(model).blocks)
    state = {}
    for position, original in enumerate(layout):
        for name, module in block_list[position].named_modules():
            if isinstance(module, LoRALinear):
                state[f"blocks.{original}.{name}.lora_A"] = module.lora_A.detach().clone()
                state[f"blocks.{original}.{name}.lora_B"] = module.lora_B.detach().clone()
    return state


def load_lora_state(model: nn.Module, layout: list[int], state: dict[str, torch.Tensor], partial: bool = False) -> None:
    """Copy LoRA factors into the attached :class:`LoRALinear` modules: every factor, or with
    ``partial`` a subset (a frozen-A job sends only the B factors)."""
    block_list = get_path(model, spec_for(model).blocks)
    position_of = {original: position for position, original in enumerate(layout)}
    expected = lora_state_dict(model, layout)
    if not (set(state) <= set(expected) if partial else set(expected) == set(state)):
        extra, lacking = set(state) - set(expected), set(expected) - set(state)
        raise KeyError(f"LoRA state: unexpected {sorted(extra)[:3]}, missing {sorted(lacking)[:3]}")
    with torch.no_grad():
        for key, tensor in state.items():
            original, rest = ADAPTER_KEY.match(key).groups()
            name, factor = rest.rsplit(".", 1)
            module = get_path(block_list[position_of[int(original)]], name)
            target = getattr(module, factor)
            if target.shape != tensor.shape:
                raise ValueError(f"LoRA tensor {key}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            target.copy_(tensor)


def merge_lora(
    adapter: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], alpha: float, transposed: bool = False
) -> dict[str, torch.Tensor]:
    """Pure state-dict merge: ``W <- W + (alpha/r) B A`` for every LoRA pair in ``lora``.

    ``adapter`` holds the untouched adapter blocks (``blocks.{i}.{module}.weight``);
    ``transposed`` is True for Conv1D weights stored ``(in, out)``.
    """
    merged = {key: tensor.clone() for key, tensor in adapter.items()}
    for key in lora:
        if not key.endswith(".lora_A"):
            continue
        stem = key[: -len(".lora_A")]
        a, b = lora[key], lora[stem + ".lora_B"]
        delta = (alpha / a.shape[0]) * (b.float() @ a.float())  # (out, in)
        weight_key = stem + ".weight"
        if weight_key not in merged:
            raise KeyError(f"LoRA factor {key} has no weight {weight_key} in the adapter")
        if transposed:
            delta = delta.T
        merged[weight_key] = (merged[weight_key].float() + delta).to(merged[weight_key].dtype)
    return merged


def lora_is_transposed(model: nn.Module) -> bool:
    """True when the family's linears store weights as (in, out) (GPT-2's Conv1D)."""
    return spec_for(model).family == "gpt2"
