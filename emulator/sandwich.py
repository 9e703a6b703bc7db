"""The adapter sandwich: split a decoder into adapter (bottom ``a`` + top ``b`` blocks) and a
middle of ``N-a-b`` blocks; build an emulator that keeps ``k`` of the middle blocks.

A model built here is an ordinary Hugging Face ``*ForCausalLM`` whose block list holds a
chosen subset of the original blocks. Its *layout* is the list of original block indices,
position by position. Adapter tensors are keyed by original block index
(``blocks.{i}.{param}``), so the same adapter state dict loads into the emulator, the full
model and any other layout that contains those blocks.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from offsite.protocol.bundle import kept_middle_fits

from .arch import ArchSpec, get_path, set_path, spec_for

ADAPTER_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class SandwichShape:
    """``a`` bottom adapter blocks, ``k`` kept middle blocks, ``b`` top adapter blocks."""

    a: int
    k: int
    b: int

    def __post_init__(self) -> None:
        if self.a < 0 or self.b < 0 or self.a + self.b == 0:
            raise ValueError(f"adapter needs at least one block (a={self.a}, b={self.b})")
        if self.k < 1:
            raise ValueError(f"the emulator must keep at least one middle block (k={self.k})")

    @classmethod
    def parse(cls, text: str) -> "SandwichShape":
        """Parse ``"a-k-b"``, e.g. ``"2-10-2"``."""
        parts = text.split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"shape {text!r} is not of the form a-k-b, e.g. 2-10-2")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.a}-{self.k}-{self.b}"

    def check(self, n_blocks: int) -> None:
        middle = n_blocks - self.a - self.b
        if middle < 1:
            raise ValueError(f"shape {self} leaves no middle in a model of {n_blocks} blocks")
        if self.k > middle:
            raise ValueError(f"shape {self} keeps {self.k} middle blocks but the middle has only {middle}")

    def adapter_blocks(self, n_blocks: int) -> list[int]:
        self.check(n_blocks)
        return list(range(self.a)) + list(range(n_blocks - self.b, n_blocks))

    def kept_middle(self, n_blocks: int) -> list[int]:
        """Original indices of the kept middle blocks, chosen uniformly, first and last kept:
        ``a + round(i*(M-1)/(k-1))`` for ``i < k`` with ``M = N-a-b``."""
        self.check(n_blocks)
        middle = n_blocks - self.a - self.b
        if self.k == 1:
            return [self.a]
        return [self.a + round(i * (middle - 1) / (self.k - 1)) for i in range(self.k)]

    def emulator_layout(self, n_blocks: int, kept: list[int] | None = None) -> list[int]:
        """Adapter blocks around ``kept`` middle blocks (the uniform choice when None)."""
        kept = self.kept_middle(n_blocks) if kept is None else self.check_kept(kept, n_blocks)
        return list(range(self.a)) + kept + list(range(n_blocks - self.b, n_blocks))

    def check_kept(self, kept: list[int], n_blocks: int) -> list[int]:
        """``kept`` if it is ``k`` increasing indices inside the middle; otherwise a ValueError."""
        self.check(n_blocks)
        if not kept_middle_fits(kept, self.a, self.k, self.b, n_blocks):
            raise ValueError(
                f"kept middle blocks {kept} are not {self.k} increasing indices in {self.a}..{n_blocks - self.b - 1}"
            )
        return list(kept)


def num_blocks(model: nn.Module) -> int:
    return len(get_path(model, spec_for(model).blocks))


def _renumber(block: nn.Module, position: int) -> None:
    """Blocks carry their position for the KV cache (``layer_idx``); set it to the new one."""
    for module in block.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = position


def with_layout(model: nn.Module, layout: list[int]) -> nn.Module:
    """A deep copy of ``model`` whose blocks are ``model``'s blocks at ``layout`` (in order).

    Embeddings, final norm and head are copied as they are; the middle blocks not in the
    layout are never copied.
    """
    spec = spec_for(model)
    blocks = get_path(model, spec.blocks)
    n = len(blocks)
    if any(not 0 <= i < n for i in layout):
        raise ValueError(f"layout {layout} names blocks outside 0..{n - 1}")
    set_path(model, spec.blocks, nn.ModuleList())  # keep deepcopy from copying every block
    try:
        new = copy.deepcopy(model)
    finally:
        set_path(model, spec.blocks, blocks)
    new_blocks = nn.ModuleList(copy.deepcopy(blocks[i]) for i in layout)
    for position, block in enumerate(new_blocks):
        _renumber(block, position)
    set_path(new, spec.blocks, new_blocks)
    _set_num_layers(new.config, spec, layout)
    return new


def _set_num_layers(config, spec: ArchSpec, layout: list[int]) -> None:
    setattr(config, spec.num_layers_key, len(layout))
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) >= max(layout) + 1:
        config.layer_types = [layer_types[i] for i in layout]


@contextlib.contextmanager
def only_positions(model: nn.Module, positions: list[int]):
    """Temporarily run ``model`` with just the blocks at ``positions`` (no copies; for training
    without a KV cache, e.g. stochastic depth over the emulator's middle)."""
    spec = spec_for(model)
    blocks = get_path(model, spec.blocks)
    old_count = getattr(model.config, spec.num_layers_key)
    old_types = getattr(model.config, "layer_types", None)
    set_path(model, spec.blocks, nn.ModuleList(blocks[p] for p in positions))
    setattr(model.config, spec.num_layers_key, len(positions))
    if old_types is not None and len(old_types) == len(blocks):
        model.config.layer_types = [old_types[p] for p in positions]
    try:
        yield model
    finally:
        set_path(model, spec.blocks, blocks)
        setattr(model.config, spec.num_layers_key, old_count)
        if old_types is not None:
            model.config.layer_types = old_types


def build_emulator(
    model: nn.Module, shape: SandwichShape, kept: list[int] | None = None
) -> tuple[nn.Module, list[int]]:
    """Layer-drop emulator of ``model``: adapter blocks plus ``k`` kept middle blocks (``kept``, or
    chosen uniformly)."""
    layout = shape.emulator_layout(num_blocks(model), kept)
    return with_layout(model, layout), layout


# ---------------------------------------------------------------- adapter state dicts


def adapter_state_dict(model: nn.Module, layout: list[int], adapter_blocks: list[int]) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter blocks' parameters, keyed ``blocks.{original index}.{name}``."""
    blocks = get_path(model, spec_for(model).blocks)
    wanted = set(adapter_blocks)
    state: dict[str, torch.Tensor] = {}
    for position, original in enumerate(layout):
        if original in wanted:
            for name, tensor in blocks[position].state_dict().items():
                state[f"blocks.{original}.{name}"] = tensor.detach().clone()
    missing = wanted - set(layout)
    if missing:
        raise ValueError(f"adapter blocks {sorted(missing)} are not in this model's layout {layout}")
    return state


def load_adapter_state(model: nn.Module, layout: list[int], state: dict[str, torch.Tensor]) -> None:
    """Copy an adapter state dict into the blocks of ``model`` (strict: every key, shape, dtype)."""
    blocks = get_path(model, spec_for(model).blocks)
    position_of = {original: position for position, original in enumerate(layout)}
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = ADAPTER_KEY.match(key)
        if not match:
            raise KeyError(f"adapter tensor {key!r} is not of the form blocks.<index>.<name>")
        original = int(match.group(1))
        if original not in position_of:
            raise KeyError(f"adapter tensor {key!r} names block {original}, which this model does not hold")
        grouped.setdefault(original, {})[match.group(2)] = tensor
    for original, sub_state in grouped.items():
        block = blocks[position_of[original]]
        own = block.state_dict()
        if set(own) != set(sub_state):
            extra, lacking = set(sub_state) - set(own), set(own) - set(sub_state)
            raise KeyError(f"adapter block {original}: unexpected {sorted(extra)[:3]}, missing {sorted(lacking)[:3]}")
        for name, tensor in sub_state.items():
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"adapter tensor blocks.{original}.{name}: shape {tuple(tensor.shape)} != {tuple(own[name].shape)}"
                )
        with torch.no_grad():
            for name, param in block.state_dict(keep_vars=True).items():
                param.copy_(sub_state[name].to(param.dtype))


def plug_in(full_model: nn.Module, adapter: dict[str, torch.Tensor]) -> nn.Module:
    """The full model with ``adapter`` in place of its adapter blocks (a new model; the input is untouched)."""
    n = num_blocks(full_model)
    plugged = with_layout(full_model, list(range(n)))
    load_adapter_state(plugged, list(range(n)), adapter)
    return plugged
