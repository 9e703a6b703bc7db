"""The commands that start both roles on one host: ``offsite demo``, ``offsite eval``, ``offsite sweep``
(the last two also as ``offsite cloud eval|sweep``), ``offsite cloud split`` and ``offsite cloud simulate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.cloud.cli import _add_recipe_arguments, _preset_from_args, add_lora_arguments
from offsite.cloud.evaluate import SETTINGS, summary_table
from offsite.cloud.presets import DEFAULT_PRESET, get_preset
from offsite.emulator.options import add_tune_arguments, tune_config_from_args

from .demo import DEMO_CENTRALISED, DEMO_ROUNDS, DEMO_TEST_ROWS, demo_config_from_args, run_fed_demo
from .pipeline import EvalJob, run_eval_job, task_files
from .simulate import register as register_simulate
from .split import register as register_split
from .sweep import SweepJob, parse_emulator, run_sweep


def register(subparsers, commands) -> None:
    """``subparsers``: the top level's; ``commands``: those of ``offsite cloud``."""
    register_split(commands)  # offsite cloud split
    register_simulate(commands)  # offsite cloud simulate
    for parent in (commands, subparsers):  # offsite eval | sweep, and the same under offsite cloud
        _register_eval(parent)
        _register_sweep(parent)
    _register_demo(subparsers)


def _register_eval(parent) -> None:
    evaluate = parent.add_parser(
        "eval",
        help="five-setting evaluation: full/emulator zero-shot, emulator-FT, plug-in, full FT",
        description="Tune the adapter on the emulator, plug it in, and score the five settings of the "
        "Offsite-Tuning paper on a test file: multiple-choice rows by accuracy (acc, with acc_norm beside it), "
        'SFT rows ({"prompt","completion"}) by the completion\'s negative log-likelihood in nats per token '
        "(perplexity beside it). The rows decide which. Writes report.md, report.json and report.png.",
    )
    _add_eval_arguments(evaluate, DEFAULT_PRESET, SETTINGS)
    evaluate.set_defaults(func=_eval)


def _register_sweep(parent) -> None:
    sweep = parent.add_parser(
        "sweep",
        help="the privacy-utility frontier: several emulators on one task, one table and one plot",
        description="For each emulator: emulator zero-shot, emulator-FT and plug-in; full zero-shot and full FT "
        "once per adapter cut. Writes OUT/report/report.{md,json,png} and OUT/report/frontier.png (emulator-FT "
        "against plug-in: points above the diagonal keep a privacy gap). Results are appended to OUT/sweep.jsonl "
        "as they come, so a second run resumes. Emulators: a preset name, or SHAPE[/kdSTEPS][/klWEIGHT][/cka]"
        "[/samples][/qBITSgGROUP][/gainG] on top of --preset's recipe, e.g. 2-10-2/kd60 2-10-2/kd60/kl1 (a KL term "
        "to the full model's logits) 2-10-2/kd60/cka (middle blocks chosen by CKA) 2-10-2/kd60/samples (distilled "
        "on the model's own text) 2-26-2/q2g16 2-26-2/q34g16/gain1.5.",
    )
    sweep.add_argument("emulators", nargs="+", metavar="EMULATOR", help="emulators to compare (see above)")
    _add_task_arguments(sweep)
    sweep.add_argument(
        "--val-rows",
        type=int,
        default=0,
        metavar="N",
        help="score on the train file's last N rows, held out of tuning, instead of the test file "
        "(to choose an emulator without looking at the test file)",
    )
    sweep.add_argument(
        "--preset", default=DEFAULT_PRESET, help=f"recipe the emulators build on (default {DEFAULT_PRESET})"
    )
    sweep.add_argument("--model", default=None, help="base model (default: the preset's)")
    sweep.add_argument(
        "--corpus",
        default=None,
        help="distillation text: 'python-docs' (default), 'model-samples' (the full model's own answers on "
        "everyday topics, sampled once and cached), a .txt or a .jsonl with 'text'",
    )
    sweep.add_argument("--out", type=Path, required=True, help="sweep directory")
    add_tune_arguments(sweep)
    sweep.set_defaults(func=_sweep)


