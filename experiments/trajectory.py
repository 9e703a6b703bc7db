"""Does tuning on the emulator move the real model, and when? Score emulator-FT and the plug-in
at checkpoints along one tuning run (same optimiser state throughout), with each setting's
label picks, so transfer can be seen rising, peaking or turning.

    python experiments/trajectory.py --recipe kd-2-10-2 --task hyperbaton --at 10,30,60,120
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from offsite.cloud.models import load_base
from offsite.cloud.pipeline import task_files
from offsite.cloud.plugin import plug_in_update
from offsite.cloud.prepare import EmulatorConfig, prepare_bundle
from offsite.emulator.data import read_examples, read_mc_jsonl
from offsite.emulator.sandwich import SandwichShape, adapter_state_dict
from offsite.emulator.score import score_mc
from offsite.emulator.tune import tune_adapter
from offsite.protocol.bundle import load_emulator

from levers import RECIPES, picks  # experiments/ is on sys.path when this script runs


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

    def checkpoint(step, model) -> None:
        if step not in at:
            return
        model.eval()
        state = adapter_state_dict(model, bundle.layout, bundle.adapter_blocks)
        emu = score_mc(model, tokenizer, test, 32, progress=False)
        plug = score_mc(plug_in_update(base, state, bundle.adapter_blocks), tokenizer, test, 32, progress=False)
        model.train()
        record = {"recipe": name, "task": args.task, "lr": tune.lr, "train": tune.train, "schedule": tune.schedule,
                  "step": step, "rows": plug.rows, "emulator_ft": emu.accuracy, "plug_in": plug.accuracy,
                  "picks": {"emulator_ft": picks(emu), "plug_in": picks(plug)}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    zs = score_mc(base, tokenizer, test, 32, progress=False)
    ezs = score_mc(emulator, tokenizer, test, 32, progress=False)
    print(json.dumps({"task": args.task, "full_zero_shot": zs.accuracy, "picks": picks(zs),
                      "emulator_zero_shot": ezs.accuracy, "emulator_picks": picks(ezs)}), flush=True)
    tune_adapter(emulator, tokenizer, bundle.layout, bundle.adapter_blocks, read_examples(train_path), tune,
                 a=bundle.shape["a"], on_step=checkpoint)


if __name__ == "__main__":
    main()
