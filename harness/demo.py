"""``offsite demo``: federated offsite-tuning end to end on one host, with the settings' table.

1. load the base model (the embedded SmolLM2-135M: converted once, then cached);
2. build and distil the emulator bundle (cached by recipe);
3. split the task's training file among the data owners, non-IID (Dirichlet over the labels);
4. start a real federation on loopback: a SuperLink with TLS and SuperNode authentication, one
   SuperNode per data owner holding only its own share; submit the job and follow its rounds;
   the ServerApp plugs the last global adapter into the full model and scores full and emulator
   zero-shot, emulator-FT and the plug-in;
5. with ``--centralised full-ft``, tune the same adapter blocks with the real middle in place on
   the same training data (all shares together, as many examples): the full-FT setting and the
   recovery; with ``--centralised all`` also the centralised offsite-tuning run (emulator-FT,
   plug-in) to compare with the federated one; print the table.

Everything lands in ``--out`` (default ``runs/demo``): ``owners/`` (the shares),
``federated/`` (the job: bundle, checkpoints, state.json, plug_in/, report/), ``federation/``
(certificates, SuperLink and SuperNode logs), ``centralised/`` (adapter) and ``report/``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from offsite.cloud.certs import write_deployment_certs
from offsite.cloud.cli import lora_aggregation, lora_tuning
from offsite.cloud.combine import read_reports
from offsite.cloud.evaluate import EvalConfig, Report, five_setting_eval, job_report_dir, write_report
from offsite.cloud.fed_job import BUNDLE_DIR, FEDERATED_TUNING, FedJobConfig, write_job
from offsite.cloud.models import load_base
from offsite.cloud.prepare import config_for, prepare_bundle
from offsite.cloud.presets import Preset
from offsite.cloud.superlink import round_summary
from offsite.emulator.data import read_examples, read_test_rows
from offsite.emulator.tune import TuneConfig
from offsite.protocol.adapter import save_update
from offsite.protocol.messages import MAX_PART_BYTES

from .federation import LocalFederation
from .pipeline import task_files
from .split import format_table, split_file

log = logging.getLogger(__name__)

COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# what the centralised part of the demo tunes (--centralised)
CENTRALISED = {"full-ft": ("full_ft",), "all": ("emulator_ft", "plug_in", "full_ft"), "none": ()}
DEMO_ROUNDS = 3
DEMO_TEST_ROWS = 200
# Centralised full FT (the yardstick) is opt-in (--centralised full-ft): it costs about 4 minutes
# of 2 cores, and a cold `make demo` of the 2-16-2 default with it took 15 min 15 s to 15 min 29 s,
# over the 15 minutes a first run may take (experiments/QUALITY.md, session 20).
DEMO_CENTRALISED = "none"


@dataclass(frozen=True)
class FedDemoConfig:
    preset: Preset
    out: Path
    task: str = "wordnet_definitions"
    owners: int = 3
    alpha: float = 0.5  # Dirichlet concentration of the label split: small is more skewed
    rounds: int = DEMO_ROUNDS
    test_rows: int | None = DEMO_TEST_ROWS
    seed: int = 0
    round_timeout: float = 1800.0
    centralised: str = DEMO_CENTRALISED  # "full-ft": the full-FT setting; "all": also emulator-FT and plug-in; "none"
    tuning: TuneConfig | None = None  # the owners' tuning (mode, LoRA, lr); None: whole blocks at the preset's lr
    lora_aggregation: str = "frozen-a"

    @property
    def local_steps(self) -> int:
        """Local steps per owner and round, so the federation sees as many training examples as
        the centralised run: rounds * owners * local_steps = the preset's steps."""
        return max(1, round(self.preset.tune.steps / (self.rounds * self.owners)))


def _stage(number: int, total: int, text: str) -> None:
    print(f"\n[{number}/{total}] {text}", flush=True)


