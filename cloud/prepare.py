"""Build a job's emulator bundle: split, layer-drop, distil, optionally quantise, write. Bundles are cached
by a key over everything that determines them (base weights, shape, distillation settings,
corpus), so a second ``prepare`` with the same recipe takes seconds."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offsite.emulator.arch import spec_for
from offsite.emulator.corpus import DEFAULT_CORPUS, MODEL_SAMPLES, read_corpus, sample_corpus, samples_key, token_blocks
from offsite.emulator.distill import DistillConfig, distill
from offsite.emulator.quantize import Quantize, check_quantizable, quantize_blocks
from offsite.emulator.sandwich import SandwichShape, build_emulator, num_blocks
from offsite.emulator.select import SELECTIONS, cka_kept_middle
from offsite.emulator.tune import pick_device
from offsite.protocol.bundle import Bundle, BundleError, read_bundle, write_bundle
from offsite.protocol.files import replace_dir

from .models import cache_dir

log = logging.getLogger(__name__)

CKA_ROWS = 8  # corpus blocks, evenly spaced, whose hidden states choose the kept middle blocks (8 x 256 tokens)


@dataclass(frozen=True)
class EmulatorConfig:
    shape: SandwichShape
    distill: DistillConfig
    corpus: str = DEFAULT_CORPUS
    device: str = "auto"
    quantize: Quantize | None = None  # round the kept middle blocks' weights after distillation
    select: str = "uniform"  # which middle blocks are kept: "uniform" or "cka" (emulator/select.py)

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")


def config_for(preset, corpus: str | None = None) -> EmulatorConfig:
    """The emulator a :class:`~offsite.cloud.presets.Preset` names (shape, distillation, quantisation)."""
    return EmulatorConfig(
        preset.shape,
        preset.distill,
        corpus=preset.corpus or corpus or DEFAULT_CORPUS,
        quantize=preset.quantize,
        select=preset.select,
    )


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the config and every tensor's bytes (identifies the base weights)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recipe_key(base_fingerprint: str, config: EmulatorConfig, corpus_text: str) -> str:
    distill = dataclasses.asdict(config.distill)
    if not (config.distill.lm_weight or config.distill.kl_weight):
        del distill["logit_positions"]  # no logit terms: no bearing on the result (and older caches stay valid)
    recipe = {
        "base": base_fingerprint,
        "shape": str(config.shape),
        "distill": distill,
        "corpus": hashlib.sha256(corpus_text.encode()).hexdigest(),
    }
    if config.quantize is not None:  # only when set, so unquantised caches keep their keys
        recipe["quantize"] = dataclasses.asdict(config.quantize)
        recipe["packed"] = True  # bundles cached before packing are rebuilt packed
    if config.select != "uniform":
        recipe["select"] = {"by": config.select, "rows": CKA_ROWS, "version": 2}  # version: the selection rule
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]


def prepare_bundle(
    base: nn.Module,
    tokenizer,
    config: EmulatorConfig,
    out: Path,
    cache: Path | None = None,
    progress: bool = True,
) -> Bundle:
    """Write the job's bundle to ``out`` (a copy of the cached one when the recipe was built before)."""
    cache = cache or cache_dir()
    fingerprint = model_fingerprint(base)
    corpus_text = _corpus_text(config, base, tokenizer, cache / "corpora" / f"{fingerprint[:20]}-{samples_key()}.txt")
    key = recipe_key(fingerprint, config, corpus_text)
    cached = cache / "bundles" / key
    try:
        bundle = read_bundle(cached)
        log.info("emulator %s: reusing the cached bundle %s", config.shape, cached)
    except BundleError:
        bundle = _build(base, tokenizer, config, corpus_text, cached, progress)
    out = Path(out)
    if out.resolve() == cached.resolve():
        return bundle
    same = functools.partial(_holds, digest=bundle.digest)
    if same(out):
        return Bundle(out, bundle.manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(cached, staging, dirs_exist_ok=True)
        if read_bundle(staging).digest != bundle.digest:
            raise BundleError(f"{cached}: the cached bundle changed while it was copied to {out}")
        replace_dir(staging, out, keep=same)  # another job with this --out may have put the same bundle there first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(out, bundle.manifest)


def _corpus_text(config: EmulatorConfig, base: nn.Module, tokenizer, samples: Path) -> str:
    """The distillation text the recipe reads ('' when nothing is distilled or chosen on it);
    ``model-samples`` is sampled from ``base`` once and kept at ``samples``."""
    if not (config.distill.steps or config.select == "cka"):
        return ""
    if config.corpus != MODEL_SAMPLES:
        return read_corpus(config.corpus)
    if samples.is_file():
        return samples.read_text(encoding="utf-8")
    log.info("sampling the distillation corpus from the model (once; kept at %s)", samples)
    text = sample_corpus(base.to(pick_device(config.device)), tokenizer)
    base.to("cpu")
    samples.parent.mkdir(parents=True, exist_ok=True)
    staging = samples.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, samples)
    return text


