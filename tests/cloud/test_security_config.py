"""A job's security settings: backward-compatible job.json, contradictions refused with the
setting named, what the coordinator sends and accounts (instruction modes, DP epsilon), and how
``round_summary`` reports it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from offsite.cloud.fed_job import (
    FEDERATED_TUNING,
    FedJobConfig,
    JobError,
    JobState,
    SecurityConfig,
    read_job,
    save_checkpoint,
    save_state,
    write_job,
)
from offsite.cloud.federate.channels import client_metrics, update_weight
from offsite.cloud.federate.strategy import spend_privacy
from offsite.cloud.finish import privacy_spent
from offsite.cloud.superlink import round_summary
from offsite.emulator.tune import TuneConfig
from offsite.protocol.dp import DPConfig, PrivacyAccountant
from offsite.protocol.messages import TrainInstruction

KEYS = dict(keys_dir="/keys", registry="/senders.json")


def job(**security) -> FedJobConfig:
    return FedJobConfig(min_nodes=3, min_replies=3, job_id="job-1", security=SecurityConfig(**security))


def test_job_json_without_security_still_reads_and_security_round_trips(tmp_path):
    old = {key: value for key, value in FedJobConfig().to_json().items() if key not in ("job_id", "security")}
    (tmp_path / "job.json").write_text(json.dumps(old))
    assert read_job(tmp_path) == FedJobConfig()  # a job.json written before this section existed

    secured = job(
        envelopes=True,
        max_update_norm=5.0,
        secure_aggregation=True,
        secagg_clip_range=0.25,
        secagg_ring_bits=32,
        dp_clip_norm=0.1,
        dp_noise_multiplier=0.8,
        dp_mode="distributed",
        dp_delta=1e-6,
        **KEYS,
    )
    write_job(tmp_path, secured)
    assert read_job(tmp_path) == secured
    data = json.loads((tmp_path / "job.json").read_text())
    assert data["job_id"] == "job-1" and data["security"]["dp_mode"] == "distributed"

    data["security"]["envelope"] = True  # a typo is not silently ignored
    (tmp_path / "job.json").write_text(json.dumps(data))
    with pytest.raises(JobError, match=r"unknown security settings \['envelope'\]"):
        read_job(tmp_path)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (lambda: FedJobConfig(security=SecurityConfig(envelopes=True, **KEYS)), "set job_id"),
        (
            lambda: FedJobConfig(min_nodes=2, min_replies=2, security=SecurityConfig(secure_aggregation=True)),
            "set job_id",
        ),
        (lambda: job(envelopes=True), "keys_dir"),
        (lambda: job(envelopes=True, keys_dir="/keys"), "registry"),
        (lambda: FedJobConfig(job_id="a/b"), "job_id 'a/b'"),
        (lambda: job(max_update_norm=1.0), "turn envelopes on"),
        (lambda: job(envelopes=True, max_update_norm=-1.0, **KEYS), "max_update_norm must be"),
        (lambda: job(dp_clip_norm=0.1, dp_mode="distributed"), "needs secure aggregation"),
        (lambda: job(dp_clip_norm=0.1, dp_noise_multiplier=0.0), "dp_noise_multiplier must be a finite number > 0"),
        (lambda: job(dp_clip_norm=-0.1), "clip_norm must be a finite number > 0"),
        (lambda: job(dp_clip_norm=0.1, dp_delta=1.0), "dp_delta"),
        (lambda: job(dp_clip_norm=0.1, dp_mode="central"), "dp_mode"),
        (
            lambda: job(envelopes=True, max_update_norm=0.05, dp_clip_norm=0.1, **KEYS),
            "max_update_norm 0.05 < dp_clip_norm 0.1",
        ),
        (lambda: job(secure_aggregation=True, secagg_threshold=4), "min_replies 3 < secagg_threshold 4"),
        (lambda: job(secure_aggregation=True, secagg_threshold=1), "secagg_threshold must be >= 2"),
        (lambda: job(secure_aggregation=True, secagg_ring_bits=16), "secagg_ring_bits"),
        (
            lambda: job(secure_aggregation=True, secagg_clip_range=0.05, dp_clip_norm=0.1),
            "secagg_clip_range 0.05 < dp_clip_norm 0.1",
        ),
        (
            lambda: dataclasses.replace(job(secure_aggregation=True), record_updates=True),
            "record_updates contradicts secure aggregation",
        ),
        (lambda: dataclasses.replace(job(secure_aggregation=True), aggregator="median"), "aggregator must be 'fedavg'"),
        (lambda: dataclasses.replace(job(dp_clip_norm=0.1), aggregator="trimmed-mean"), "aggregator must be 'fedavg'"),
    ],
)
def test_contradictions_are_refused_naming_the_setting(config, match):
    with pytest.raises(JobError, match=match):
        config()


def test_the_instruction_carries_the_job_id_and_modes(tmp_path):
    plain = FedJobConfig().instruction(2, "c" * 64)
    assert (plain.job_id, plain.envelope, plain.secagg, plain.dp) == ("", False, False, None)
    config = dataclasses.replace(
        job(
            envelopes=True,
            secure_aggregation=True,
            dp_clip_norm=0.2,
            dp_noise_multiplier=1.5,
            dp_mode="distributed",
            **KEYS,
        ),
        min_replies=3,
    )
    sent = config.instruction(2, "c" * 64)
    assert TrainInstruction.from_record(sent.to_record(), TuneConfig) == sent
    assert (sent.job_id, sent.envelope, sent.secagg) == ("job-1", True, True)
    # the sum of a completed round holds >= min_replies updates
    assert sent.dp == DPConfig(0.2, 1.5, "distributed", 3)
    local = job(dp_clip_norm=0.2).instruction(1, "c" * 64)
    assert local.dp == DPConfig(0.2, 1.0, "local", 1)


def test_the_round_s_tuning_is_the_job_s_with_the_round_s_lr_and_seed():
    tuning = dataclasses.replace(FEDERATED_TUNING, lr=1e-3, seed=5, prox=0.1, train="top")
    config = FedJobConfig(rounds=3, tuning=tuning, lr_schedule="cosine", final_lr_ratio=0.5)
    for round_number in (1, 2, 3):
        sent = config.instruction(round_number, "c" * 64).tuning
        assert sent == dataclasses.replace(tuning, lr=config.round_lr(round_number), seed=5 + round_number)
    assert config.instruction(3, "c" * 64).tuning.lr == pytest.approx(5e-4)
    with pytest.raises(JobError, match="freeze_a must be True with lora_aggregation 'frozen-a'"):
        FedJobConfig(tuning=dataclasses.replace(FEDERATED_TUNING, mode="lora"))
    with pytest.raises(JobError, match="tuning.device"):
        FedJobConfig(tuning=dataclasses.replace(FEDERATED_TUNING, device="cuda"))


def test_a_job_json_of_the_old_tuning_section_reads_with_the_same_settings(tmp_path):
    """job.json files written with LocalTuning's eight fields (before TuneConfig was nested) read as
    the same tuning: the fields TuneConfig adds take FEDERATED_TUNING's values."""
    old_tuning = {
        "steps": 3,
        "batch_size": 4,
        "lr": 0.002,
        "warmup_steps": 0,
        "schedule": "constant",
        "max_length": 64,
        "max_grad_norm": 1.0,
        "seed": 7,
    }
    data = FedJobConfig().to_json() | {"tuning": old_tuning}
    (tmp_path / "job.json").write_text(json.dumps(data))
    assert read_job(tmp_path).tuning == dataclasses.replace(FEDERATED_TUNING, **old_tuning)
    (tmp_path / "job.json").write_text(json.dumps(data | {"tuning": {"lr": 0.01}}))
    assert read_job(tmp_path).tuning == dataclasses.replace(FEDERATED_TUNING, lr=0.01)  # not TuneConfig()'s 120 steps
    (tmp_path / "job.json").write_text(json.dumps(data | {"tuning": {"steps": 0}}))
    with pytest.raises(JobError, match="job.json: tuning: steps and batch_size must be >= 1"):
        read_job(tmp_path)
    (tmp_path / "job.json").write_text(json.dumps(data | {"tuning": {"middle_drop": 0.25}}))
    with pytest.raises(JobError, match=r"unknown tuning settings \['middle_drop'\]"):
        read_job(tmp_path)


