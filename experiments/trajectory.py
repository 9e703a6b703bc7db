"""Does tuning on the emulator move the real model, and when? Score emulator-FT and the plug-in
at checkpoints along one tuning run (same optimiser state throughout), with each setting's
label picks, so transfer can be seen rising, peaking or turning.

    python experiments/trajectory.py --recipe kd-2-10-2 --task hyperbaton --at 10,30,60,120

Three probes of how the update is carried over:
  --gammas 1,2   plug in the real adapter + gamma * (tuned - shipped shell): does the real model
                 move the same way as the emulator, only less?
  --shell-steps  before tuning, fit the emulator's middle and top blocks to the full model's
                 middle output and logits (KD + KL on --shell-corpus); the plug-in then carries
                 the delta from that shell, so what the shell learned to make up for is not sent.
  --realign-every N   every N tuning steps, distil the emulator's middle again (KD + KL on
                 --realign-corpus) against the full model with the current adapter plugged into
                 both, as FedBiOT does between rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from levers import RECIPES, picks  # experiments/ is on sys.path when this script runs

from offsite.cloud.models import load_base
from offsite.cloud.prepare import EmulatorConfig, prepare_bundle
from offsite.emulator.corpus import read_corpus, token_blocks
from offsite.emulator.data import read_examples, read_mc_jsonl
from offsite.emulator.distill import DistillConfig, distill, heldout_kd
from offsite.emulator.quantize import Quantize, RoundingNoise, quantize_blocks
from offsite.emulator.sandwich import SandwichShape, adapter_state_dict, num_blocks, plug_in
from offsite.emulator.score import score_mc
from offsite.emulator.tune import trainable_parameters, tune_adapter
from offsite.harness.pipeline import task_files
from offsite.protocol.bundle import load_emulator


def fit_shell(base, emulator, bundle, text: str, tokenizer, steps: int, lr: float = 1e-4) -> None:
    """Train the emulator's kept middle and top adapter blocks in place so that it matches the full
    model's middle output (normalised MSE) and next-token distribution (KL, every position)."""
    train_blocks, heldout_blocks = token_blocks(tokenizer, text, 256)
    config = DistillConfig(steps=steps, lr=lr, kd_weight=1.0, kl_weight=1.0, logit_positions=0, seed=1)
    distill(
        base,
        emulator,
        bundle.layout,
        bundle.shape["a"],
        bundle.shape["b"],
        train_blocks,
        heldout_blocks[:8],
        config,
        progress=False,
        train_top=True,
    )


def choice_margins(result, rows) -> list[float] | None:
    """Each row's score margin, first choice minus second; None unless every row has two choices."""
    if any(len(row.choices) != 2 for row in rows):
        return None
    return [score[0] - score[1] for score in result.scores]


def margin_auc(result, rows) -> float | None:
    """Two-choice tasks only: the chance that a row whose answer is the first choice gets a larger
    score margin (first minus second) than a row whose answer is the second. It ignores where the
    decision threshold sits, so it tells skill from a label bias that swings between runs."""
    margins = choice_margins(result, rows)
    if margins is None:
        return None
    first = [m for m, row in zip(margins, rows) if row.answer == 0]
    second = [m for m, row in zip(margins, rows) if row.answer == 1]
    if not first or not second:
        return None
    wins = sum((x > y) + 0.5 * (x == y) for x in first for y in second)
    return wins / (len(first) * len(second))


def batch_calibrated(result, rows) -> float | None:
    """Two-choice tasks only: accuracy when the decision threshold on the margin is its mean over
    the scored rows instead of 0 (batch calibration: it uses the prompts, never the labels)."""
    margins = choice_margins(result, rows)
    if margins is None:
        return None
    mean = sum(margins) / len(margins)
    return sum((m > mean) == (row.answer == 0) for m, row in zip(margins, rows)) / len(rows)


def heldout_ce(model, blocks) -> float:
    """Mean next-token cross-entropy (nats) over held-out token blocks: what the model is worth
    as a language model on its own (the privacy side: an emulator should be clearly worse)."""
    import torch

    with torch.no_grad():
        return sum(
            model(input_ids=block[None], labels=block[None], use_cache=False).loss.item() for block in blocks
        ) / len(blocks)


