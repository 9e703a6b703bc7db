"""Fine-tuning cost: what a data owner pays to tune the adapter on the emulator, against full
fine-tuning of the base model, measured side by side.

One run, one model, one batch shape. Each setting runs in its own subprocess so that its peak
memory (CUDA: max allocated; CPU: the process's peak RSS, the Python and torch runtime included)
is its own. The emulator settings build the model from the job's bundle, as ``offsite client``
does, and never load the base model (the parent process prepares the bundle first, from the
cache when the recipe was built before). Prints tokens/s, peak memory, the ratios against full
FT, and the analytic FLOP-ratio bound for the shape.

    python benchmarks/finetune_cost.py [--preset smollm2-135m/default] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "full FT (all parameters)": "full",
    "emulator + adapter blocks": "emulator",
    "emulator + LoRA in adapter (r 8)": "emulator-lora",
    "emulator + frozen-A LoRA (r 8, B trained)": "emulator-lora-frozen-a",
    "emulator + LoRA, activation checkpointing": "emulator-lora-ckpt",
    "emulator + frozen-A LoRA, activation checkpointing": "emulator-lora-frozen-a-ckpt",
}


def measure(args: argparse.Namespace) -> dict:
    """Run one setting in this process and return its figures."""
    import torch

    from offsite.cloud.models import load_base
    from offsite.emulator.data import Batch
    from offsite.emulator.lora import LoRASpec, attach_lora
    from offsite.emulator.score import answer_loss, autocast_for
    from offsite.emulator.tune import LOSS_CHUNK, pick_device, trainable_parameters
    from offsite.protocol.bundle import load_emulator, read_bundle

    torch.manual_seed(0)
    device = pick_device(args.device)
    if args.setting == "full":
        model, _, _ = load_base(args.model)
        for param in model.parameters():
            param.requires_grad_(True)
        params = list(model.parameters())
    else:  # a data owner's process: the bundle only
        bundle = read_bundle(args.bundle)
        model, layout, adapter_blocks = load_emulator(bundle), bundle.layout, bundle.adapter_blocks
        mode = "lora" if args.setting.startswith("emulator-lora") else "blocks"
        frozen = args.setting.startswith("emulator-lora-frozen-a")
        if mode == "lora":
            attach_lora(model, layout, adapter_blocks, LoRASpec(rank=8, alpha=16, freeze_a=frozen))
        params = trainable_parameters(model, layout, adapter_blocks, mode, freeze_a=frozen)
    model.to(device).train()
    chunk = None
    if args.setting.endswith("-ckpt"):  # what `offsite client start --activation-checkpointing` does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        chunk = LOSS_CHUNK
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    batch = Batch(ids, torch.ones_like(ids), ids.clone())
    autocast = autocast_for(device)

    def step() -> None:
        with autocast:
            loss = answer_loss(model, batch, chunk)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    seconds = time.perf_counter() - started
    return {
        "tokens_per_s": args.batch * args.seq * args.steps / seconds,
        "peak_mib": peak,
        "trainable": sum(p.numel() for p in params),
        "device": str(device),
    }


def flop_ratio_bound(model_name: str, shape_text: str) -> tuple[float, float]:
    """Upper bounds on the speed-up of emulator tuning over full FT, per token.

    With f the forward FLOPs of one block and h of the head: full FT costs 3(Nf + h)
    (forward, activation grads, weight grads); emulator tuning with whole adapter blocks costs
    2((a+k+b)f + h) + (a+b)f (activation grads still flow through every block above the
    bottom adapter, weight grads only in the adapter); with LoRA the weight-grad term is ~0.
    """
    from offsite.cloud.models import load_base
    from offsite.emulator.arch import get_path, spec_for
    from offsite.emulator.sandwich import SandwichShape

    model, _, _ = load_base(model_name)
    spec = spec_for(model)
    blocks = get_path(model, spec.blocks)
    n = len(blocks)
    f = 2 * sum(p.numel() for p in blocks[0].parameters())
    h = 2 * get_path(model, spec.head).weight.numel()
    shape = SandwichShape.parse(shape_text)
    kept = shape.a + shape.k + shape.b
    full = 3 * (n * f + h)
    return full / (2 * (kept * f + h) + (shape.a + shape.b) * f), full / (2 * (kept * f + h))


def prepare(preset_name: str, out: Path) -> tuple[str, str, str]:
    """(base model, shape, bundle directory) of the preset's emulator, prepared in this process."""
    from offsite.cloud.models import load_base
    from offsite.cloud.prepare import config_for, prepare_bundle
    from offsite.cloud.presets import get_preset

    preset = get_preset(preset_name)
    base, tokenizer, _ = load_base(preset.base)
    bundle = prepare_bundle(base, tokenizer, config_for(preset), out / "bundle", progress=False)
    return preset.base, str(preset.shape), str(bundle.root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m/default", help="recipe whose emulator the owners tune")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--setting", choices=sorted(SETTINGS.values()), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(measure(args)))
        return

    results = {}
    scratch = tempfile.TemporaryDirectory(prefix="finetune-cost-")
    args.model, args.shape, bundle = prepare(args.preset, Path(scratch.name))
    for label, setting in SETTINGS.items():
        command = [
            sys.executable,
            __file__,
            "--setting",
            setting,
            "--model",
            args.model,
            "--bundle",
            bundle,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
        ]
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[label] = json.loads(output.strip().splitlines()[-1])
    full = results["full FT (all parameters)"]
    print(
        f"\n{args.model}, shape {args.shape}, batch {args.batch} x {args.seq} tokens, "
        f"{args.steps} timed steps on {full['device']}\n"
    )
    print("| setting | trainable params | tokens/s | speed-up | peak memory (MiB) | memory saved |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['trainable'] / 1e6:.1f} M | {r['tokens_per_s']:.0f} "
            f"| {r['tokens_per_s'] / full['tokens_per_s']:.2f}x "
            f"| {r['peak_mib']:.0f} | {full['peak_mib'] / r['peak_mib']:.2f}x |"
        )
    blocks_bound, lora_bound = flop_ratio_bound(args.model, args.shape)
    print(f"\nFLOP-ratio bound for {args.shape}: {blocks_bound:.2f}x (adapter blocks), {lora_bound:.2f}x (LoRA)")
    if full["device"] == "cpu":
        print("(CPU peak memory: each subprocess's peak RSS, the Python and torch runtime included; the emulator")
        print(" settings build the model from the bundle and never load the base model, as a data owner's node)")
    scratch.cleanup()


if __name__ == "__main__":
    main()
