"""Quantised emulators: keep every middle block, round its linear weights to a few bits.

The other way to make the middle lossy. Layer drop (with distillation) removes blocks; this keeps
each block's place and role and coarsens its weights instead (min-max rounding per group of input
columns, stored back as floats). At the same cost to the emulator as a language model it carries
far more of what the adapter learns over to the real model (experiments/QUALITY.md, "The emulator as a
privacy-utility knob"), but the data owners then hold a full-depth, lower-precision copy of the
model, so the operator chooses it knowingly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .arch import get_path, spec_for


@dataclass(frozen=True)
class Quantize:
    """Bit widths cycled over the middle blocks (``(3, 4)``: 3, 4, 3, 4, ...) and the number of
    input columns that share one scale and offset."""

    bits: tuple[int, ...]
    group: int = 64

    def __post_init__(self) -> None:
        if not self.bits or any(not 1 <= width <= 8 for width in self.bits):
            raise ValueError(f"quantisation bit widths must be 1-8, got {list(self.bits)}")
        if self.group < 1:
            raise ValueError(f"quantisation group must be >= 1, got {self.group}")

    @classmethod
    def parse(cls, bits: str, group: int = 64) -> "Quantize":
        """``"3,4"`` -> Quantize((3, 4), group)."""
        try:
            widths = tuple(int(width) for width in bits.split(","))
        except ValueError:
            raise ValueError(f"quantisation bit widths: expected integers like 3 or 3,4, got {bits!r}") from None
        return cls(widths, group)

    def __str__(self) -> str:
        return "q" + "".join(map(str, self.bits)) + f"g{self.group}"

    def levels(self, index: int) -> int:
        """The highest code of the ``index``-th quantised block (widths cycle): ``2**bits - 1``."""
        return 2 ** self.bits[index % len(self.bits)] - 1


@dataclass
class Rounded:
    """One rounded weight as what it is made of: ``weight = codes * scale + low`` per group, in the
    weight's (out x in) orientation. ``transposed``: the parameter itself is stored in x out
    (GPT-2's Conv1D). What a bundle packs instead of the weight's floats."""

    codes: torch.Tensor  # uint8, (out, groups, group), each in 0 .. 2**bits - 1
    scale: torch.Tensor  # (out, groups, 1), the weight's dtype
    low: torch.Tensor  # (out, groups, 1)
    bits: int
    transposed: bool


def _linear(block: nn.Module):
    """(name, parameter, transposed) for every linear map of a block; GPT-2's Conv1D stores in x out."""
    from transformers.pytorch_utils import Conv1D

    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module.weight, False
        elif isinstance(module, Conv1D):
            yield name, module.weight, True


def _weights(block: nn.Module):
    """(name, weight as out x in) for every linear map of a block."""
    for name, weight, transposed in _linear(block):
        yield name, weight.t() if transposed else weight


def check_quantizable(model: nn.Module, positions: list[int], spec: Quantize) -> None:
    """Raise, naming the block and weight, unless ``spec.group`` divides every linear weight's input
    columns in the blocks at ``positions`` (so a bad group fails before any distillation, and
    :func:`quantize_blocks` never leaves a model half rounded)."""
    blocks = get_path(model, spec_for(model).blocks)
    for position in positions:
        weights = list(_weights(blocks[position]))
        if not weights:
            raise ValueError(f"block {position} has no linear weights to quantise")
        for name, weight in weights:
            if weight.shape[1] % spec.group:
                raise ValueError(
                    f"quantisation group {spec.group} does not divide the {weight.shape[1]} input "
                    f"columns of block {position}'s {name} {tuple(weight.shape)}"
                )


def quantize_blocks(model: nn.Module, positions: list[int], spec: Quantize) -> dict[str, Rounded]:
    """Round every linear weight of the blocks at ``positions`` in place, the i-th of them to
    ``spec.bits[i % len(spec.bits)]`` bits: min-max per group of ``spec.group`` input columns,
    each weight moved to the nearest of the group's ``2**bits`` levels.

    Returns each rounded weight's codes, scales and offsets by parameter name (``model``'s
    ``state_dict`` keys), from which a bundle rebuilds the same floats bit for bit."""
    check_quantizable(model, positions, spec)
    blocks = get_path(model, spec_for(model).blocks)
    names = {id(param): name for name, param in model.named_parameters(remove_duplicate=False)}
    rounded = {}
    with torch.no_grad():
        for index, position in enumerate(positions):
            levels = spec.levels(index)
            for _, param, transposed in _linear(blocks[position]):
                weight = param.t() if transposed else param
                grouped = weight.reshape(weight.shape[0], -1, spec.group)
                low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
                scale = ((high - low) / levels).clamp(min=1e-8)
                codes = ((grouped - low) / scale).round().clamp(0, levels)
                weight.copy_((codes * scale + low).reshape_as(weight))
                rounded[names[id(param)]] = Rounded(codes.to(torch.uint8), scale, low, levels.bit_length(), transposed)
    return rounded


class RoundingNoise:
    """Tuning through a quantised middle without fitting its rounding errors.

    The real weights of a rounded group lie within half a step of the values shipped, and the
    step is readable from the shipped values alone (``(max - min) / (2**bits - 1)`` per group,
    min-max rounding keeps both ends on a level). :meth:`sample` moves every weight to a uniform
    draw from ``scale`` times that cell, so an adapter tuned across draws has to work for every
    middle the emulator is consistent with, the real one included; :meth:`restore` puts the
    shipped values back (for scoring, and when tuning ends).
    """

    def __init__(
        self, model: nn.Module, positions: list[int], spec: Quantize, scale: float = 1.0, seed: int = 0
    ) -> None:
        if scale <= 0:
            raise ValueError(f"rounding-noise scale must be > 0, got {scale}")
        check_quantizable(model, positions, spec)
        blocks = get_path(model, spec_for(model).blocks)
        self.scale = scale
        self.generator = torch.Generator().manual_seed(seed + 2)
        self.entries = []  # (block, weight name, shipped values grouped, step per group)
        for index, position in enumerate(positions):
            levels = spec.levels(index)
            for name, weight in _weights(blocks[position]):
                shipped = weight.detach().reshape(weight.shape[0], -1, spec.group).clone()
                step = (shipped.amax(-1, keepdim=True) - shipped.amin(-1, keepdim=True)) / levels
                self.entries.append((blocks[position], name, shipped, step))

    def _set(self, make) -> None:
        with torch.no_grad():
            for block, name, shipped, step in self.entries:
                weight = dict(_weights(block))[name]  # looked up each time: the model may have moved device
                weight.copy_(make(shipped, step).reshape_as(weight))

    def sample(self) -> None:
        scale, generator = self.scale, self.generator
        self._set(
            lambda shipped, step: shipped + torch.rand(shipped.shape, generator=generator).sub_(0.5).mul_(step * scale)
        )

    def restore(self) -> None:
        self._set(lambda shipped, step: shipped)