def realign(base, emulator, bundle, adapter: dict, train_blocks, heldout_blocks, steps: int, lr: float) -> None:
    """FedBiOT-style re-alignment: distil the emulator's middle (KD + KL) against the full model
    with the *current* adapter in both, so the emulator tracks how the real middle responds to the
    adapter as it moves. Only the kept middle blocks change; the adapter is left as it is."""
    teacher = plug_in(base, adapter)
    config = DistillConfig(steps=steps, lr=lr, warmup_steps=1, kd_weight=1.0, kl_weight=1.0, seed=len(adapter) + steps)
    result = distill(
        teacher,
        emulator,
        bundle.layout,
        bundle.shape["a"],
        bundle.shape["b"],
        train_blocks,
        heldout_blocks,
        config,
        progress=False,
    )
    logging.info("re-aligned: held-out KD %.3f -> %.3f", result.heldout_before, result.heldout_after)


def linear_answer_loss(model, batch):
    """Minus the answer tokens' logits, each over its vocabulary's mean: d loss / d logits is
    ``1/V - onehot`` whatever the model predicts, where cross-entropy's is ``p - onehot``."""
    from offsite.emulator.score import answer_logits

    logits, targets, _ = answer_logits(model, batch)
    logits = logits.float()
    return -(logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.mean(-1)).mean()


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
    parser.add_argument("--seed", type=int, default=0, help="tuning seed (batch order, LoRA init)")
    parser.add_argument(
        "--val-rows",
        type=int,
        default=0,
        help="score on the last N rows of the train file (held out of tuning) instead of the test file",
    )
    parser.add_argument(
        "--fidelity-only", action="store_true", help="print zero-shot and held-out figures, do not tune"
    )
    parser.add_argument(
        "--quantize",
        default="",
        help="round the emulator's middle weights to this many bits; "
        "a comma list is cycled over the middle blocks (3,4: alternate 3 and 4 bits)",
    )
    parser.add_argument(
        "--quant-group", type=int, default=64, help="input columns per quantisation group (scale and offset)"
    )
    parser.add_argument(
        "--quant-noise",
        type=float,
        default=0.0,
        help="tune through a fresh draw of the rounded "
        "middle each step: every weight uniform in this fraction of its rounding cell (1 = the whole cell)",
    )
    parser.add_argument(
        "--realign-every",
        type=int,
        default=0,
        help="re-align the emulator to the full model "
        "with the current adapter every N tuning steps (FedBiOT-style; 0: never)",
    )
    parser.add_argument("--realign-steps", type=int, default=20)
    parser.add_argument("--realign-lr", type=float, default=1e-4)
    parser.add_argument("--realign-corpus", default="python-docs", help="public text for the re-alignment")
    parser.add_argument(
        "--loss",
        choices=("ce", "linear"),
        default="ce",
        help="ce: cross-entropy on the answer tokens (the method's); linear: minus the answer "
        "token's logit over the vocabulary's mean logit, a gradient that does not depend on what "
        "the model already predicts (does the emulator's own prior ride along in the CE update?)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/trajectory.jsonl"))
    args = parser.parse_args()
    if args.quant_noise and not args.quantize:
        parser.error("--quant-noise needs --quantize")  # before minutes of loading, not after
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    at = sorted(int(x) for x in args.at.split(","))
    shape, distill_config, tune = RECIPES[args.recipe]
    changes = {"steps": at[-1], "schedule": args.schedule, "seed": args.seed}
    if args.lr:
        changes["lr"] = args.lr
    if args.train:
        changes["train"] = args.train
    tune = dataclasses.replace(tune, **changes)
    if args.loss == "linear":
        import offsite.emulator.tune as tuning

        tuning.answer_loss = linear_answer_loss  # this process only: the tuning loop's objective
    base, tokenizer, _ = load_base()
    emulator_config = EmulatorConfig(SandwichShape.parse(shape), distill_config)
    name = args.recipe
    if args.corpus:
        emulator_config = dataclasses.replace(emulator_config, corpus=args.corpus)
        name += "-" + Path(args.corpus).stem
    bundle = prepare_bundle(base, tokenizer, emulator_config, Path("runs/bundles") / name)
    emulator = load_emulator(bundle)
    train_path, test_path = task_files(args.task)
    examples = read_examples(train_path)
    if args.val_rows:  # score on the train file's last rows, which tuning never sees (to choose settings)
        examples = examples[: -args.val_rows]
        test = read_mc_jsonl(train_path)[-args.val_rows :]
        name += f"-val{args.val_rows}"
    else:
        test = read_mc_jsonl(test_path, limit=args.test_rows)
    if args.quantize:
        spec = Quantize.parse(args.quantize, args.quant_group)
        middle = list(range(bundle.shape["a"], len(bundle.layout) - bundle.shape["b"]))
        quantize_blocks(emulator, middle, spec)
        name += "-" + str(spec).removesuffix("g64")  # run names from before --quant-group leave out the default
    noise = None
    if args.quant_noise:
        noise = RoundingNoise(emulator, middle, spec, args.quant_noise, seed=args.seed)
        name += f"-noise{args.quant_noise:g}"
    if args.shell_steps:
        fit_shell(base, emulator, bundle, read_corpus(args.shell_corpus), tokenizer, args.shell_steps)
        name += f"-shell{args.shell_steps}-" + Path(args.shell_corpus).stem
    real = adapter_state_dict(base, list(range(num_blocks(base))), bundle.adapter_blocks)
    shell = adapter_state_dict(emulator, bundle.layout, bundle.adapter_blocks)
    gammas = [float(g) for g in args.gammas.split(",")]
    if args.realign_every:
        name += f"-realign{args.realign_every}x{args.realign_steps}-" + Path(args.realign_corpus).stem
        realign_train, realign_heldout = token_blocks(tokenizer, read_corpus(args.realign_corpus), 256)
        realign_heldout = realign_heldout[:8]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    trained = tune.blocks_to_train(bundle.adapter_blocks, bundle.shape["a"])

    def checkpoint(step, model) -> None:
        if step in at:
            if noise is not None:
                noise.restore()  # scored on the emulator as shipped
            score(step, model)
        if noise is not None and step < at[-1]:
            noise.sample()  # the next step's draw
        if args.realign_every and step % args.realign_every == 0 and step < at[-1]:
            realign(
                base,
                model,
                bundle,
                adapter_state_dict(model, bundle.layout, bundle.adapter_blocks),
                realign_train,
                realign_heldout,
                args.realign_steps,
                args.realign_lr,
            )
            trainable_parameters(model, bundle.layout, trained, tune.mode)  # distill() froze everything
            model.train()

    def score(step, model) -> None:
        model.eval()
        state = adapter_state_dict(model, bundle.layout, bundle.adapter_blocks)
        emu = score_mc(model, tokenizer, test, 32, progress=False)
        for gamma in gammas:
            plugged = plug_in(base, {key: real[key] + gamma * (state[key] - shell[key]) for key in real})
            plug = score_mc(plugged, tokenizer, test, 32, progress=False)
            record = {
                "recipe": name,
                "task": args.task,
                "lr": tune.lr,
                "seed": tune.seed,
                "train": tune.train,
                "schedule": tune.schedule,
                "loss": args.loss,
                "step": step,
                "gamma": gamma,
                "rows": plug.rows,
                "emulator_ft": emu.accuracy,
                "plug_in": plug.accuracy,
                "picks": {"emulator_ft": picks(emu), "plug_in": picks(plug)},
                "auc": {"emulator_ft": margin_auc(emu, test), "plug_in": margin_auc(plug, test)},
                "calibrated": {"emulator_ft": batch_calibrated(emu, test), "plug_in": batch_calibrated(plug, test)},
            }
            with open(args.out, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
        model.train()

    zs = score_mc(base, tokenizer, test, 32, progress=False)
    ezs = score_mc(emulator, tokenizer, test, 32, progress=False)
    _, probe_blocks = token_blocks(tokenizer, read_corpus(), 256)
    fidelity = heldout_kd(base, emulator, probe_blocks[:8], bundle.layout, bundle.shape["a"], bundle.shape["b"])
    header = {
        "task": args.task,
        "emulator": name,
        "rows": zs.rows,
        "full_zero_shot": zs.accuracy,
        "picks": picks(zs),
        "emulator_zero_shot": ezs.accuracy,
        "emulator_picks": picks(ezs),
        "auc": {"full": margin_auc(zs, test), "emulator": margin_auc(ezs, test)},
        "calibrated": {"full": batch_calibrated(zs, test), "emulator": batch_calibrated(ezs, test)},
        "heldout_kd": fidelity,
        "heldout_ce": {"full": heldout_ce(base, probe_blocks[:8]), "emulator": heldout_ce(emulator, probe_blocks[:8])},
    }
    with open(args.out, "a") as handle:  # the emulator's fidelity, before any tuning (experiments/knob.py reads it)
        handle.write(json.dumps(header) + "\n")
    print(json.dumps(header), flush=True)
    if args.fidelity_only:
        return
    if noise is not None:
        noise.sample()
    tune_adapter(
        emulator,
        tokenizer,
        bundle.layout,
        bundle.adapter_blocks,
        examples,
        tune,
        a=bundle.shape["a"],
        on_step=checkpoint,
    )


if __name__ == "__main__":
    main()
