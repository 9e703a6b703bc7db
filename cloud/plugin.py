"""Plug a tuned adapter (whole blocks, or LoRA factors merged into them) back around the real
middle of the full model, and save the result as a loadable Hugging Face model directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from offsite.emulator.lora import lora_is_transposed, merge_lora
from offsite.emulator.sandwich import adapter_state_dict, num_blocks, plug_in


def adapter_from_update(full_model: nn.Module, update: dict[str, torch.Tensor], adapter_blocks: list[int], lora_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Whole-block adapter state from a tuning result: as is in "blocks" mode, or the full
    model's own adapter blocks with the LoRA factors merged in (``lora_alpha`` given)."""
    if lora_alpha is None:
        return update
    layout = list(range(num_blocks(full_model)))
    base = adapter_state_dict(full_model, layout, adapter_blocks)
    return merge_lora(base, update, lora_alpha, transposed=lora_is_transposed(full_model))


def plug_in_update(full_model: nn.Module, update: dict[str, torch.Tensor], adapter_blocks: list[int], lora_alpha: float | None = None) -> nn.Module:
    return plug_in(full_model, adapter_from_update(full_model, update, adapter_blocks, lora_alpha))


def save_plugged(model: nn.Module, tokenizer, out: Path | str, provenance: dict | None = None) -> Path:
    """Write a Hugging Face model directory (safetensors) that ``from_pretrained`` loads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if provenance:
        (out / "offsite.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
    return out