def test_privacy_is_charged_per_round_and_persisted_with_the_state(tmp_path):
    config = job(dp_clip_norm=0.1, dp_noise_multiplier=1.1, dp_delta=1e-5)
    state = JobState(bundle="d" * 64)
    accountant = PrivacyAccountant()
    epsilons = []
    for round_number in (1, 2, 3):
        record = spend_privacy(state, config)
        accountant.step(1.1)
        assert record["epsilon"] == accountant.epsilon(1e-5) and record["rounds"] == round_number
        assert record["exact_epsilon"] < record["epsilon"]  # the tight GDP value is below the RDP bound
        epsilons.append(record["epsilon"])
        entry = {
            "round": round_number,
            "privacy": record,
            "replied": [1],
            "sent": [1],
            "failed": {},
            "dropped": [],
            "mean_train_loss": None,
            "seconds": 1.0,
        }
        save_checkpoint(tmp_path, state, round_number, {"w": torch.zeros(2)}, entry)
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3
    saved = json.loads((tmp_path / "state.json").read_text())
    assert PrivacyAccountant.from_json(saved["privacy"]).epsilon(1e-5) == epsilons[-1]
    lines = round_summary(tmp_path)
    assert lines[2].endswith(f"DP epsilon {epsilons[2]:.4g} at delta 1e-05") and "weighted train loss -" in lines[2]

    # a failed round that released updates is still charged: the state is written without a new round
    spend_privacy(state, config)
    save_state(tmp_path, state)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["completed_round"] == 3 and PrivacyAccountant.from_json(saved["privacy"]).rounds == 4

    # what the finish report's meta says
    accountant.step(1.1)
    expected = {**accountant.spent(1e-5).to_json(), "mode": "local", "clip_norm": 0.1, "noise_multiplier": 1.1}
    assert privacy_spent(config, state) == expected


def test_client_metrics_and_weights_are_checked():
    reported = client_metrics(4, {"num-examples": 5, "train-loss": 1.5, "extra": "ignored"})
    assert reported == {"num-examples": 5, "train-loss": 1.5}
    with pytest.raises(ValueError, match="node 4: metric 'train-loss'"):
        client_metrics(4, {"train-loss": math.nan})
    assert update_weight(4, {"num-examples": 5}, dp=False) == 5.0
    assert update_weight(4, {}, dp=True) == 1.0  # DP: equal weights, no example count needed
    with pytest.raises(ValueError, match="num-examples"):
        update_weight(4, {"num-examples": 0}, dp=False)
