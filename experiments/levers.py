"""Measure offsite-tuning levers on the shared BIG-bench tasks (SmolLM2-135M).

For each (recipe, task): tune the adapter on the recipe's emulator, score emulator-FT and the
plug-in on the test file; full zero-shot (and, with --full-ft, full fine-tuning) once per task.
Results are appended as JSON lines, so an interrupted sweep resumes where it stopped.

    python experiments/levers.py --tasks hyperbaton --recipes base,top --test-rows 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from offsite.cloud.models import load_base
from offsite.cloud.plugin import plug_in_update
from offsite.cloud.prepare import EmulatorConfig, prepare_bundle
from offsite.emulator.data import read_examples, read_mc_jsonl
from offsite.emulator.distill import DistillConfig
from offsite.emulator.lora import LoRASpec
from offsite.emulator.sandwich import SandwichShape, num_blocks, with_layout
from offsite.emulator.score import score_mc
from offsite.emulator.tune import TuneConfig, tune_adapter
from offsite.harness.pipeline import task_files
from offsite.protocol.bundle import load_emulator

KD = DistillConfig(steps=200, batch_size=4, seq_len=256, lr=1e-4)
BASE_TUNE = TuneConfig(steps=120, batch_size=16, lr=1e-4)

RECIPES: dict[str, tuple[str, DistillConfig, TuneConfig]] = {
    "drop-2-10-2": ("2-10-2", DistillConfig(steps=0), BASE_TUNE),
    "drop-2-22-2": ("2-22-2", DistillConfig(steps=0), BASE_TUNE),
    "kd-2-10-2": ("2-10-2", KD, BASE_TUNE),
    "kd-2-10-2-top": ("2-10-2", KD, dataclasses.replace(BASE_TUNE, train="top")),
    "kd-2-10-2-lr3e-5": ("2-10-2", KD, dataclasses.replace(BASE_TUNE, lr=3e-5)),
    "kd-2-10-2-lr3e-4": ("2-10-2", KD, dataclasses.replace(BASE_TUNE, lr=3e-4)),
    "kd-2-10-2-prox": ("2-10-2", KD, dataclasses.replace(BASE_TUNE, prox=1.0)),
    "kd-2-10-2-lora": (
        "2-10-2",
        KD,
        dataclasses.replace(BASE_TUNE, mode="lora", lr=1e-3, lora=LoRASpec(rank=8, alpha=16)),
    ),
    "kdlm-2-10-2": ("2-10-2", dataclasses.replace(KD, lm_weight=1.0, kd_weight=1.0), BASE_TUNE),
    "kdblk-2-10-2": ("2-10-2", dataclasses.replace(KD, per_block=True), BASE_TUNE),
    "kd-2-14-2": ("2-14-2", KD, BASE_TUNE),
    "kd-2-14-2-top": ("2-14-2", KD, dataclasses.replace(BASE_TUNE, train="top")),
    "drop-2-18-2-top": ("2-18-2", DistillConfig(steps=0), dataclasses.replace(BASE_TUNE, train="top")),
    "kd-1-10-3-top": ("1-10-3", KD, dataclasses.replace(BASE_TUNE, train="top")),
    "drop-2-22-2-mdrop": ("2-22-2", DistillConfig(steps=0), BASE_TUNE),  # with MIDDLE_DROP
    "kd-2-10-2-mdrop": ("2-10-2", KD, BASE_TUNE),
    "drop-2-26-2-mdrop": ("2-26-2", DistillConfig(steps=0), BASE_TUNE),
    "kl-2-10-2": ("2-10-2", dataclasses.replace(KD, kl_weight=1.0), BASE_TUNE),
    "kl-2-10-2-top": ("2-10-2", dataclasses.replace(KD, kl_weight=1.0), dataclasses.replace(BASE_TUNE, train="top")),
    "kl-2-14-2": ("2-14-2", dataclasses.replace(KD, kl_weight=1.0), BASE_TUNE),
    "kd-2-10-2-top-lr3e-4": ("2-10-2", KD, dataclasses.replace(BASE_TUNE, train="top", lr=3e-4)),
    "kd100-2-22-2": ("2-22-2", dataclasses.replace(KD, steps=100), BASE_TUNE),
    "keep-2-26-2": ("2-26-2", DistillConfig(steps=0), BASE_TUNE),  # nothing dropped (with trajectory.py --quantize)
    # the demo's emulator until session 16 (smollm2-135m/default then): 2-10-2, 60 distillation steps at lr 3e-4
    "default-2-10-2": (
        "2-10-2",
        DistillConfig(steps=60, batch_size=4, seq_len=256, lr=3e-4, warmup_steps=5),
        BASE_TUNE,
    ),
    "drop-2-18-2": ("2-18-2", DistillConfig(steps=0), BASE_TUNE),
    "drop-2-14-2": ("2-14-2", DistillConfig(steps=0), BASE_TUNE),
    "kd-2-18-2": ("2-18-2", KD, BASE_TUNE),
    "kd-2-22-2": ("2-22-2", KD, BASE_TUNE),
}

# stochastic depth over the emulator's middle while tuning (tune_adapter's middle_drop), per recipe
MIDDLE_DROP = {"drop-2-22-2-mdrop": 0.25, "kd-2-10-2-mdrop": 0.25, "drop-2-26-2-mdrop": 0.25}


def picks(result) -> list[int]:
    """How often each choice index was predicted (label bias at a glance)."""
    return [result.predictions.count(i) for i in range(max(result.predictions) + 1)]


def done(out: Path) -> set[tuple[str, str]]:
    if not out.exists():
        return set()
    return {(r["recipe"], r["task"]) for r in map(json.loads, out.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="hyperbaton")
    parser.add_argument("--recipes", default="kd-2-10-2")
    parser.add_argument("--test-rows", type=int, default=None)
    parser.add_argument("--full-ft", action="store_true", help="also tune with the real middle (BASE_TUNE)")
    parser.add_argument("--out", type=Path, default=Path("runs/levers.jsonl"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base, tokenizer, _ = load_base()
    finished = done(args.out)

    def emit(record: dict) -> None:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    for task in args.tasks.split(","):
        train_path, test_path = task_files(task)
        train = read_examples(train_path)
        test = read_mc_jsonl(test_path, limit=args.test_rows)
        if ("zero-shot", task) not in finished:
            r = score_mc(base, tokenizer, test, 32)
            emit({"recipe": "zero-shot", "task": task, "rows": r.rows, "full_zero_shot": r.accuracy, "picks": picks(r)})
        if args.full_ft and ("full-ft", task) not in finished:
            full = with_layout(base, list(range(num_blocks(base))))
            tune_adapter(full, tokenizer, list(range(30)), [0, 1, 28, 29], train, BASE_TUNE, a=2)
            r = score_mc(full, tokenizer, test, 32)
            emit({"recipe": "full-ft", "task": task, "rows": r.rows, "full_ft": r.accuracy})
        for name in args.recipes.split(","):
            if (name, task) in finished:
                continue
            started = time.time()
            shape, distill_config, tune = RECIPES[name]
            bundle = prepare_bundle(
                base, tokenizer, EmulatorConfig(SandwichShape.parse(shape), distill_config), Path("runs/bundles") / name
            )
            emulator = load_emulator(bundle)
            emu_zs = score_mc(emulator, tokenizer, test, 32)
            result = tune_adapter(
                emulator,
                tokenizer,
                bundle.layout,
                bundle.adapter_blocks,
                train,
                tune,
                a=bundle.shape["a"],
                middle_drop=MIDDLE_DROP.get(name, 0.0),
            )
            emu = score_mc(emulator, tokenizer, test, 32)
            alpha = tune.lora.alpha if tune.mode == "lora" else None
            plugged = plug_in_update(base, result.adapter, bundle.adapter_blocks, alpha)
            plug = score_mc(plugged, tokenizer, test, 32)
            emit(
                {
                    "recipe": name,
                    "task": task,
                    "rows": plug.rows,
                    "emulator_zero_shot": emu_zs.accuracy,
                    "emulator_ft": emu.accuracy,
                    "plug_in": plug.accuracy,
                    "picks": {"emulator_zero_shot": picks(emu_zs), "emulator_ft": picks(emu), "plug_in": picks(plug)},
                    "final_loss": sum(result.losses[-10:]) / 10,
                    "heldout_kd": bundle.manifest["distill"].get("heldout_kd_after"),
                    "seconds": round(time.time() - started),
                }
            )


if __name__ == "__main__":
    main()
