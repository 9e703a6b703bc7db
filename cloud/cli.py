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
    plugin.add_argument("--gain", type=float, default=None, metavar="G",
                        help="plug in the full model's adapter blocks + G x what tuning changed "
                        "(default: the adapter file's recorded plugin_gain, else the federated job's when the "
                        "adapter is JOB/checkpoints/round-N.safetensors, else the preset's)")
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

    from .simulate import register as register_simulate
    from .split import register as register_split

    register_split(commands)  # offsite cloud split
    register_simulate(commands)  # offsite cloud simulate

    from .keys_cli import register_key_commands

    register_key_commands(commands)  # offsite cloud keys | enroll | revoke | senders | sign-bundle

    finish = commands.add_parser(
        "finish",
        help="plug a finished job's last global adapter into the full model (and evaluate it)",
        description="What the ServerApp does after the last round when job.json names a base model: write "
        "JOB/plug_in (a Hugging Face model directory) and, with an eval test file, JOB/report. Skipped when "
        "already done from the same checkpoint unless --force.",
    )
    finish.add_argument("--job", required=True, type=Path, help="job directory with all rounds completed")
    finish.add_argument("--force", action="store_true", help="redo the plug-in and the evaluation")
    finish.set_defaults(func=_finish)

    for parent, name in ((commands, "eval"), (subparsers, "eval")):
        evaluate = parent.add_parser(
            name,
            help="five-setting evaluation: full/emulator zero-shot, emulator-FT, plug-in, full FT",
            description="Tune the adapter on the emulator, plug it in, and score the five settings of the "
            "Offsite-Tuning paper on a test file: multiple-choice rows by accuracy (acc, with acc_norm beside it), "
            "SFT rows ({\"prompt\",\"completion\"}) by the completion's negative log-likelihood in nats per token "
            "(perplexity beside it). The rows decide which. Writes report.md, report.json and report.png.",
        )
        _add_eval_arguments(evaluate, DEFAULT_PRESET, SETTINGS)
        evaluate.set_defaults(func=_eval)

    for parent, name in ((commands, "sweep"), (subparsers, "sweep")):
        sweep = parent.add_parser(
            name,
            help="the privacy-utility frontier: several emulators on one task, one table and one plot",
            description="For each emulator: emulator zero-shot, emulator-FT and plug-in; full zero-shot and full FT "
            "once per adapter cut. Writes OUT/report/report.{md,json,png} and OUT/report/frontier.png (emulator-FT "
            "against plug-in: points above the diagonal keep a privacy gap). Results are appended to OUT/sweep.jsonl "
            "as they come, so a second run resumes. Emulators: a preset name, or SHAPE[/kdSTEPS][/qBITSgGROUP][/gainG] "
            "on top of --preset's recipe, e.g. 2-10-2/kd60 2-22-2/kd0 2-26-2/q2g16 2-26-2/q34g16/gain1.5.",
        )
        sweep.add_argument("emulators", nargs="+", metavar="EMULATOR", help="emulators to compare (see above)")
        _add_task_arguments(sweep)
        sweep.add_argument("--val-rows", type=int, default=0, metavar="N",
                           help="score on the train file's last N rows, held out of tuning, instead of the test file "
                           "(to choose an emulator without looking at the test file)")
        sweep.add_argument("--preset", default=DEFAULT_PRESET, help=f"recipe the emulators build on (default {DEFAULT_PRESET})")
        sweep.add_argument("--model", default=None, help="base model (default: the preset's)")
        sweep.add_argument("--corpus", default=None, help="distillation text: 'python-docs' (default), a .txt or a .jsonl with 'text'")
        sweep.add_argument("--out", type=Path, required=True, help="sweep directory")
        add_tune_arguments(sweep)
        sweep.set_defaults(func=_sweep)

    for parent, name in ((commands, "report"), (subparsers, "report")):
        combined = parent.add_parser(
            name,
            help="one table from several evaluation runs (pieces of one table, or one run per task)",
            description="Read the report.json of each run (an `offsite eval` job directory, a federated job's, or "
            "the file itself), join the runs that measured the same task with the same recipe and test file "
            "(e.g. `--settings` run in two jobs), and write report.md (a summary row per task, then each "
            "task's table), report.json and report.png. Runs that disagree on the recipe, the test file or a "
            "setting's result are refused, naming both.",
        )
        combined.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="job directory or report.json")
        combined.add_argument("--out", type=Path, required=True, help="where to write report.{md,json,png}")
        combined.add_argument("--title", default="Offsite five-setting evaluation", help="heading of the report and chart")
        combined.set_defaults(func=_report)

    demo = subparsers.add_parser(
        "demo",
        help="federated offsite-tuning end to end on the embedded SmolLM2-135M, with the five-setting table",
        description="Prepare and distil the default emulator; split a BIG-bench task shipped in data/ among data "
        "owners (non-IID); run the federated job over a real SuperLink and SuperNodes on loopback (TLS, node "
        "authentication); plug the federated adapter in; tune the same blocks with the real middle on the same data "
        "(full FT; --centralised all adds centralised emulator-FT and plug-in); print the five-setting table. The first run converts the model and "
        "distils (cached for later runs).",
    )
    demo.add_argument("--preset", default=DEFAULT_PRESET, help=f"named recipe (default {DEFAULT_PRESET})")
    demo.add_argument("--task", default="hyperbaton", help="a task shipped in data/skill or data/bigbench (default hyperbaton)")
    demo.add_argument("--owners", type=int, default=3, help="data owners, one SuperNode each (default 3)")
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split; small is more skewed (default 0.5)")
    demo.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3); local steps follow from the preset's budget")
    demo.add_argument("--test-rows", type=int, default=200, help="score the first N test rows (default 200; 0: all)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split and of the tuning")
    demo.add_argument(
        "--centralised", choices=("full-ft", "all", "none"), default="full-ft",
        help="what runs centrally on all the training data: full-ft (default: the five-setting table's full FT), "
        "all (also centralised emulator-FT and plug-in, to compare with the federated ones), none",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    demo.set_defaults(func=_demo)

    from .serve_cli import register as register_serve

    register_serve(commands)  # offsite cloud serve


def _add_recipe_arguments(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset, help=f"named recipe (`offsite presets`; default {default_preset})")
    parser.add_argument("--model", default=None, help="base model: smollm2-135m, a local HF directory, a .gguf file or a hub id")
    parser.add_argument("--shape", default=None, help="a-k-b: adapter blocks at the bottom, kept middle blocks, adapter blocks at the top")
    parser.add_argument("--distill-steps", type=int, default=None, help="distillation steps (0: plain layer drop)")
    parser.add_argument("--corpus", default=None, help="distillation text: 'python-docs' (default), a .txt or a .jsonl with 'text'")
    parser.add_argument("--quantize", default=None, metavar="BITS",
                        help="round the kept middle blocks' weights to BITS bits; a comma list is cycled over the blocks "
                        "(3,4: 3 and 4 in turn); 'none' turns off a preset's")
    parser.add_argument("--quant-group", type=int, default=None, help="input columns per quantisation scale and offset (default 64)")
    parser.add_argument("--plugin-gain", type=float, default=None, metavar="G",
                        help="plug in the full model's adapter blocks + G x what tuning changed (default: the preset's; 1 = as tuned)")


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
    group.add_argument("--lr-schedule", choices=("constant", "cosine"), default=job.lr_schedule,
                       help=f"the data owners' lr across rounds (cosine: down to {job.final_lr_ratio:g} x --local-lr by the last round)")
    group.add_argument("--eval-test", type=Path, default=None,
                       help="multiple-choice JSONL the coordinator scores after the last round (plug-in report under OUT/report)")
    group.add_argument("--eval-rows", type=int, default=None, help="score only the first N rows of --eval-test")
    group.add_argument("--no-plug-in", action="store_true", help="end the job with the last checkpoint: no plug-in, no evaluation")
    from .security_cli import add_security_arguments

    add_security_arguments(parser)  # --job-id, --keys, --registry, --envelopes, --secure-aggregation, --dp-*, ...


def fed_job_config_from_args(args: argparse.Namespace, base_model: str | None = None, plugin_gain: float = 1.0):
    """The :class:`FedJobConfig` that ``cloud prepare``'s federated-job options describe (validated)."""
    from .fed_job import FedJobConfig, LocalTuning
    from .security_cli import security_from_args

    if args.local_steps < 1 or args.local_batch_size < 1 or args.local_lr <= 0:
        raise ValueError(
            f"--local-steps and --local-batch-size must be >= 1 and --local-lr > 0 "
            f"(got {args.local_steps}, {args.local_batch_size}, {args.local_lr})"
        )
    tuning = dataclasses.replace(LocalTuning(), steps=args.local_steps, lr=args.local_lr, batch_size=args.local_batch_size)
    if args.eval_test is not None and args.no_plug_in:
        raise ValueError("--eval-test scores the plug-in: it cannot go with --no-plug-in")
    if args.eval_test is not None and not args.eval_test.is_file():
        raise FileNotFoundError(f"--eval-test {args.eval_test}: no such file")
    return FedJobConfig(
        rounds=args.rounds,
        min_nodes=args.min_nodes,
        min_replies=args.min_replies,
        round_timeout=args.round_timeout,
        aggregator=args.aggregator,
        tuning=tuning,
        lr_schedule=args.lr_schedule,
        base_model=None if args.no_plug_in else base_model,
        eval_test=str(args.eval_test.resolve()) if args.eval_test is not None else None,
        eval_rows=args.eval_rows,
        plugin_gain=plugin_gain,
        **security_from_args(args),  # job_id (a fresh uuid4 unless --job-id) and security
    )


def _add_task_arguments(parser) -> None:
    parser.add_argument("--task", default="wordnet_definitions",
                        help="a task shipped in data/skill or data/bigbench (used when --train/--test are not given; "
                        "default wordnet_definitions)")
    parser.add_argument("--train", type=Path, default=None, help="training JSONL (MC or SFT rows)")
    parser.add_argument("--test", type=Path, default=None, help="test JSONL: MC rows (accuracy) or SFT rows (completion NLL)")
    parser.add_argument("--test-rows", type=int, default=None, help="score the first N test rows (default: all)")


def _task_files_from_args(args) -> tuple[Path, Path, str]:
    """(train, test, task name) from --task or --train/--test."""
    from .pipeline import task_files

    train, test = task_files(args.task) if args.train is None or args.test is None else (args.train, args.test)
    train, test = args.train or train, args.test or test
    return train, test, args.task if args.test is None else test.stem


def _add_eval_arguments(parser, default_preset: str, settings) -> None:
    _add_recipe_arguments(parser, default_preset)
    _add_task_arguments(parser)
    parser.add_argument("--settings", default=",".join(settings), help="comma-separated subset of: " + ", ".join(settings))
    parser.add_argument("--out", type=Path, required=True, help="job directory")
    add_tune_arguments(parser)


def _preset_from_args(args):
    from offsite.emulator.quantize import Quantize
    from offsite.emulator.sandwich import SandwichShape

    from .presets import check_gain, get_preset

    preset = get_preset(args.preset)
    distill = preset.distill
    if args.distill_steps is not None:
        distill = dataclasses.replace(distill, steps=args.distill_steps)
    shape = SandwichShape.parse(args.shape) if args.shape else preset.shape
    quantize = preset.quantize
    if args.quantize is not None:
        quantize = None if args.quantize.lower() == "none" else Quantize.parse(args.quantize, args.quant_group or 64)
    elif args.quant_group is not None:
        if quantize is None:
            raise ValueError(f"--quant-group needs --quantize: preset {preset.name} does not quantise")
        quantize = dataclasses.replace(quantize, group=args.quant_group)
    gain = preset.plugin_gain if args.plugin_gain is None else check_gain(args.plugin_gain)
    return dataclasses.replace(preset, shape=shape, distill=distill, quantize=quantize, plugin_gain=gain)


def _prepare(args: argparse.Namespace) -> int:
    from .fed_job import BUNDLE_DIR, write_job
    from .models import load_base
    from .prepare import config_for, prepare_bundle
    from .security_cli import security_summary, sign_prepared_bundle

    preset = _preset_from_args(args)
    job = fed_job_config_from_args(args, args.model or preset.base, preset.plugin_gain)  # a contradiction fails here, before any distillation
    base, tokenizer, where = load_base(args.model or preset.base)
    bundle = prepare_bundle(base, tokenizer, config_for(preset, args.corpus), args.out / BUNDLE_DIR)
    signature = sign_prepared_bundle(job, bundle.root)  # with --keys: manifest.sig, which the data owners verify
    job_file = write_job(args.out, job)
    distilled = bundle.manifest.get("distill", {})
    quantised = f", middle quantised {preset.quantize}" if preset.quantize else ""
    packed = len(bundle.manifest.get("packed", {}).get("weights", {}))
    print(f"bundle: {bundle.root}  ({bundle.size / 1e6:.0f} MB, {packed} weights packed; shape {preset.shape}, "
          f"layout {bundle.layout}{quantised})")
    print(
        f"job: {job_file}  ({job.rounds} round(s), min_nodes {job.min_nodes}, min_replies {job.min_replies}, "
        f"round timeout {job.round_timeout:g}s, {job.aggregator}, local {job.tuning.steps} step(s) x {job.tuning.batch_size} "
        f"at lr {job.tuning.lr:g}); run it with: offsite cloud run --job {args.out} --superlink HOST:PORT"
    )
    print(security_summary(job) + (f"; bundle signed: {signature}" if signature else ""))
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
    from .presets import check_gain, get_preset

    preset = get_preset(args.preset)
    bundle = read_bundle(args.bundle)
    update, meta = load_update(args.adapter)
    gain = args.gain if args.gain is not None else meta.get("plugin_gain")
    if gain is None:  # job.json is read only when neither the option nor the file says
        gain = _checkpoint_job_gain(args.adapter)
    gain = check_gain(preset.plugin_gain if gain is None else gain)
    base, tokenizer, _ = load_base(args.model or preset.base)
    plugged = plug_in_update(base, update, bundle.adapter_blocks, meta.get("lora_alpha") if meta["mode"] == "lora" else None, gain)
    out = save_plugged(plugged, tokenizer, args.out, {"bundle": bundle.digest, "adapter": str(args.adapter), "plugin_gain": gain})
    print(f"plugged-in model written to {out}")
    return 0


def _checkpoint_job_gain(adapter: Path) -> float | None:
    """The plug-in gain of the federated job whose checkpoint ``adapter`` is
    (``JOB/checkpoints/round-N.safetensors`` next to ``JOB/job.json``), else None."""
    from .fed_job import JOB_FILE, read_job

    checkpoints = Path(adapter).resolve().parent
    if checkpoints.name != "checkpoints" or not (checkpoints.parent / JOB_FILE).is_file():
        return None
    return read_job(checkpoints.parent).plugin_gain


def _report(args: argparse.Namespace) -> int:
    from .combine import combine
    from .evaluate import summary_table, write_report

    reports = combine(args.runs)
    written = write_report(reports, args.out, title=args.title)
    print(summary_table(reports))
    print(f"report: {written['md']} (+ .json, .png); {len(reports)} task(s) from {len(args.runs)} run(s)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .evaluate import summary_table
    from .presets import get_preset
    from .sweep import SweepJob, parse_emulator, run_sweep

    base = get_preset(args.preset)
    emulators = tuple(parse_emulator(text, base) for text in args.emulators)  # refused before the model loads
    if len({e.name for e in emulators}) != len(emulators):
        raise ValueError("an emulator is named twice")
    if args.val_rows < 0:
        raise ValueError("--val-rows must be >= 0")
    train, test, task = _task_files_from_args(args)
    job = SweepJob(emulators=emulators, train=train, test=test, out=args.out, task=task,
                   tune=tune_config_from_args(args, base.tune), test_rows=args.test_rows, val_rows=args.val_rows,
                   model=args.model, corpus=args.corpus or "python-docs")
    reports = run_sweep(job)
    print(summary_table(reports))
    print(f"report: {args.out / 'report' / 'report.md'} (+ .json, .png); frontier: {args.out / 'report' / 'frontier.png'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .pipeline import EvalJob, run_eval_job

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


def _finish(args: argparse.Namespace) -> int:
    from .evaluate import job_report_dir
    from .finish import finish_job

    for name, path in finish_job(args.job, force=args.force).items():
        print(f"{name}: {path}")
    report = job_report_dir(args.job) / "report.md"
    if report.is_file():
        print(report.read_text())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .fed_demo import demo_config_from_args, run_fed_demo
    from .presets import get_preset

    if args.owners < 1 or args.rounds < 1 or args.alpha <= 0 or args.test_rows < 0:
        raise ValueError("--owners and --rounds must be >= 1, --alpha > 0 and --test-rows >= 0")
    args.test_rows = args.test_rows or None
    run_fed_demo(demo_config_from_args(args, get_preset(args.preset)))
    return 0
