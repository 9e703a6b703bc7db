"""Adapter updates on disk: safetensors, with a small JSON header in the safetensors metadata
(``mode``: "blocks" or "lora", ``lora_alpha``, ``bundle``: the bundle digest it was tuned on)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .safe_json import JSONRefused, parse_json

MAX_UPDATE_BYTES = 16 << 30


class UpdateError(ValueError):
    """An adapter update file is malformed or oversized; the message names the file."""


def save_update(path: Path | str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}
    save_file(contiguous, str(path), metadata={"offsite": json.dumps(meta, sort_keys=True)})
    return path


def load_update(path: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UpdateError(f"{path}: no such adapter update")
    if path.stat().st_size > MAX_UPDATE_BYTES:
        raise UpdateError(f"{path}: larger than {MAX_UPDATE_BYTES} bytes")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = parse_json(
                (handle.metadata() or {}).get("offsite", "{}"), finite=False
            )  # a diverged loss may be NaN
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, JSONRefused, OSError) as error:
        raise UpdateError(f"{path}: not a readable safetensors adapter update ({error})") from None
    if not isinstance(meta, dict) or meta.get("mode") not in ("blocks", "lora"):
        raise UpdateError(f"{path}: metadata 'mode' must be 'blocks' or 'lora', got {meta.get('mode')!r}")
    return tensors, meta
