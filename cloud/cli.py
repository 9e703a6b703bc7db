"""``offsite cloud ...`` and ``offsite report``: the operator's commands."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path

from offsite.emulator.lora import LoRASpec
from offsite.emulator.quantize import Quantize
from offsite.emulator.sandwich import SandwichShape
from offsite.emulator.tune import TuneConfig
from offsite.protocol.adapter import load_update
from offsite.protocol.bundle import read_bundle

from .aggregate import AGGREGATORS
from .combine import combine
from .evaluate import job_report_dir, summary_table, write_report
from .export import register as register_export
from .fed_job import BUNDLE_DIR, FEDERATED_TUNING, JOB_FILE, LORA_AGGREGATIONS, FedJobConfig, read_job, write_job
from .finish import finish_job
from .keys_cli import register_key_commands
from .models import load_base
from .plugin import plug_in_update, save_plugged
from .prepare import config_for, prepare_bundle
from .presets import DEFAULT_PRESET, check_gain, get_preset
from .security_cli import add_security_arguments, security_from_args, security_summary, sign_prepared_bundle
from .serve_cli import register as register_serve
from .superlink import FederationError, SuperLinkConnection, round_summary, run_job_on_superlink

log = logging.getLogger(__name__)


def register(subparsers):
    """``offsite cloud`` and ``offsite report``; returns the ``offsite cloud`` subparsers (the harness adds to them)."""
    cloud = subparsers.add_parser("cloud", help="operator: prepare emulator bundles, evaluate, plug in")
    commands = cloud.add_subparsers(dest="cloud_command", required=True, metavar="COMMAND")
    _register_prepare(commands)
    _register_plugin(commands)
    _register_run(commands)
    register_key_commands(commands)  # offsite cloud keys | enroll | revoke | senders | sign-bundle
    _register_finish(commands)
    register_export(commands)  # offsite cloud export --format peft|hf
    for parent, name in ((commands, "report"), (subparsers, "report")):
        _register_report(parent, name)
    register_serve(commands)  # offsite cloud serve
    return commands


def _register_prepare(commands) -> None:
    prepare = commands.add_parser(
        "prepare",
        help="build a federated job: its emulator bundle (layer drop + distillation) and job.json",
        description="Split the base model, build and distil the emulator, write the bundle a data owner receives "
        "(OUT/bundle) and the federated job's settings (OUT/job.json), ready for `offsite cloud run --job OUT`. "
        "Distilled bundles are cached: the same recipe twice costs seconds.",
    )
    _add_recipe_arguments(prepare, DEFAULT_PRESET)
    prepare.add_argument(
        "--out", required=True, type=Path, help="job directory: OUT/job.json (the federated job) and OUT/bundle"
    )
    _add_fed_job_arguments(prepare)
    prepare.set_defaults(func=_prepare)


def _register_plugin(commands) -> None:
    plugin = commands.add_parser(
        "plugin",
        help="plug a tuned adapter into the full model and save a Hugging Face model directory",
    )
    plugin.add_argument("--model", default=None, help="base model (default: the preset's)")
    plugin.add_argument("--preset", default=DEFAULT_PRESET, help="preset naming the base model")
    plugin.add_argument("--bundle", required=True, type=Path, help="the bundle the adapter was tuned on")
    plugin.add_argument("--adapter", required=True, type=Path, help="adapter update (.safetensors)")
    plugin.add_argument("--out", required=True, type=Path, help="output model directory")
    plugin.add_argument(
        "--gain",
        type=float,
        default=None,
        metavar="G",
        help="plug in the full model's adapter blocks + G x what tuning changed "
        "(default: the adapter file's recorded plugin_gain, else the federated job's when the "
        "adapter is JOB/checkpoints/round-N.safetensors, else the preset's)",
    )
    plugin.set_defaults(func=_plugin)


def _register_run(commands) -> None:
    run = commands.add_parser(
        "run",
        help="run a federated job on a SuperLink (flwr run) and follow its rounds",
        description="Submit the job directory's federated job (job.json + bundle/) to a running SuperLink and print "
        "the ServerApp's log (one block per round) until the run finishes. The job directory must be at the same "
        "path on the SuperLink's host.",
    )
    run.add_argument("--job", required=True, type=Path, help="job directory with job.json and bundle/")
    run.add_argument("--superlink", required=True, help="the SuperLink's address, HOST:PORT")
    run.add_argument(
        "--root-certificates", type=Path, help="CA certificate that signed the SuperLink's TLS certificate"
    )
    run.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS: loopback tests only")
    run.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="give up following after this many seconds")
    run.set_defaults(func=_run)


def _register_finish(commands) -> None:
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


def _register_report(parent, name: str) -> None:
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


def _add_recipe_arguments(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument(
        "--preset", default=default_preset, help=f"named recipe (`offsite presets`; default {default_preset})"
    )
    parser.add_argument(
        "--model", default=None, help="base model: smollm2-135m, a local HF directory, a .gguf file or a hub id"
    )
    parser.add_argument(
        "--shape",
        default=None,
        help="a-k-b: adapter blocks at the bottom, kept middle blocks, adapter blocks at the top",
    )
    parser.add_argument("--distill-steps", type=int, default=None, help="distillation steps (0: plain layer drop)")
    parser.add_argument(
        "--corpus",
        default=None,
        help="distillation text: 'python-docs' (default), 'model-samples' (the full model's own answers on "
        "everyday topics, sampled once and cached), a .txt or a .jsonl with 'text'",
    )
    parser.add_argument(
        "--quantize",
        default=None,
        metavar="BITS",
        help="round the kept middle blocks' weights to BITS bits; a comma list is cycled over the "
        "blocks "
        "(3,4: 3 and 4 in turn); 'none' turns off a preset's",
    )
    parser.add_argument(
        "--quant-group", type=int, default=None, help="input columns per quantisation scale and offset (default 64)"
    )
    parser.add_argument(
        "--plugin-gain",
        type=float,
        default=None,
        metavar="G",
        help="plug in the full model's adapter blocks + G x what tuning changed (default: the preset's; 1 = as tuned)",
    )


def _add_fed_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The federated job's settings (job.json); defaults are :class:`FedJobConfig`'s (its ``tuning``:
    :data:`FEDERATED_TUNING`)."""
    job, tuning = FedJobConfig(), FEDERATED_TUNING
    group = parser.add_argument_group("federated job (written to OUT/job.json for `offsite cloud run`)")
    _add_round_arguments(group, job)
    _add_local_training_arguments(group, job, tuning)
    add_lora_arguments(parser.add_argument_group("LoRA (federated rounds of LoRA factors inside the adapter blocks)"))
    _add_job_end_arguments(group)
    add_security_arguments(parser)  # --job-id, --keys, --registry, --envelopes, --secure-aggregation, --dp-*, ...


