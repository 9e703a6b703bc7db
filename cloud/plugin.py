"""Plug a tuned adapter (whole blocks, or LoRA factors merged into them) back around the real
middle of the full model, and save the result as a loadable Hugging Face model directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from offsite.emulator.lora import lora_is_transposed, merge_lora
from offsite.emulator.sandwich import adapter_state_dict, num_blocks, plug_in

from .presets import check_gain


def extrapolate(real: torch.Tensor, tuned: torch.Tensor, gain: float) -> torch.Tensor:
    """``real + gain * (tuned - real)``, computed in float32 at least (float64 stays float64), back
    in ``real``'s dtype."""
    wide = torch.promote_types(real.dtype, torch.float32)
    return (real.to(wide) + gain * (tuned.to(wide) - real.to(wide))).to(real.dtype)


def adapter_from_update(
    full_model: nn.Module,
    update: dict[str, torch.Tensor],
    adapter_blocks: list[int],
    lora_alpha: float | None = None,
    gain: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Whole-block adapter state from a tuning result: as is in "blocks" mode, or the full
    model's own adapter blocks with the LoRA factors merged in (``lora_alpha`` given).

    ``gain`` scales what the update changes in the full model's own adapter blocks (the plug-in
    gain, a recipe setting chosen on held-out rows; experiments/QUALITY.md, "Plug-in gain"). 1 plugs the update in
    as tuned, 0 leaves the model as it was.
    """
    gain = check_gain(gain)
    layout = list(range(num_blocks(full_model)))
    if lora_alpha is not None:  # the merged change is linear in alpha
        base = adapter_state_dict(full_model, layout, adapter_blocks)
        return merge_lora(base, update, lora_alpha * gain, transposed=lora_is_transposed(full_model))
    if gain == 1.0:
        return update
    base = adapter_state_dict(full_model, layout, adapter_blocks)
    if set(update) != set(base):
        raise KeyError(
            f"the update's tensors do not match the full model's adapter blocks {adapter_blocks}: "
            f"{sorted(set(update) ^ set(base))[:4]}"
        )
    return {key: extrapolate(base[key], tensor, gain) for key, tensor in update.items()}


def plug_in_update(
    full_model: nn.Module,
    update: dict[str, torch.Tensor],
    adapter_blocks: list[int],
    lora_alpha: float | None = None,
    gain: float = 1.0,
) -> nn.Module:
    return plug_in(full_model, adapter_from_update(full_model, update, adapter_blocks, lora_alpha, gain))


def save_plugged(model: nn.Module, tokenizer, out: Path | str, provenance: dict | None = None) -> Path:
    """Write a Hugging Face model directory (safetensors) that ``from_pretrained`` loads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if provenance:
        (out / "offsite.json").write_text(json.dumps(provenance, indent=1, sort_keys=True))
    return out
