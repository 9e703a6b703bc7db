"""Does tuning on the emulator move the real model, and when? Score emulator-FT and the plug-in
at checkpoints along one tuning run (same optimiser state throughout), with each setting's
label picks, so transfer can be seen rising, peaking or turning.

    python experiments/trajectory.py --recipe kd-2-10-2 --task hyperbaton --at 10,30,60,120

Two probes of how the update is carried over:
  --gammas 1,2   plug in the real adapter + gamma * (tuned - shipped shell): does the real model
                 move the same way as the emulator, only less?
  --shell-steps  before tuning, fit the emulator's middle and top blocks to the full model's
                 middle output and logits (KD + KL on --shell-corpus); the plug-in then carries
                 the delta from that shell, so what the shell learned to make up for is not sent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from offsite.cloud.models import load_base
from offsite.cloud.pipeline import task_files
from offsite.cloud.prepare import EmulatorConfig, prepare_bundle
from offsite.emulator.data import read_examples, read_mc_jsonl
from offsite.emulator.arch import get_path, spec_for
from offsite.emulator.corpus import read_corpus, token_blocks
from offsite.emulator.distill import DistillConfig, kd_losses, logit_positions, tap_pairs
from offsite.emulator.sandwich import SandwichShape, adapter_state_dict, num_blocks, plug_in
from offsite.emulator.score import score_mc
from offsite.emulator.tune import tune_adapter
from offsite.protocol.bundle import load_emulator

from levers import RECIPES, picks  # experiments/ is on sys.path when this script runs


def fit_shell(base, emulator, bundle, text: str, tokenizer, steps: int, lr: float = 1e-4) -> None:
    """Train the emulator's kept middle and top adapter blocks in place so that it matches the full
    model's middle output (normalised MSE) and next-token distribution (KL, every position)."""
    import torch

    a, b, layout = bundle.shape["a"], bundle.shape["b"], bundle.layout
    blocks = get_path(emulator, spec_for(emulator).blocks)
    params = [p for i in range(a, len(layout)) for p in blocks[i].parameters()]
    for p in emulator.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    config = DistillConfig(kd_weight=1.0, kl_weight=1.0, logit_positions=0)
    train_blocks, _ = token_blocks(tokenizer, text, 256)
    pairs = tap_pairs(layout, a, b, num_blocks(base), False)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    emulator.train()
    for step in range(steps):
        ids = train_blocks[torch.randint(0, len(train_blocks), (4,), generator=generator)]
        terms = kd_losses(base, emulator, ids, pairs, config, logit_positions(256, 0, generator))
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        logging.info("shell step %d: kd %.3f kl %.3f", step, terms["kd"].item(), terms["kl"].item())
    emulator.eval()
    for p in params:
        p.requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="kd-2-10-2")
    parser.add_argument("--task", default="hyperbaton")
    parser.add_argument("--at", default="10,30,60,120", help="steps at which to score")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--train", choices=("both", "bottom", "top"), default=None)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="constant")
    parser.add_argument("--corpus", default=None, help="distillation corpus (default: the recipe's, python-docs)")
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--gammas", default="1", help="plug in real + gamma * (tuned - shell), for each gamma")
    parser.add_argument("--shell-steps", type=int, default=0, help="fit the shell to the full model first (KD + KL)")
    parser.add_argument("--shell-corpus", default="python-docs")
    parser.add_argument("--out", type=Path, default=Path("runs/trajectory.jsonl"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    at = sorted(int(x) for x in args.at.split(","))
    shape, distill_config, tune = RECIPES[args.recipe]
    changes = {"steps": at[-1], "schedule": args.schedule}
    if args.lr:
        changes["lr"] = args.lr
    if args.train:
        changes["train"] = args.train
    tune = dataclasses.replace(tune, **changes)
    base, tokenizer, _ = load_base()
    emulator_config = EmulatorConfig(SandwichShape.parse(shape), distill_config)
    name = args.recipe
    if args.corpus:
        emulator_config = dataclasses.replace(emulator_config, corpus=args.corpus)
        name += "-" + Path(args.corpus).stem
    bundle = prepare_bundle(base, tokenizer, emulator_config, Path("runs/bundles") / name)
    emulator = load_emulator(bundle)
    train_path, test_path = task_files(args.task)
    test = read_mc_jsonl(test_path, limit=args.test_rows)
    if args.shell_steps:
        fit_shell(base, emulator, bundle, read_corpus(args.shell_corpus), tokenizer, args.shell_steps)
        name += f"-shell{args.shell_steps}-" + Path(args.shell_corpus).stem
    real = adapter_state_dict(base, list(range(num_blocks(base))), bundle.adapter_blocks)
    shell = adapter_state_dict(emulator, bundle.layout, bundle.adapter_blocks)
    gammas = [float(g) for g in args.gammas.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(step, model) -> None:
        if step not in at:
            return
        model.eval()
        state = adapter_state_dict(model, bundle.layout, bundle.adapter_blocks)
        emu = score_mc(model, tokenizer, test, 32, progress=False)
        for gamma in gammas:
            plugged = plug_in(base, {key: real[key] + gamma * (state[key] - shell[key]) for key in real})
            plug = score_mc(plugged, tokenizer, test, 32, progress=False)
            record = {"recipe": name, "task": args.task, "lr": tune.lr, "train": tune.train, "schedule": tune.schedule,
                      "step": step, "gamma": gamma, "rows": plug.rows, "emulator_ft": emu.accuracy, "plug_in": plug.accuracy,
                      "picks": {"emulator_ft": picks(emu), "plug_in": picks(plug)}}
            with open(args.out, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
        model.train()

    zs = score_mc(base, tokenizer, test, 32, progress=False)
    ezs = score_mc(emulator, tokenizer, test, 32, progress=False)
    print(json.dumps({"task": args.task, "full_zero_shot": zs.accuracy, "picks": picks(zs),
                      "emulator_zero_shot": ezs.accuracy, "emulator_picks": picks(ezs)}), flush=True)
    tune_adapter(emulator, tokenizer, bundle.layout, bundle.adapter_blocks, read_examples(train_path), tune,
                 a=bundle.shape["a"], on_step=checkpoint)


if __name__ == "__main__":
    main()