def _add_round_arguments(group, job: FedJobConfig) -> None:
    """``--rounds``, ``--min-nodes``, ``--min-replies``, ``--round-timeout``."""
    group.add_argument("--rounds", type=int, default=job.rounds, help=f"federated rounds (default {job.rounds})")
    group.add_argument(
        "--min-nodes",
        type=int,
        default=job.min_nodes,
        help=f"connected SuperNodes to wait for before each round (default {job.min_nodes})",
    )
    group.add_argument(
        "--min-replies",
        type=int,
        default=job.min_replies,
        help=f"successful replies needed to complete a round (default {job.min_replies})",
    )
    group.add_argument(
        "--round-timeout",
        type=float,
        default=job.round_timeout,
        help=f"seconds to wait for the train replies of a round (default {job.round_timeout:g})",
    )


def _add_local_training_arguments(group, job: FedJobConfig, tuning) -> None:
    """The data owners' training per round and how updates are combined: ``--local-*``, ``--aggregator``, etc."""
    group.add_argument(
        "--local-steps",
        type=int,
        default=tuning.steps,
        help=f"optimiser steps per data owner per round (default {tuning.steps})",
    )
    group.add_argument(
        "--local-lr", type=float, default=None, help="data owners' learning rate (default: the preset's)"
    )
    group.add_argument(
        "--local-batch-size",
        type=int,
        default=tuning.batch_size,
        help=f"examples per local step (default {tuning.batch_size})",
    )
    group.add_argument(
        "--aggregator",
        choices=AGGREGATORS,
        default=job.aggregator,
        help=f"how updates are combined (default {job.aggregator})",
    )
    group.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=job.lr_schedule,
        help=f"the data owners' lr across rounds (cosine: down to {job.final_lr_ratio:g} x --local-lr "
        "by the last round)",
    )


