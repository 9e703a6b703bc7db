"""``offsite cloud export``: a federated job's result in the formats other tools load.

- ``--format peft``: a LoRA job's global factors as a peft LoRA adapter (``adapter_config.json``
  + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the base
  model: ``r``, ``lora_alpha`` (the plug-in gain folded in: the merged change is linear in alpha),
  ``target_modules`` and ``layers_to_transform`` (the adapter blocks). A ``stack`` job's global
  is whole blocks with everything merged in (rank grows each round): export it with ``--format hf``.
- ``--format hf``: the plugged-in full model as a Hugging Face directory, for either mode.

peft writes this format itself only from a live ``PeftModel``; building one here would load the
whole base model for a file layout that is two keys per factor, so the layout is written directly.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from safetensors.torch import save_file

from offsite.emulator.arch import spec_for_model_type
from offsite.emulator.sandwich import ADAPTER_KEY
from offsite.protocol.bundle import read_bundle

from .fed_job import BUNDLE_DIR, JobError, load_checkpoint, load_state, read_job
from .models import load_base
from .plugin import plug_in_update, save_plugged
from .presets import check_gain

log = logging.getLogger(__name__)

FORMATS = ("peft", "hf")


def peft_adapter(
    factors: dict, alpha: float, gain: float, model_type: str, base_model: str | None
) -> tuple[dict, dict]:
    """(``adapter_config.json``, tensors of ``adapter_model.safetensors``) for LoRA ``factors``
    keyed ``blocks.{i}.{module path}.lora_A|B`` of a model of ``model_type``."""
    spec = spec_for_model_type(model_type)
    tensors, ranks, modules, layers = {}, set(), set(), set()
    for key, tensor in factors.items():
        block, rest = ADAPTER_KEY.match(key).groups()
        path, factor = rest.rsplit(".", 1)  # e.g. self_attn.q_proj, lora_A
        tensors[f"base_model.model.{spec.blocks}.{block}.{path}.{factor}.weight"] = tensor.contiguous()
        if factor == "lora_A":
            ranks.add(tensor.shape[0])
        modules.add(path.rsplit(".", 1)[-1])
        layers.add(int(block))
    if len(ranks) != 1:
        raise JobError(f"the factors have ranks {sorted(ranks)}: a peft adapter has one r")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": ranks.pop(),
        "lora_alpha": alpha * check_gain(gain),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(modules),
        "layers_to_transform": sorted(layers),
        "layers_pattern": spec.blocks.rsplit(".", 1)[-1],
        "fan_in_fan_out": spec.family == "gpt2",  # GPT-2's Conv1D stores (in, out)
        "use_rslora": False,
        "inference_mode": True,
    }
    return config, tensors


def export_job(job_dir: Path | str, fmt: str, out: Path | str, model: str | None = None) -> Path:
    """Write the job's last global adapter to ``out`` as ``fmt``; returns ``out``."""
    job_dir, out = Path(job_dir), Path(out)
    if fmt not in FORMATS:
        raise JobError(f"format {fmt!r} is not one of {FORMATS}")
    config, state = read_job(job_dir), load_state(job_dir)
    if state is None or state.completed_round < 1:
        raise JobError(f"{job_dir}: no completed round to export")
    tensors, meta = load_checkpoint(job_dir, state)
    bundle = read_bundle(job_dir / BUNDLE_DIR)
    lora = meta.get("mode") == "lora"
    base_model = model or config.base_model
    if fmt == "peft":
        if not lora:
            what = "a stack LoRA job's global is whole blocks" if config.tuning.mode == "lora" else "whole blocks"
            raise JobError(f"{job_dir}: {what}, not LoRA factors: export it with --format hf")
        adapter_config, weights = peft_adapter(
            tensors, meta["lora_alpha"], config.plugin_gain, bundle.manifest["model_type"], base_model
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=1, sort_keys=True))
        save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        log.info("job %s: round %d's LoRA factors as a peft adapter in %s", job_dir, state.completed_round, out)
        return out
    if base_model is None:
        raise JobError(f"{job_dir / 'job.json'}: no base_model to plug into: give --model")
    base, tokenizer, _ = load_base(base_model)
    alpha = meta.get("lora_alpha") if lora else None
    plugged = plug_in_update(base, tensors, bundle.adapter_blocks, alpha, gain=config.plugin_gain)
    provenance = {"bundle": state.bundle, "round": state.completed_round, "checkpoint_sha256": state.checkpoint_sha256}
    return save_plugged(plugged, tokenizer, out, provenance)


def register(commands) -> None:
    """``offsite cloud export``."""
    parser = commands.add_parser(
        "export",
        help="write a federated job's adapter as a peft LoRA adapter, or the plugged-in model as a HF directory",
        description="Export the last global adapter of a federated job: --format peft writes adapter_config.json "
        "and adapter_model.safetensors (a LoRA job; peft.PeftModel.from_pretrained loads it onto the base model, "
        "the plug-in gain folded into lora_alpha); --format hf writes the plugged-in full model (either mode).",
    )
    parser.add_argument("--job", required=True, type=Path, help="the federated job directory")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="peft or hf")
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--model", default=None, help="base model for --format hf (default: the job's base_model)")
    parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    out = export_job(args.job, args.fmt, args.out, args.model)
    print(f"{args.fmt}: {out}")
    return 0