def _holds(path: Path, digest: str) -> bool:
    """Whether ``path`` holds a whole bundle (every file's hash checked) with this manifest digest."""
    try:
        return read_bundle(path).digest == digest
    except BundleError:
        return False


def cut_info(base: nn.Module, shape: SandwichShape, layout: list[int]) -> dict:
    """What a bundle's manifest says about the cut: family, shape, layout, adapter and kept blocks."""
    n = num_blocks(base)
    return {
        "family": spec_for(base).family,
        "shape": {"a": shape.a, "k": shape.k, "b": shape.b, "n_blocks": n},
        "layout": layout,
        "adapter_blocks": shape.adapter_blocks(n),
        "kept_middle": layout[shape.a : len(layout) - shape.b],
    }


def _build(base, tokenizer, config: EmulatorConfig, corpus_text: str, target: Path, progress: bool) -> Bundle:
    shape, seq_len = config.shape, config.distill.seq_len
    # corpus_text is set when something reads it (distillation, the CKA choice): tokenised once for both
    train_blocks, heldout_blocks = token_blocks(tokenizer, corpus_text, seq_len) if corpus_text else (None, None)
    kept = None
    if config.select == "cka":
        spread = torch.linspace(0, len(train_blocks) - 1, min(CKA_ROWS, len(train_blocks))).long()
        ids = train_blocks[spread]  # evenly spaced over the text
        kept = cka_kept_middle(base, ids, shape)
        log.info("CKA-chosen middle blocks of %s: %s (uniform: %s)", shape, kept, shape.kept_middle(num_blocks(base)))
    emulator, layout = build_emulator(base, shape, kept)
    middle = list(range(shape.a, len(layout) - shape.b))
    if config.quantize is not None:
        check_quantizable(emulator, middle, config.quantize)  # before minutes of distillation, not after
    info = cut_info(base, shape, layout) | {
        "distill": {"config": dataclasses.asdict(config.distill), "corpus": config.corpus}
    }
    if config.distill.steps:
        log.info(
            "distilling %s on %d blocks of %d tokens (%d held out)",
            shape,
            len(train_blocks),
            seq_len,
            len(heldout_blocks),
        )
        device = pick_device(config.device)
        result = distill(
            base, emulator, layout, shape.a, shape.b, train_blocks, heldout_blocks, config.distill, device, progress
        )
        base.to("cpu")
        emulator.to("cpu")
        info["distill"].update(
            heldout_kd_before=result.heldout_before,
            heldout_kd_after=result.heldout_after,
            heldout_reduction=result.reduction,
            seconds=result.seconds,
        )
    if config.quantize is not None:
        rounded = quantize_blocks(emulator, middle, config.quantize)
        info["quantize"] = {"bits": list(config.quantize.bits), "group": config.quantize.group}
        log.info("quantised the %d kept middle blocks (%s)", len(middle), config.quantize)
        return write_bundle(target, emulator, tokenizer, info, packed=rounded)
    return write_bundle(target, emulator, tokenizer, info)