def add_lora_arguments(group) -> None:
    """``--mode lora`` and its rank, alpha, targets and aggregation (docs/federated.md, "LoRA")."""
    spec = LoRASpec()
    group.add_argument(
        "--mode",
        choices=("blocks", "lora"),
        default=None,
        help="data owners train whole adapter blocks or LoRA factors inside them (default: the preset's)",
    )
    group.add_argument(
        "--lora-rank", type=int, default=None, help=f"LoRA rank r (default: the preset's, else {spec.rank})"
    )
    group.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help=f"LoRA alpha, the scale being alpha/r (default: the preset's, else {spec.alpha:g})",
    )
    group.add_argument(
        "--lora-targets", default=None, help="comma-separated linear names inside a block (default: every linear)"
    )
    group.add_argument(
        "--lora-aggregation",
        choices=LORA_AGGREGATIONS,
        default=None,
        help="frozen-a (default): A fixed by the job's seed, owners train B, the mean of B is exact and works "
        "with secure aggregation and DP; stack: exact mean of the products B A merged into the blocks; "
        "factors: naive mean of A and of B (not exact: a baseline)",
    )


def _tuning_from_args(args: argparse.Namespace, preset_tune: TuneConfig):
    """The data owners' per-round :class:`TuneConfig` from ``--local-*`` and the LoRA options; the
    learning rate and the LoRA settings not given come from the preset's tuning."""
    lr = preset_tune.lr if args.local_lr is None else args.local_lr
    given = {"steps": args.local_steps, "lr": lr, "batch_size": args.local_batch_size}
    try:
        tuning = dataclasses.replace(FEDERATED_TUNING, **given)
    except ValueError as error:  # TuneConfig's own check, named by the options that set it
        raise ValueError(f"--local-steps, --local-lr, --local-batch-size: {error}") from None
    return lora_tuning(args, tuning, preset_tune)


def lora_aggregation(args: argparse.Namespace, preset_tune: TuneConfig) -> str:
    """``--lora-aggregation``, else frozen-a (a preset whose LoRA trains A as well: stack)."""
    if args.lora_aggregation is not None:
        return args.lora_aggregation
    return "stack" if preset_tune.mode == "lora" and not preset_tune.lora.freeze_a else "frozen-a"


def lora_tuning(args: argparse.Namespace, tuning: TuneConfig, preset_tune: TuneConfig) -> TuneConfig:
    """``tuning`` with :func:`add_lora_arguments`'s choices over the preset's (``preset_tune``): as it is
    in blocks mode, else LoRA with the job's A seed (frozen-a: ``tuning.seed``, shared by every owner)."""
    if (args.mode or preset_tune.mode) != "lora":
        return tuning
    frozen = lora_aggregation(args, preset_tune) == "frozen-a"
    base = preset_tune.lora
    names = args.lora_targets.split(",") if args.lora_targets else []
    targets = tuple(name.strip() for name in names if name.strip()) or base.targets
    rank = base.rank if args.lora_rank is None else args.lora_rank
    alpha = base.alpha if args.lora_alpha is None else args.lora_alpha
    try:
        lora = LoRASpec(rank, alpha, targets, freeze_a=frozen, init_seed=tuning.seed if frozen else None)
    except ValueError as error:
        raise ValueError(f"--lora-rank, --lora-alpha: {error}") from None
    return dataclasses.replace(tuning, mode="lora", lora=lora)


def _add_job_end_arguments(group) -> None:
    """What happens after the last round: ``--eval-test``, ``--eval-rows``, ``--no-plug-in``."""
    group.add_argument(
        "--eval-test",
        type=Path,
        default=None,
        help="multiple-choice JSONL the coordinator scores after the last round (plug-in report under OUT/report)",
    )
    group.add_argument("--eval-rows", type=int, default=None, help="score only the first N rows of --eval-test")
    group.add_argument(
        "--no-plug-in", action="store_true", help="end the job with the last checkpoint: no plug-in, no evaluation"
    )


