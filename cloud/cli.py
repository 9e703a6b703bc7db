"""``offsite cloud ...`` and ``offsite eval``: the operator's commands."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from offsite.options import add_tune_arguments, tune_config_from_args

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from .evaluate import SETTINGS
    from .presets import DEFAULT_PRESET

    cloud = subparsers.add_parser("cloud", help="operator: prepare emulator bundles, evaluate, plug in")
    commands = cloud.add_subparsers(dest="cloud_command", required=True, metavar="COMMAND")

    prepare = commands.add_parser(
        "prepare",
        help="build a federated job: its emulator bundle (layer drop + distillation) and job.json",
        description="Split the base model, build and distil the emulator, write the bundle a data owner receives "
        "(OUT/bundle) and the federated job's settings (OUT/job.json), ready for `offsite cloud run --job OUT`. "
        "Distilled bundles are cached: the same recipe twice costs seconds.",
    )
    _add_recipe_arguments(prepare, DEFAULT_PRESET)
    prepare.add_argument("--out", required=True, type=Path, help="job directory: OUT/job.json (the federated job) and OUT/bundle")
    _add_fed_job_arguments(prepare)
    prepare.set_defaults(func=_prepare)

    plugin = commands.add_parser(
        "plugin",
        help="plug a tuned adapter into the full model and save a Hugging Face model directory",
    )
    plugin.add_argument("--model", default=None, help="base model (default: the preset's)")
    plugin.add_argument("--preset", default=DEFAULT_PRESET, help="preset naming the base model")
    plugin.add_argument("--bundle", required=True, type=Path, help="the bundle the adapter was tuned on")
    plugin.add_argument("--adapter", required=True, type=Path, help="adapter update (.safetensors)")
    plugin.add_argument("--out", required=True, type=Path, help="output model directory")
    plugin.set_defaults(func=_plugin)

    run = commands.add_parser(
        "run",
        help="run a federated job on a SuperLink (flwr run) and follow its rounds",
        description="Submit the job directory's federated job (job.json + bundle/) to a running SuperLink and print "
        "the ServerApp's log (one block per round) until the run finishes. The job directory must be at the same "
        "path on the SuperLink's host.",
    )
    run.add_argument("--job", required=True, type=Path, help="job directory with job.json and bundle/")
    run.add_argument("--superlink", required=True, help="the SuperLink's address, HOST:PORT")
    run.add_argument("--root-certificates", type=Path, help="CA certificate that signed the SuperLink's TLS certificate")
    run.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS: loopback tests only")
    run.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="give up following after this many seconds")
    run.set_defaults(func=_run)

    for parent, name in ((commands, "eval"), (subparsers, "eval")):
        evaluate = parent.add_parser(
            name,
            help="five-setting evaluation: full/emulator zero-shot, emulator-FT, plug-in, full FT",
            description="Tune the adapter on the emulator, plug it in, and score the five settings of the "
            "Offsite-Tuning paper on a multiple-choice test file. Writes report.md, report.json and report.png.",
        )
        _add_eval_arguments(evaluate, DEFAULT_PRESET, SETTINGS)
        evaluate.set_defaults(func=_eval)

    demo = subparsers.add_parser(
        "demo",
        help="the whole pipeline on the embedded SmolLM2-135M: prepare, tune, plug in, evaluate",
        description="Prepare and distil the default emulator, tune on a BIG-bench task shipped in data/, plug in and "
        "print the five-setting table. The first run converts the model and distils (cached for later runs).",
    )
    _add_eval_arguments(demo, DEFAULT_PRESET, SETTINGS, demo=True)
    demo.set_defaults(func=_eval)


def _add_recipe_arguments(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset, help=f"named recipe (`offsite presets`; default {default_preset})")
    parser.add_argument("--model", default=None, help="base model: smollm2-135m, a local HF directory, a .gguf file or a hub id")
    parser.add_argument("--shape", default=None, help="a-k-b: adapter blocks at the bottom, kept middle blocks, adapter blocks at the top")
    parser.add_argument("--distill-steps", type=int, default=None, help="distillation steps (0: plain layer drop)")
    parser.add_argument("--corpus", default=None, help="distillation text: 'python-docs' (default), a .txt or a .jsonl with 'text'")


def _add_fed_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The federated job's settings (job.json); defaults are :class:`FedJobConfig`'s and :class:`LocalTuning`'s."""
    from .aggregate import AGGREGATORS
    from .fed_job import FedJobConfig, LocalTuning

    job, tuning = FedJobConfig(), LocalTuning()
    group = parser.add_argument_group("federated job (written to OUT/job.json for `offsite cloud run`)")
    group.add_argument("--rounds", type=int, default=job.rounds, help=f"federated rounds (default {job.rounds})")
    group.add_argument("--min-nodes", type=int, default=job.min_nodes, help=f"connected SuperNodes to wait for before each round (default {job.min_nodes})")
    group.add_argument("--min-replies", type=int, default=job.min_replies, help=f"successful replies needed to complete a round (default {job.min_replies})")
    group.add_argument("--round-timeout", type=float, default=job.round_timeout, help=f"seconds to wait for the train replies of a round (default {job.round_timeout:g})")
    group.add_argument("--local-steps", type=int, default=tuning.steps, help=f"optimiser steps per data owner per round (default {tuning.steps})")
    group.add_argument("--local-lr", type=float, default=tuning.lr, help=f"data owners' learning rate (default {tuning.lr:g})")
    group.add_argument("--local-batch-size", type=int, default=tuning.batch_size, help=f"examples per local step (default {tuning.batch_size})")
    group.add_argument("--aggregator", choices=AGGREGATORS, default=job.aggregator, help=f"how updates are combined (default {job.aggregator})")


