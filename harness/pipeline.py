"""Centralised offsite-tuning end to end: prepare the bundle, tune on the emulator, plug in and
run the five-setting evaluation. ``offsite eval`` and ``offsite demo`` are thin shells over it."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import offsite.data
from offsite.cloud.evaluate import SETTINGS, EvalConfig, Report, five_setting_eval, job_report_dir, write_report
from offsite.cloud.models import load_base
from offsite.cloud.plugin import plug_in_update, save_plugged
from offsite.cloud.prepare import config_for, prepare_bundle
from offsite.cloud.presets import Preset
from offsite.emulator.corpus import DEFAULT_CORPUS
from offsite.emulator.data import read_examples, read_test_rows
from offsite.emulator.tune import TuneConfig
from offsite.protocol.adapter import save_update
from offsite.protocol.bundle import sha256_file

log = logging.getLogger(__name__)

DATA_ROOT = Path(offsite.data.__file__).resolve().parent  # package data: the installed wheel carries the tasks
# the shipped tasks: those the default model has skill on first, then the chance-level BIG-bench record
DATA_DIRS = (DATA_ROOT / "skill", DATA_ROOT / "bigbench")


def known_tasks() -> list[str]:
    """Names of the shipped tasks, skill tasks first."""
    return [p.name.removesuffix(".test.jsonl") for d in DATA_DIRS for p in sorted(d.glob("*.test.jsonl"))]


def task_files(task: str) -> tuple[Path, Path]:
    """(train, test) JSONL of a task shipped in ``data/skill`` or ``data/bigbench``."""
    for folder in DATA_DIRS:
        train, test = folder / f"{task}.train.jsonl", folder / f"{task}.test.jsonl"
        if train.is_file() and test.is_file():
            return train, test
    raise FileNotFoundError(f"no task {task!r} in {DATA_ROOT} (known: {', '.join(known_tasks()) or 'none'})")


@dataclass(frozen=True)
class EvalJob:
    preset: Preset
    train: Path
    test: Path
    out: Path
    task: str
    tune: TuneConfig
    test_rows: int | None = None  # None: the whole test file
    settings: tuple[str, ...] = SETTINGS
    save_plug_in: bool = True
    model: str | None = None  # overrides the preset's base model
    corpus: str = DEFAULT_CORPUS


def run_eval_job(job: EvalJob, progress: bool = True) -> Report:
    started = time.perf_counter()
    # the settings and both data files are checked before the model loads and minutes of distillation
    config = EvalConfig(settings=job.settings, plugin_gain=job.preset.plugin_gain)
    train = read_examples(job.train)
    _, test = read_test_rows(job.test, limit=job.test_rows)
    job.out.mkdir(parents=True, exist_ok=True)
    (job.out / "job.json").write_text(
        json.dumps(
            {
                "preset": job.preset.name,
                "model": job.model or job.preset.base,
                "shape": str(job.preset.shape),
                "distill": dataclasses.asdict(job.preset.distill),
                "quantize": dataclasses.asdict(job.preset.quantize) if job.preset.quantize else None,
                "plugin_gain": job.preset.plugin_gain,
                "tune": dataclasses.asdict(job.tune),
                "train": str(job.train),
                "test": str(job.test),
                "test_rows": job.test_rows,
            },
            indent=1,
        )
    )
    base, tokenizer, where = load_base(job.model or job.preset.base)
    log.info("base model from %s", where)
    bundle = prepare_bundle(base, tokenizer, config_for(job.preset, job.corpus), job.out / "bundle", progress=progress)
    report, update = five_setting_eval(
        base, tokenizer, bundle, train, test, job.tune, config, task=job.task, progress=progress
    )
    report.meta["distill"] = bundle.manifest.get("distill")
    report.meta["preset"] = job.preset.name
    # what `offsite report` checks before joining runs into one table: the same files and bundle
    report.meta.update(
        model=str(job.model or job.preset.base),
        bundle_digest=bundle.digest,
        test_sha256=sha256_file(job.test),
        train_sha256=sha256_file(job.train),
    )
    if update is not None:
        lora_alpha = job.tune.lora.alpha if job.tune.mode == "lora" else None
        gain = job.preset.plugin_gain
        save_update(
            job.out / "adapter.safetensors",
            update,
            {"mode": job.tune.mode, "lora_alpha": lora_alpha, "bundle": bundle.digest, "plugin_gain": gain},
        )
        if job.save_plug_in:
            plugged = plug_in_update(base, update, bundle.adapter_blocks, lora_alpha, gain)
            save_plugged(
                plugged,
                tokenizer,
                job.out / "plug_in",
                {"preset": job.preset.name, "bundle": bundle.digest, "plugin_gain": gain},
            )
    report.meta["seconds"] = round(time.perf_counter() - started, 1)
    write_report([report], job_report_dir(job.out), title=f"{job.preset.name} on {job.task}")
    return report
