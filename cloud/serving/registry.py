"""The serving registry: finished jobs' adapters on disk, ready to be served beside the base model.

Layout::

    REGISTRY/
      <job name>/
        adapter.safetensors   the adapter (protocol.adapter format: "mode" blocks|lora, "lora_alpha")
        meta.json             {"format", "name", "mode", "lora_alpha", "plugin_gain", "adapter_blocks",
                               "source", "bundle", "round", "sha256", "registered"}

A job's adapter is either whole blocks (``blocks.{i}.{param}``, every parameter of each block it
names) or LoRA factors (``blocks.{i}.{module}.lora_A`` / ``.lora_B``) applied to the base model's
own block ``i``, scaled by ``lora_alpha / rank``; a ``plugin_gain`` other than 1 (the recipe's; a
federated job's job.json, or the update file's metadata) is applied as ``offsite cloud plugin``
applies it: whole blocks become ``own + gain * (adapter - own)``, LoRA's scale is multiplied by it.
Sources: a finished federated job directory
(``state.json`` names the last checkpoint; its sha256 is verified) or an adapter update file
(``offsite client train``'s output). Entries are written to a staging directory and renamed into
place, so a reader never sees half an entry. Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import re
import reprlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from offsite.cloud.fed_job import JOB_FILE, JobError, load_checkpoint, load_state, read_job
from offsite.cloud.plugin import extrapolate
from offsite.cloud.presets import check_gain
from offsite.emulator.arch import blocks_of
from offsite.emulator.sandwich import ADAPTER_KEY
from offsite.protocol.adapter import UpdateError, load_update, save_update
from offsite.protocol.bundle import sha256_file
from offsite.protocol.files import replace_dir
from offsite.protocol.tensors import check_like

FORMAT = "offsite-served-job/1"
ADAPTER_FILE = "adapter.safetensors"
META_FILE = "meta.json"
BASE_MODEL = "base"  # the model name that serves the bare base model
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistryError(ValueError):
    """A registry entry, a job to register or an adapter is unusable; the message names it."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise RegistryError(
            f"job name {reprlib.repr(name)}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if name == BASE_MODEL:
        raise RegistryError(f"job name {name!r} is reserved for the bare base model")
    return name