def fed_job_config_from_args(args: argparse.Namespace):
    """The :class:`FedJobConfig` that ``cloud prepare``'s federated-job options describe (validated)."""
    from .fed_job import FedJobConfig, LocalTuning

    if args.local_steps < 1 or args.local_batch_size < 1 or args.local_lr <= 0:
        raise ValueError(
            f"--local-steps and --local-batch-size must be >= 1 and --local-lr > 0 "
            f"(got {args.local_steps}, {args.local_batch_size}, {args.local_lr})"
        )
    tuning = dataclasses.replace(LocalTuning(), steps=args.local_steps, lr=args.local_lr, batch_size=args.local_batch_size)
    return FedJobConfig(
        rounds=args.rounds,
        min_nodes=args.min_nodes,
        min_replies=args.min_replies,
        round_timeout=args.round_timeout,
        aggregator=args.aggregator,
        tuning=tuning,
    )


def _add_eval_arguments(parser, default_preset: str, settings, demo: bool = False) -> None:
    _add_recipe_arguments(parser, default_preset)
    parser.add_argument("--task", default="hyperbaton", help="a task in data/bigbench (used when --train/--test are not given)")
    parser.add_argument("--train", type=Path, default=None, help="training JSONL")
    parser.add_argument("--test", type=Path, default=None, help="multiple-choice test JSONL")
    parser.add_argument(
        "--test-rows", type=int, default=200 if demo else None, help="score the first N test rows (default: " + ("200" if demo else "all") + ")"
    )
    parser.add_argument("--settings", default=",".join(settings), help="comma-separated subset of: " + ", ".join(settings))
    parser.add_argument("--out", type=Path, default=Path("runs/demo") if demo else None, required=not demo, help="job directory")
    add_tune_arguments(parser)


def _preset_from_args(args):
    from offsite.emulator.sandwich import SandwichShape

    from .presets import get_preset

    preset = get_preset(args.preset)
    distill = preset.distill
    if args.distill_steps is not None:
        distill = dataclasses.replace(distill, steps=args.distill_steps)
    shape = SandwichShape.parse(args.shape) if args.shape else preset.shape
    return dataclasses.replace(preset, shape=shape, distill=distill)