def run_fed_demo(config: FedDemoConfig) -> dict:
    if config.centralised not in CENTRALISED:
        raise ValueError(f"centralised must be one of {', '.join(CENTRALISED)}, got {config.centralised!r}")
    started = time.perf_counter()
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    preset = config.preset
    train_path, test_path = task_files(config.task)
    total = 5 if CENTRALISED[config.centralised] else 4

    _stage(1, total, f"base model {preset.base}")
    base, tokenizer, where = load_base(preset.base)
    print(f"loaded from {where}")

    _stage(
        2,
        total,
        f"emulator bundle {preset.name} (shape {preset.shape}, {preset.distill.steps} distillation steps; "
        "cached by recipe)",
    )
    job_dir = out / "federated"
    if job_dir.exists():  # a fresh job every run; the distilled bundle comes from the cache
        shutil.rmtree(job_dir)
    bundle = prepare_bundle(base, tokenizer, config_for(preset), job_dir / BUNDLE_DIR)
    distill = bundle.manifest.get("distill", {})
    if "heldout_reduction" in distill:
        print(
            f"held-out KD {distill['heldout_kd_before']:.3f} -> {distill['heldout_kd_after']:.3f} "
            f"({100 * distill['heldout_reduction']:.0f}% lower than layer drop)"
        )
    train = read_examples(train_path)
    share_paths = _split_among_owners(config, train_path, out / "owners", len(train))
    write_job(job_dir, _job_config(config, test_path))

    federated, fed_seconds = _federate(config, out, job_dir, share_paths, total)
    kind, test = read_test_rows(test_path, limit=config.test_rows)
    report = _demo_report(config, federated, len(test), len(train), kind, fed_seconds)
    if CENTRALISED[config.centralised]:
        _centralised(config, report, base, tokenizer, bundle, train, test, out, total)
    report.meta["seconds"] = round(time.perf_counter() - started, 1)
    paths = write_report(
        [report],
        job_report_dir(out),
        title=f"{preset.name} on {config.task}: federated ({config.owners} owners) and centralised",
    )
    _stage(total, total, f"results ({report.meta['seconds'] / 60:.1f} min in all)")
    print(report.markdown())
    print(f"report: {paths['md']} (+ .json, .png); federated plug-in model: {job_dir / 'plug_in'}")
    return report.to_dict()


def _split_among_owners(config: FedDemoConfig, train_path: Path, owners_dir: Path, rows: int) -> list[Path]:
    tune = config.preset.tune
    summary = split_file(train_path, owners_dir, config.owners, config.alpha, config.seed, min_rows=tune.batch_size)
    print(f"{rows} training rows split among {config.owners} owners, Dirichlet alpha {config.alpha} over the labels:")
    print(format_table(summary))
    return [owners_dir / owner["file"] for owner in summary["owners"]]


def _job_config(config: FedDemoConfig, test_path: Path) -> FedJobConfig:
    """The federated job: as many training examples as the preset's centralised budget."""
    preset, tune = config.preset, config.preset.tune
    owners = config.tuning or FEDERATED_TUNING
    return FedJobConfig(
        rounds=config.rounds,
        min_nodes=config.owners,
        min_replies=max(1, config.owners - 1),
        round_timeout=config.round_timeout,
        bundle_timeout=config.round_timeout,
        # parts as large as a data owner accepts: Flower starts a ClientApp process (about 4 CPU-seconds
        # of imports) on every SuperNode for every message, so each extra part costs every owner one more
        bundle_part_bytes=MAX_PART_BYTES,
        tuning=dataclasses.replace(
            owners,
            steps=config.local_steps,
            batch_size=tune.batch_size,
            lr=owners.lr if config.tuning else tune.lr,
            max_length=tune.max_length,
            seed=config.seed,
        ),
        lora_aggregation=config.lora_aggregation,
        lr_schedule="cosine",
        base_model=preset.base,
        eval_test=str(test_path),
        eval_rows=config.test_rows,
        plugin_gain=preset.plugin_gain,
    )


