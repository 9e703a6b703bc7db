"""The data owner's local tuning run: a verified bundle, local data, the local device."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from offsite.emulator.data import Example, read_examples
from offsite.emulator.lora import is_lora_state
from offsite.emulator.sandwich import load_adapter_state
from offsite.emulator.tune import TuneConfig, TuneResult, tune_adapter
from offsite.protocol.adapter import save_update
from offsite.protocol.bundle import SIGNATURE, Bundle, load_emulator, load_tokenizer, read_bundle
from offsite.protocol.bundle_signing import read_signed_bundle
from offsite.protocol.keys import CoordinatorPublicKeys

log = logging.getLogger(__name__)


def tune_on_bundle(
    bundle: Bundle,
    examples: list[Example],
    config: TuneConfig,
    start: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    checkpointing: bool = False,
) -> TuneResult:
    """Build the emulator from a verified bundle, start from ``start`` when given (a global adapter:
    whole blocks, loaded into the emulator, or a LoRA job's global factors, loaded into the LoRA
    it attaches), and tune the adapter on ``examples``. The one tuning path of a data owner.
    ``checkpointing``: recompute activations and the head's logits in the backward pass (less
    memory, more time, the same update; node config ``activation-checkpointing``)."""
    tokenizer = load_tokenizer(bundle)
    emulator = load_emulator(bundle)
    factors = start if start is not None and is_lora_state(start) else None
    if start is not None and factors is None:
        load_adapter_state(emulator, bundle.layout, start)
    log.info("tuning %s adapter on %d examples", config.mode, len(examples))
    return tune_adapter(
        emulator,
        tokenizer,
        bundle.layout,
        bundle.adapter_blocks,
        examples,
        config,
        a=bundle.shape["a"],
        progress=progress,
        lora_start=factors,
        checkpointing=checkpointing,
    )


def open_local_bundle(bundle_dir: Path | str, coordinator_key: Path | str | None = None) -> Bundle:
    """The bundle at ``bundle_dir``, verified: with ``coordinator_key`` (the coordinator's
    ``coordinator.pub.json`` or its directory, pinned out of band, as the daemon's) only if its
    ``manifest.sig`` verifies with that key, so an edited manifest is refused; without one, its
    manifest and files are checked (hashes, known keys, the cut) but not who made it."""
    if coordinator_key is not None:
        return read_signed_bundle(bundle_dir, CoordinatorPublicKeys.load(coordinator_key))
    if (Path(bundle_dir) / SIGNATURE).is_file():
        log.warning("%s is signed but no --coordinator-key was given: its signature is not checked", bundle_dir)
    return read_bundle(bundle_dir)


def train_local(
    bundle_dir: Path | str,
    data: Path | str,
    config: TuneConfig,
    progress: bool = True,
    coordinator_key: Path | str | None = None,
    checkpointing: bool = False,
) -> tuple[TuneResult, dict]:
    """Tune the adapter of the bundle's emulator on a local data file.

    Returns the result and the update's metadata (mode, LoRA alpha, bundle digest, examples).
    ``coordinator_key``: see :func:`open_local_bundle`; ``checkpointing``: see :func:`tune_on_bundle`.
    """
    bundle = open_local_bundle(bundle_dir, coordinator_key)
    examples = read_examples(data)
    result = tune_on_bundle(bundle, examples, config, progress=progress, checkpointing=checkpointing)
    meta = {
        "mode": config.mode,
        "lora_alpha": config.lora.alpha if config.mode == "lora" else None,
        "bundle": bundle.digest,
        "num_examples": len(examples),
        "final_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
    }
    return result, meta


def train_local_to_file(
    bundle_dir,
    data,
    config: TuneConfig,
    out: Path | str,
    progress: bool = True,
    coordinator_key: Path | str | None = None,
    checkpointing: bool = False,
) -> Path:
    result, meta = train_local(bundle_dir, data, config, progress, coordinator_key, checkpointing)
    return save_update(out, result.adapter, meta)