def _prepare(args: argparse.Namespace) -> int:
    from .fed_job import BUNDLE_DIR, write_job
    from .models import load_base
    from .prepare import EmulatorConfig, prepare_bundle

    job = fed_job_config_from_args(args)  # a contradiction fails here, before any distillation
    preset = _preset_from_args(args)
    base, tokenizer, where = load_base(args.model or preset.base)
    config = EmulatorConfig(preset.shape, preset.distill, corpus=args.corpus or "python-docs")
    bundle = prepare_bundle(base, tokenizer, config, args.out / BUNDLE_DIR)
    job_file = write_job(args.out, job)
    distilled = bundle.manifest.get("distill", {})
    print(f"bundle: {bundle.root}  (shape {preset.shape}, layout {bundle.layout})")
    print(
        f"job: {job_file}  ({job.rounds} round(s), min_nodes {job.min_nodes}, min_replies {job.min_replies}, "
        f"round timeout {job.round_timeout:g}s, {job.aggregator}, local {job.tuning.steps} step(s) x {job.tuning.batch_size} "
        f"at lr {job.tuning.lr:g}); run it with: offsite cloud run --job {args.out} --superlink HOST:PORT"
    )
    if "heldout_reduction" in distilled:
        print(
            f"distillation: held-out KD {distilled['heldout_kd_before']:.3f} -> {distilled['heldout_kd_after']:.3f} "
            f"({100 * distilled['heldout_reduction']:.0f}% lower)"
        )
    return 0


def _plugin(args: argparse.Namespace) -> int:
    from offsite.protocol.adapter import load_update
    from offsite.protocol.bundle import read_bundle

    from .models import load_base
    from .plugin import plug_in_update, save_plugged
    from .presets import get_preset

    bundle = read_bundle(args.bundle)
    update, meta = load_update(args.adapter)
    base, tokenizer, _ = load_base(args.model or get_preset(args.preset).base)
    plugged = plug_in_update(base, update, bundle.adapter_blocks, meta.get("lora_alpha") if meta["mode"] == "lora" else None)
    out = save_plugged(plugged, tokenizer, args.out, {"bundle": bundle.digest, "adapter": str(args.adapter)})
    print(f"plugged-in model written to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .pipeline import EvalJob, run_eval_job, task_files

    preset = _preset_from_args(args)
    train, test = task_files(args.task) if args.train is None or args.test is None else (args.train, args.test)
    train, test = args.train or train, args.test or test
    settings = tuple(s.strip() for s in args.settings.split(",") if s.strip())
    job = EvalJob(
        preset=preset,
        train=train,
        test=test,
        out=args.out,
        task=args.task if args.test is None else test.stem,
        tune=tune_config_from_args(args, preset.tune),
        test_rows=args.test_rows,
        settings=settings,
        model=args.model,
        corpus=args.corpus or "python-docs",
    )
    report = run_eval_job(job)
    print()
    print(report.markdown())
    print(f"report: {args.out / 'report' / 'report.md'} (+ .json, .png); plug-in model: {args.out / 'plug_in'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import re

    from .federation import FederationError, SuperLinkConnection, round_summary, run_job_on_superlink

    colour = re.compile(r"\x1b\[[0-9;]*m")
    try:
        connection = SuperLinkConnection(args.superlink, root_certificates=args.root_certificates, insecure=args.insecure)
        run_id, status = run_job_on_superlink(
            args.job, connection, on_line=lambda line: print(colour.sub("", line), flush=True), timeout=args.timeout
        )
    except FederationError as error:
        print(f"offsite: error: {error}", file=sys.stderr)
        return 2
    print(f"run {run_id}: {status}")
    for line in round_summary(args.job):
        print(line)
    return 0 if status == "finished:completed" else 1
