"""The end of a federated job: plug the last global adapter into the full model and evaluate it.

Runs in the ServerApp after the last round when ``job.json`` names a ``base_model`` (and again,
by hand, with ``offsite cloud finish --job DIR``). It writes, inside the job directory::

    plug_in/                    the full model with the federated adapter (Hugging Face directory)
    plug_in/offsite.json        provenance: bundle digest, round and sha256 of the checkpoint used
    report/report.{md,json,png} with ``eval_test``: full zero-shot, emulator zero-shot, the emulator
                                with the federated adapter, and the plug-in (full fine-tuning needs
                                the training data, which the operator never holds)

Finishing is idempotent: a plug-in already made from the same checkpoint is not made again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from offsite.emulator.data import read_test_rows
from offsite.emulator.tune import TuneConfig
from offsite.protocol.bundle import read_bundle, sha256_file
from offsite.protocol.dp import PrivacyAccountant

from .evaluate import EvalConfig, five_setting_eval, job_report_dir, write_report
from .fed_job import BUNDLE_DIR, JobError, load_checkpoint, load_state, read_job
from .models import load_base
from .plugin import plug_in_update, save_plugged

log = logging.getLogger("flwr").getChild("offsite")

PLUG_IN_DIR = "plug_in"
FEDERATED_SETTINGS = ("full_zero_shot", "emulator_zero_shot", "emulator_ft", "plug_in")


def privacy_spent(config, state) -> dict:
    """The job's differential privacy: epsilon at its delta after the rounds accounted in ``state``."""
    sec = config.security
    spent = PrivacyAccountant.from_json(state.privacy).spent(sec.dp_delta)
    return {
        **spent.to_json(),
        "mode": sec.dp_mode,
        "clip_norm": sec.dp_clip_norm,
        "noise_multiplier": sec.dp_noise_multiplier,
    }


def finish_job(job_dir: Path | str, force: bool = False) -> dict[str, Path]:
    """Plug in (and evaluate) the job's last global adapter; returns the paths written."""
    job_dir = Path(job_dir)
    config = read_job(job_dir)
    state = load_state(job_dir)
    if state is None or state.completed_round < config.rounds:
        done = 0 if state is None else state.completed_round
        raise JobError(f"{job_dir}: {done} of {config.rounds} rounds completed; finish the rounds first")
    if config.base_model is None:
        raise JobError(f"{job_dir / 'job.json'}: no base_model to plug the adapter into")
    provenance = {"bundle": state.bundle, "round": state.completed_round, "checkpoint_sha256": state.checkpoint_sha256}
    marker = job_dir / PLUG_IN_DIR / "offsite.json"
    report_file = job_report_dir(job_dir) / "report.json"
    done = marker.is_file() and json.loads(marker.read_text()) == provenance
    if not force and done and (config.eval_test is None or report_file.is_file()):
        log.info("job %s: already finished from round %d", job_dir, state.completed_round)
        return {"plug_in": marker.parent} | ({"report": report_file} if config.eval_test else {})

    bundle = read_bundle(job_dir / BUNDLE_DIR)
    adapter, meta = load_checkpoint(job_dir, state)  # whole blocks, or a LoRA job's factors
    base, tokenizer, where = load_base(config.base_model)
    log.info("job %s: plugging round %d's adapter into %s", job_dir, state.completed_round, where)
    alpha = meta.get("lora_alpha") if meta.get("mode") == "lora" else None
    plugged = plug_in_update(base, adapter, bundle.adapter_blocks, alpha, gain=config.plugin_gain)
    written = {"plug_in": save_plugged(plugged, tokenizer, job_dir / PLUG_IN_DIR, provenance)}
    del plugged
    if config.eval_test is not None:
        lora = meta.get("mode") == "lora"
        report = _evaluate(job_dir, config, state, base, tokenizer, bundle, adapter, provenance, lora)
        title = f"federated job {job_dir.name}: {state.completed_round} rounds"
        write_report([report], job_report_dir(job_dir), title=title)
        written["report"] = report_file
        for line in report.markdown().splitlines():
            log.info("%s", line)
    return written


def _evaluate(job_dir: Path, config, state, base, tokenizer, bundle, adapter, provenance: dict, lora: bool):
    """The federated settings' report of the plugged-in adapter on the job's ``eval_test``
    (``lora``: the adapter is a LoRA job's factors)."""
    _, test = read_test_rows(config.eval_test, limit=config.eval_rows)
    report, _ = five_setting_eval(
        base,
        tokenizer,
        bundle,
        [],
        test,
        TuneConfig(mode="lora", lora=config.tuning.lora) if lora else TuneConfig(),
        EvalConfig(settings=FEDERATED_SETTINGS, plugin_gain=config.plugin_gain),
        task=Path(config.eval_test).name.removesuffix(".jsonl"),
        adapter=adapter,
        progress=False,
    )
    report.meta["federated"] = provenance
    # the job's own tuning, not the TuneConfig() passed above (it tunes nothing here), and what
    # `offsite report` checks before joining this report with others
    tune = {
        "federated": dataclasses.asdict(config.tuning),
        "rounds": config.rounds,
        "lr_schedule": config.lr_schedule,
        "final_lr_ratio": config.final_lr_ratio,
    }
    report.meta.update(
        tune=tune, bundle_digest=bundle.digest, test_sha256=sha256_file(config.eval_test), model=config.base_model
    )
    if config.security.dp and state.privacy:
        report.meta["privacy"] = privacy_spent(config, state)
        log.info(
            "job %s: differential privacy spent: epsilon %.4g at delta %g over %d round(s)",
            job_dir,
            report.meta["privacy"]["epsilon"],
            config.security.dp_delta,
            report.meta["privacy"]["rounds"],
        )
    return report
