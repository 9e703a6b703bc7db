"""The operator's Flower ServerApp (Message API): a federated job's rounds over the SuperNodes.

The run config (``flwr run -c "job-dir='/abs/path'"``) names a job directory prepared by the
operator (``job.json`` + ``bundle/``; see :mod:`offsite.cloud.fed_job`). The ServerApp verifies the
bundle, resumes after the last completed round in ``state.json`` (or starts from the bundle's own
adapter), runs the rounds left with :class:`~.strategy.FederatedTuning` and the job's channel
(plain, envelopes or secure aggregation, see :func:`open_channel`), and with a ``base_model``
plugs the last global adapter in (:mod:`offsite.cloud.finish`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from offsite.protocol.bundle import BundleError, read_bundle
from offsite.protocol.bundle_signing import read_signed_bundle

from ..adapter_rule import AdapterRule
from ..fed_job import (
    BUNDLE_DIR,
    FedJobConfig,
    JobError,
    JobState,
    load_checkpoint,
    load_state,
    read_job,
    save_checkpoint,
)
from ..finish import finish_job
from .channels import EnvelopeChannel, Envelopes, PlainChannel, UpdateChannel, load_coordinator_keys
from .secagg_channel import SecAggChannel
from .strategy import FederatedTuning, OpenJob

log = logging.getLogger("flwr").getChild("offsite")  # flwr's handlers reach `flwr log` / --stream

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    job_dir = context.run_config.get("job-dir")
    if not isinstance(job_dir, str) or not job_dir:
        raise JobError("run config 'job-dir' is not set: flwr run <app> <connection> -c \"job-dir='/abs/path/to/job'\"")
    run_job(grid, Path(job_dir).expanduser())


def run_job(grid: Grid, job_dir: Path) -> JobState:
    """The job's remaining rounds (and its plug-in, with a ``base_model``); the final state."""
    job = open_job(job_dir)
    channel = open_channel(job_dir, job.config)
    if job.state.completed_round:
        log.info("job %s: resuming after round %d of %d", job_dir, job.state.completed_round, job.config.rounds)
    result = FederatedTuning(job, channel, grid).start()
    state = result.state
    log.info(
        "job %s: %d round(s) completed; global adapter at %s",
        job_dir,
        state.completed_round,
        job_dir / state.checkpoint,
    )
    if job.config.base_model is not None:
        finish_job(job_dir)
    return state


def open_job(job_dir: Path) -> OpenJob:
    """Read the job, verify its bundle (and, with the coordinator's keys, its signature: what the
    data owners will check) and return the state to resume from (round 0 if new)."""
    config = read_job(job_dir)
    keys = load_coordinator_keys(job_dir, config)
    bundle_dir = job_dir / BUNDLE_DIR
    try:
        bundle = read_bundle(bundle_dir) if keys is None else read_signed_bundle(bundle_dir, keys.public())
    except BundleError as error:
        hint = f" (sign it: offsite cloud sign-bundle --bundle {bundle_dir} --keys DIR)" if keys is not None else ""
        raise JobError(f"{error}{hint}") from None
    rule = AdapterRule.for_job(config, bundle)
    state = load_state(job_dir)
    if state is None:
        state = JobState(bundle=bundle.digest)
        adapter = rule.initial()  # the bundle's adapter blocks as shipped, or a LoRA job's initial factors
        save_checkpoint(job_dir, state, 0, rule.checkpoint(adapter), None, rule.kind)
        return OpenJob(job_dir, config, bundle, state, adapter, rule)
    if state.bundle != bundle.digest:
        raise JobError(f"{job_dir}/state.json belongs to bundle {state.bundle[:12]}, the job's is {bundle.digest[:12]}")
    tensors, meta = load_checkpoint(job_dir, state)
    if meta.get("mode") != rule.kind["mode"]:
        found = meta.get("mode")
        raise JobError(f"{job_dir / state.checkpoint}: a {found!r} checkpoint, but this job's rule is {rule.name}")
    return OpenJob(job_dir, config, bundle, state, rule.from_checkpoint(tensors), rule)


def open_channel(job_dir: Path, config: FedJobConfig) -> UpdateChannel:
    """How this job's updates travel: secure aggregation (its masked inputs sealed too with
    envelopes), envelopes, or in the clear. The one place the mode is chosen."""
    envelopes = Envelopes.open(job_dir, config)  # None without envelopes
    if config.security.secure_aggregation:
        return SecAggChannel(config, envelopes)
    if envelopes is not None:
        return EnvelopeChannel(config, envelopes)
    return PlainChannel(config)