@dataclass(eq=False)
class ServedJob:
    """One job's adapter, validated against the base model and in its dtype.

    ``blocks``: original block index -> parameter name -> tensor (whole-block adapters);
    ``lora``: original block index -> linear module path -> (A ``(r, in)``, B ``(out, r)``, scale).
    Compared by identity: two registrations of one name are two jobs.
    """

    name: str
    mode: Literal["blocks", "lora"]
    blocks: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = field(default_factory=dict)
    lora_alpha: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def adapter_blocks(self) -> list[int]:
        return sorted(self.blocks if self.mode == "blocks" else self.lora)

    def nbytes(self) -> int:
        tensors = [t for block in self.blocks.values() for t in block.values()]
        tensors += [t for block in self.lora.values() for a, b, _ in block.values() for t in (a, b)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _block_index(key: str, n_blocks: int, where: str) -> tuple[int, str]:
    match = ADAPTER_KEY.match(key)
    if not match:
        raise RegistryError(f"{where}: tensor {key!r} is not of the form blocks.<index>.<name>")
    index = int(match.group(1))
    if not 0 <= index < n_blocks:
        raise RegistryError(f"{where}: tensor {key!r} names block {index}; the base model has blocks 0..{n_blocks - 1}")
    return index, match.group(2)


def _finite(tensor: torch.Tensor, where: str, key: str, gain: float) -> torch.Tensor:
    """``tensor`` (as served: in the base model's dtype, the plug-in gain applied), refused when
    it holds NaN or inf: every answer of the job would be NaN."""
    if not bool(torch.isfinite(tensor).all()):
        raise RegistryError(
            f"{where}: tensor {key!r} is not finite as served (plug-in gain {gain:g}, dtype {tensor.dtype})"
        )
    return tensor


def served_job(name: str, tensors: dict[str, torch.Tensor], meta: dict, base: nn.Module, where: str = "") -> ServedJob:
    """Check an adapter against ``base`` (every key, shape; whole blocks complete) and cast it to
    the base model's dtype."""
    where = where or name
    blocks = blocks_of(base)
    n_blocks = len(blocks)
    dtype = next(base.parameters()).dtype
    mode = meta.get("mode")
    try:
        gain = check_gain(meta.get("plugin_gain", 1.0))
    except ValueError as error:
        raise RegistryError(f"{where}: {error}") from None
    if not tensors:
        raise RegistryError(f"{where}: the adapter holds no tensors")
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, rest = _block_index(key, n_blocks, where)
        grouped.setdefault(index, {})[rest] = tensor
    if mode == "blocks":
        return _blocks_job(name, grouped, blocks, meta, dtype, gain, where)
    if mode == "lora":
        return _lora_job(name, grouped, blocks, meta, dtype, gain, where)
    raise RegistryError(f"{where}: metadata 'mode' must be 'blocks' or 'lora', got {mode!r}")


def _blocks_job(
    name: str,
    grouped: dict[int, dict[str, torch.Tensor]],
    blocks: nn.ModuleList,
    meta: dict,
    dtype: torch.dtype,
    gain: float,
    where: str,
) -> ServedJob:
    """A whole-blocks adapter, each block checked against the base's and plugged in at ``gain``."""
    job = ServedJob(name, "blocks", meta=meta)
    for index, params in sorted(grouped.items()):
        own = blocks[index].state_dict()
        check_like(
            params, own, RegistryError, f"{where}: adapter block {index}", prefix=f"blocks.{index}.", finite=True
        )
        if gain != 1.0:  # the recipe's plug-in gain, as `offsite cloud plugin` applies it
            params = {param: extrapolate(own[param], tensor, gain) for param, tensor in params.items()}
        job.blocks[index] = {
            param: _finite(tensor.to(dtype).contiguous(), where, f"blocks.{index}.{param}", gain)
            for param, tensor in params.items()
        }
    return job


def _lora_job(
    name: str,
    grouped: dict[int, dict[str, torch.Tensor]],
    blocks: nn.ModuleList,
    meta: dict,
    dtype: torch.dtype,
    gain: float,
    where: str,
) -> ServedJob:
    """A LoRA adapter: an (A, B, scale) per adapted linear of each block."""
    alpha = meta.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise RegistryError(f"{where}: a LoRA adapter needs a positive 'lora_alpha' in its metadata, got {alpha!r}")
    job = ServedJob(name, "lora", lora_alpha=float(alpha), meta=meta)
    for index, params in sorted(grouped.items()):
        own = blocks[index].state_dict()
        for stem in sorted({p.rsplit(".", 1)[0] for p in params}):
            a, b = _lora_pair(params, own, stem, f"{where}: blocks.{index}.{stem}")
            scale = gain * float(alpha) / a.shape[0]
            a = _finite(a.to(dtype).contiguous(), where, f"blocks.{index}.{stem}.lora_A", gain)
            b = _finite(b.to(dtype).contiguous(), where, f"blocks.{index}.{stem}.lora_B", gain)
            job.lora.setdefault(index, {})[stem] = (a, b, scale)
    return job


def _lora_pair(
    params: dict[str, torch.Tensor], own: dict[str, torch.Tensor], stem: str, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``stem``'s (lora_A, lora_B), checked to be exactly those two and to fit the base's linear weight."""
    a, b = params.get(stem + ".lora_A"), params.get(stem + ".lora_B")
    if a is None or b is None or len([p for p in params if p.rsplit(".", 1)[0] == stem]) != 2:
        raise RegistryError(f"{where}: LoRA needs exactly lora_A and lora_B")
    weight = own.get(stem + ".weight")
    if weight is None or weight.dim() != 2:
        raise RegistryError(f"{where}: the base block has no linear {stem!r}")
    out_features, in_features = weight.shape
    if (
        a.dim() != 2
        or b.dim() != 2
        or a.shape[1] != in_features
        or b.shape[0] != out_features
        or a.shape[0] != b.shape[1]
    ):
        raise RegistryError(
            f"{where}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} "
            f"do not fit a ({out_features}, {in_features}) weight"
        )
    return a, b


# ---------------------------------------------------------------- sources


def read_source(path: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a finished federated job directory or an adapter update file."""
    path = Path(path)
    if path.is_dir():
        try:
            state = load_state(path)
            gain = read_job(path).plugin_gain if (path / JOB_FILE).is_file() else 1.0
        except JobError as error:
            raise RegistryError(str(error)) from None
        if state is None or state.completed_round < 1 or not state.checkpoint:
            raise RegistryError(f"{path}: not a finished job (no completed round in {path / 'state.json'})")
        try:
            tensors, kind = load_checkpoint(path, state)  # whole blocks, or a LoRA job's factors
        except (JobError, UpdateError) as error:
            raise RegistryError(str(error)) from None
        meta = {
            "mode": kind["mode"],
            "lora_alpha": kind.get("lora_alpha"),
            "bundle": state.bundle,
            "round": state.completed_round,
            "plugin_gain": gain,
        }
        return tensors, meta
    try:
        return load_update(path)
    except UpdateError as error:
        raise RegistryError(str(error)) from None


def add(
    registry: Path | str,
    name: str,
    source: Path | str,
    base: nn.Module | None = None,
    replace: bool = False,
    plugin_gain: float | None = None,
) -> Path:
    """Copy ``source``'s adapter into ``registry/name`` (validated against ``base`` when given).

    ``plugin_gain``: serve the adapter at this gain instead of the source's own (a job's
    ``job.json``, else the update file's metadata, else 1). A client's update file does not know
    the recipe's gain, so registering one from a recipe with a gain needs it said here.
    """
    check_name(name)
    registry = Path(registry)
    target = registry / name
    if target.exists() and not replace:
        raise RegistryError(f"{target}: job {name!r} is already registered (unregister it first, or replace)")
    tensors, meta = read_source(source)
    if plugin_gain is not None:
        try:
            meta = {**meta, "plugin_gain": check_gain(plugin_gain)}
        except ValueError as error:
            raise RegistryError(f"registering {name!r}: {error}") from None
    if base is not None:
        served_job(name, tensors, meta, base, where=str(source))
    indices = sorted({int(ADAPTER_KEY.match(key).group(1)) for key in tensors if ADAPTER_KEY.match(key)})
    info = {
        "format": FORMAT,
        "name": name,
        "mode": meta.get("mode"),
        "lora_alpha": meta.get("lora_alpha"),
        "plugin_gain": meta.get("plugin_gain", 1.0),
        "adapter_blocks": indices,
        "source": str(Path(source).resolve()),
        "bundle": meta.get("bundle"),
        "round": meta.get("round"),
        "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    registry.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=registry))
    try:
        save_update(staging / ADAPTER_FILE, tensors, meta)
        info["sha256"] = sha256_file(staging / ADAPTER_FILE)
        (staging / META_FILE).write_text(json.dumps(info, indent=1, sort_keys=True))
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def remove(registry: Path | str, name: str) -> None:
    check_name(name)
    target = Path(registry) / name
    if not (target / META_FILE).is_file():
        raise RegistryError(f"{target}: job {name!r} is not registered")
    shutil.rmtree(target)


def names(registry: Path | str) -> list[str]:
    registry = Path(registry)
    if not registry.is_dir():
        return []
    return sorted(p.name for p in registry.iterdir() if not p.name.startswith(".") and (p / META_FILE).is_file())


def load(registry: Path | str, name: str, base: nn.Module) -> ServedJob:
    """The registered job ``name``, its file's sha256 checked against meta.json."""
    entry = Path(registry) / check_name(name)
    meta_path = entry / META_FILE
    try:
        info = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RegistryError(f"{meta_path}: unreadable ({error})") from None
    if info.get("format") != FORMAT:
        raise RegistryError(f"{meta_path}: format {info.get('format')!r} is not {FORMAT!r}")
    adapter = entry / ADAPTER_FILE
    if not adapter.is_file():
        raise RegistryError(f"{adapter}: missing")
    if info.get("sha256") and sha256_file(adapter) != info["sha256"]:
        raise RegistryError(f"{adapter}: sha256 does not match {meta_path}")
    try:
        tensors, meta = load_update(adapter)
    except UpdateError as error:
        raise RegistryError(str(error)) from None
    job = served_job(name, tensors, meta, base, where=str(adapter))
    job.meta = info
    return job