def fed_job_config_from_args(args: argparse.Namespace, preset):
    """The :class:`FedJobConfig` that ``cloud prepare``'s federated-job options describe over the
    preset's recipe (its base model, plug-in gain and tuning defaults), validated."""
    base_model, plugin_gain = args.model or preset.base, preset.plugin_gain
    tuning = _tuning_from_args(args, preset.tune)
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
        lora_aggregation=lora_aggregation(args, preset.tune),
        lr_schedule=args.lr_schedule,
        base_model=None if args.no_plug_in else base_model,
        eval_test=str(args.eval_test.resolve()) if args.eval_test is not None else None,
        eval_rows=args.eval_rows,
        plugin_gain=plugin_gain,
        **security_from_args(args),  # job_id (a fresh uuid4 unless --job-id) and security
    )


def _preset_from_args(args):
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
    preset = _preset_from_args(args)
    # a contradiction fails here, before any distillation
    job = fed_job_config_from_args(args, preset)
    base, tokenizer, where = load_base(args.model or preset.base)
    bundle = prepare_bundle(base, tokenizer, config_for(preset, args.corpus), args.out / BUNDLE_DIR)
    signature = sign_prepared_bundle(job, bundle.root)  # with --keys: manifest.sig, which the data owners verify
    job_file = write_job(args.out, job)
    distilled = bundle.manifest.get("distill", {})
    quantised = f", middle quantised {preset.quantize}" if preset.quantize else ""
    packed = len(bundle.manifest.get("packed", {}).get("weights", {}))
    print(
        f"bundle: {bundle.root}  ({bundle.size / 1e6:.0f} MB, {packed} weights packed; shape {preset.shape}, "
        f"layout {bundle.layout}{quantised})"
    )
    print(
        f"job: {job_file}  ({job.rounds} round(s), min_nodes {job.min_nodes}, min_replies {job.min_replies}, "
        f"round timeout {job.round_timeout:g}s, {job.aggregator}, local {job.tuning.steps} step(s) x "
        f"{job.tuning.batch_size} at lr {job.tuning.lr:g}); "
        f"run it with: offsite cloud run --job {args.out} --superlink HOST:PORT"
    )
    print(security_summary(job) + (f"; bundle signed: {signature}" if signature else ""))
    if "heldout_reduction" in distilled:
        print(
            f"distillation: held-out KD {distilled['heldout_kd_before']:.3f} -> {distilled['heldout_kd_after']:.3f} "
            f"({100 * distilled['heldout_reduction']:.0f}% lower)"
        )
    return 0


def _plugin(args: argparse.Namespace) -> int:
    preset = get_preset(args.preset)
    bundle = read_bundle(args.bundle)
    update, meta = load_update(args.adapter)
    gain = args.gain if args.gain is not None else meta.get("plugin_gain")
    if gain is None:  # job.json is read only when neither the option nor the file says
        gain = _checkpoint_job_gain(args.adapter)
    gain = check_gain(preset.plugin_gain if gain is None else gain)
    base, tokenizer, _ = load_base(args.model or preset.base)
    alpha = meta.get("lora_alpha") if meta["mode"] == "lora" else None
    plugged = plug_in_update(base, update, bundle.adapter_blocks, alpha, gain)
    provenance = {"bundle": bundle.digest, "adapter": str(args.adapter), "plugin_gain": gain}
    out = save_plugged(plugged, tokenizer, args.out, provenance)
    print(f"plugged-in model written to {out}")
    return 0


def _checkpoint_job_gain(adapter: Path) -> float | None:
    """The plug-in gain of the federated job whose checkpoint ``adapter`` is
    (``JOB/checkpoints/round-N.safetensors`` next to ``JOB/job.json``), else None."""
    checkpoints = Path(adapter).resolve().parent
    if checkpoints.name != "checkpoints" or not (checkpoints.parent / JOB_FILE).is_file():
        return None
    return read_job(checkpoints.parent).plugin_gain


def _report(args: argparse.Namespace) -> int:
    reports = combine(args.runs)
    written = write_report(reports, args.out, title=args.title)
    print(summary_table(reports))
    print(f"report: {written['md']} (+ .json, .png); {len(reports)} task(s) from {len(args.runs)} run(s)")
    return 0


def _run(args: argparse.Namespace) -> int:
    colour = re.compile(r"\x1b\[[0-9;]*m")
    try:
        connection = SuperLinkConnection(
            args.superlink, root_certificates=args.root_certificates, insecure=args.insecure
        )
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
    for name, path in finish_job(args.job, force=args.force).items():
        print(f"{name}: {path}")
    report = job_report_dir(args.job) / "report.md"
    if report.is_file():
        print(report.read_text())
    return 0