def _federate(config: FedDemoConfig, out: Path, job_dir: Path, share_paths: list[Path], total: int):
    """Run the job on a SuperLink and one SuperNode per owner on loopback; the job's own report
    (read as ``offsite report`` reads it) and the seconds the federation took."""
    tune, steps = config.preset.tune, config.local_steps
    _stage(
        3,
        total,
        f"federated: {config.rounds} rounds x {config.owners} owners x {steps} local steps x {tune.batch_size} "
        f"(= {config.rounds * config.owners * steps * tune.batch_size} examples; "
        f"centralised: {tune.steps * tune.batch_size}), "
        "SuperLink + SuperNodes on loopback with TLS and node authentication",
    )
    federation_dir = out / "federation"
    if federation_dir.exists():
        shutil.rmtree(federation_dir)
    certs = write_deployment_certs(federation_dir / "certs", nodes=config.owners, hosts=("127.0.0.1", "localhost"))
    started = time.perf_counter()
    with LocalFederation(federation_dir, certs=certs) as federation:
        federation.start_superlink()
        for index, path in enumerate(share_paths):
            federation.start_supernode(
                {"data-path": path, "cache-dir": out / "owners" / f"cache-{index}", "threads": 1},
                name=f"owner-{index}",
                wait=False,
            )
        federation.wait_listening()  # started side by side, waited for together
        print(
            f"SuperLink {federation.address}; {config.owners} SuperNodes registered and started "
            f"(logs in {federation_dir / 'logs'})"
        )
        run_id = federation.submit({"job-dir": job_dir})
        status = federation.follow(run_id, _print_server_line, timeout=config.round_timeout * (config.rounds + 2))
    if status != "finished:completed":
        raise RuntimeError(f"federated run {run_id} ended {status}; logs in {federation_dir / 'logs'}")
    seconds = time.perf_counter() - started
    for line in round_summary(job_dir):
        print(line)
    (federated,) = read_reports(job_report_dir(job_dir) / "report.json")  # checked as `offsite report` checks it
    return federated, seconds


def _demo_report(
    config: FedDemoConfig, federated: Report, test_rows: int, train_rows: int, kind: str, fed_seconds: float
) -> Report:
    report = Report(task=config.task, test_rows=test_rows, train_rows=train_rows, kind=kind)
    for setting in ("full_zero_shot", "emulator_zero_shot"):
        report.results[setting] = federated.results[setting]
    report.results["federated_emulator_ft"] = federated.results["emulator_ft"]
    report.results["federated_plug_in"] = federated.results["plug_in"]
    report.meta = {
        "preset": config.preset.name,
        "owners": config.owners,
        "alpha": config.alpha,
        "rounds": config.rounds,
        "local_steps": config.local_steps,
        "federated_seconds": round(fed_seconds, 1),
        "middle_nmse_at_answer": federated.meta.get("middle_nmse_at_answer"),
        "plugin_gain": config.preset.plugin_gain,
    }
    return report


def _centralised(
    config: FedDemoConfig, report: Report, base, tokenizer, bundle, train, test, out: Path, total: int
) -> None:
    """Full FT (and with ``--centralised all`` centralised emulator-FT and plug-in) on all the training data."""
    preset, settings = config.preset, CENTRALISED[config.centralised]
    names = {
        "emulator_ft": "emulator-FT",
        "plug_in": "plug-in",
        "full_ft": "full FT (the same blocks tuned with the real middle)",
    }
    _stage(4, total, f"centralised on the same {len(train)} training rows: {', '.join(names[s] for s in settings)}")
    central, update = five_setting_eval(
        base,
        tokenizer,
        bundle,
        train,
        test,
        preset.tune,
        EvalConfig(settings=settings, plugin_gain=preset.plugin_gain),
        task=config.task,
    )
    report.results.update(central.results)
    report.meta["centralised"] = {k: central.meta[k] for k in ("emulator_tuning", "full_tuning") if k in central.meta}
    if update is not None:
        save_update(
            out / "centralised" / "adapter.safetensors",
            update,
            {"mode": "blocks", "lora_alpha": None, "bundle": bundle.digest},
        )


def _print_server_line(line: str) -> None:
    """The ServerApp's own log lines (rounds, drops, evaluation), without Flower's colour codes."""
    text = COLOUR.sub("", line).strip()
    if text:
        print(f"  coordinator | {text}", flush=True)


def demo_config_from_args(args, preset: Preset) -> FedDemoConfig:
    tune = dataclasses.replace(preset.tune)
    owners = dataclasses.replace(FEDERATED_TUNING, lr=args.lr or preset.tune.lr, seed=args.seed)
    owners = lora_tuning(args, owners, preset.tune)
    return FedDemoConfig(
        tuning=owners,
        lora_aggregation=lora_aggregation(args, preset.tune),
        preset=dataclasses.replace(preset, tune=tune),
        out=args.out,
        task=args.task,
        owners=args.owners,
        alpha=args.alpha,
        rounds=args.rounds,
        test_rows=args.test_rows,
        seed=args.seed,
        centralised=args.centralised,
    )