def _register_demo(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="federated offsite-tuning end to end on the embedded SmolLM2-135M, with the settings' table",
        description="Prepare the default emulator; split a task shipped in data/ "
        "(default: wordnet_definitions, one the model has skill on) among data "
        "owners (non-IID); run the federated job over a real SuperLink and SuperNodes on loopback (TLS, node "
        "authentication); plug the federated adapter in; print the table (full and emulator zero-shot, federated "
        "emulator-FT and plug-in). --centralised full-ft also tunes the same blocks with the real middle on the same "
        "data (full FT, the yardstick: the fifth setting and the recovery, about 4 more minutes on 2 cores). "
        "The first run converts the model and "
        "distils (cached for later runs).",
    )
    demo.add_argument("--preset", default=DEFAULT_PRESET, help=f"named recipe (default {DEFAULT_PRESET})")
    demo.add_argument(
        "--task",
        default="wordnet_definitions",
        help="a task shipped in data/skill or data/bigbench (default wordnet_definitions)",
    )
    demo.add_argument("--owners", type=int, default=3, help="data owners, one SuperNode each (default 3)")
    demo.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration of the label split; small is more skewed (default 0.5)",
    )
    demo.add_argument(
        "--rounds",
        type=int,
        default=DEMO_ROUNDS,
        help=f"federated rounds (default {DEMO_ROUNDS}); local steps follow from the preset's budget",
    )
    demo.add_argument(
        "--test-rows",
        type=int,
        default=DEMO_TEST_ROWS,
        help=f"score the first N test rows (default {DEMO_TEST_ROWS}; 0: all)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the split and of the tuning")
    demo.add_argument(
        "--centralised",
        choices=("full-ft", "all", "none"),
        default=DEMO_CENTRALISED,
        help="what runs centrally on all the training data: full-ft (the five-setting table's full FT and the "
        "recovery), all (also centralised emulator-FT and plug-in, to compare with the federated ones), "
        f"none (default {DEMO_CENTRALISED})",
    )
    demo.add_argument(
        "--lr",
        type=float,
        default=None,
        help="the owners' learning rate (default: the preset's; LoRA usually wants about 10x that, e.g. 1e-3)",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    add_lora_arguments(demo.add_argument_group("LoRA (--mode lora: the owners tune and send LoRA factors)"))
    demo.set_defaults(func=_demo)


def _add_task_arguments(parser) -> None:
    parser.add_argument(
        "--task",
        default="wordnet_definitions",
        help="a task shipped in data/skill or data/bigbench (used when --train/--test are not given; "
        "default wordnet_definitions)",
    )
    parser.add_argument("--train", type=Path, default=None, help="training JSONL (MC or SFT rows)")
    parser.add_argument(
        "--test", type=Path, default=None, help="test JSONL: MC rows (accuracy) or SFT rows (completion NLL)"
    )
    parser.add_argument("--test-rows", type=int, default=None, help="score the first N test rows (default: all)")


def _task_files_from_args(args) -> tuple[Path, Path, str]:
    """(train, test, task name) from --task or --train/--test."""

    train, test = task_files(args.task) if args.train is None or args.test is None else (args.train, args.test)
    train, test = args.train or train, args.test or test
    return train, test, args.task if args.test is None else test.stem


def _add_eval_arguments(parser, default_preset: str, settings) -> None:
    _add_recipe_arguments(parser, default_preset)
    _add_task_arguments(parser)
    parser.add_argument(
        "--settings", default=",".join(settings), help="comma-separated subset of: " + ", ".join(settings)
    )
    parser.add_argument("--out", type=Path, required=True, help="job directory")
    add_tune_arguments(parser)


def _sweep(args: argparse.Namespace) -> int:

    base = get_preset(args.preset)
    emulators = tuple(parse_emulator(text, base) for text in args.emulators)  # refused before the model loads
    if len({e.name for e in emulators}) != len(emulators):
        raise ValueError("an emulator is named twice")
    if args.val_rows < 0:
        raise ValueError("--val-rows must be >= 0")
    train, test, task = _task_files_from_args(args)
    job = SweepJob(
        emulators=emulators,
        train=train,
        test=test,
        out=args.out,
        task=task,
        tune=tune_config_from_args(args, base.tune),
        test_rows=args.test_rows,
        val_rows=args.val_rows,
        model=args.model,
        corpus=args.corpus or "python-docs",
    )
    reports = run_sweep(job)
    print(summary_table(reports))
    print(
        f"report: {args.out / 'report' / 'report.md'} (+ .json, .png); frontier: {args.out / 'report' / 'frontier.png'}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:

    preset = _preset_from_args(args)
    train, test, task = _task_files_from_args(args)
    settings = tuple(s.strip() for s in args.settings.split(",") if s.strip())
    job = EvalJob(
        preset=preset,
        train=train,
        test=test,
        out=args.out,
        task=task,
        tune=tune_config_from_args(args, preset.tune),
        test_rows=args.test_rows,
        settings=settings,
        model=args.model,
        corpus=args.corpus or "python-docs",
    )
    report = run_eval_job(job)
    print()
    print(report.markdown())
    plugged = f"; plug-in model: {args.out / 'plug_in'}" if (args.out / "plug_in").is_dir() else ""
    print(f"report: {args.out / 'report' / 'report.md'} (+ .json, .png){plugged}")
    return 0


def _demo(args: argparse.Namespace) -> int:

    if args.owners < 1 or args.rounds < 1 or args.alpha <= 0 or args.test_rows < 0:
        raise ValueError("--owners and --rounds must be >= 1, --alpha > 0 and --test-rows >= 0")
    args.test_rows = args.test_rows or None
    run_fed_demo(demo_config_from_args(args, get_preset(args.preset)))
    return 0
