"""The end of a federated job: the last global adapter plugged into the full model and scored."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.cli import main
from offsite.cloud.fed_job import FEDERATED_TUNING, FedJobConfig, JobError, JobState, save_checkpoint, write_job
from offsite.cloud.finish import finish_job
from offsite.emulator.data import read_mc_jsonl
from offsite.emulator.sandwich import SandwichShape, adapter_state_dict, build_emulator
from offsite.emulator.score import score_mc
from offsite.protocol.bundle import read_bundle, write_bundle
from tests.conftest import make_tokenizer, tiny_model, write_jsonl

N_BLOCKS = 6
SHAPE = SandwichShape(1, 2, 1)


def make_finished_job(
    tmp_path, rounds: int = 2, completed: int = 2, eval_rows: int | None = None, plugin_gain: float = 1.0
):
    base = tiny_model("llama", n_blocks=N_BLOCKS)
    tokenizer = make_tokenizer(tmp_path)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir, safe_serialization=True)
    tokenizer.save_pretrained(base_dir)
    emulator, layout = build_emulator(base, SHAPE)
    job_dir = tmp_path / "job"
    adapter_blocks = SHAPE.adapter_blocks(N_BLOCKS)
    bundle = write_bundle(
        job_dir / "bundle",
        emulator,
        tokenizer,
        {
            "family": "llama",
            "shape": {"a": 1, "k": 2, "b": 1, "n_blocks": N_BLOCKS},
            "layout": layout,
            "adapter_blocks": adapter_blocks,
            "kept_middle": SHAPE.kept_middle(N_BLOCKS),
        },
    )
    test = tmp_path / "test.jsonl"
    write_jsonl(test, [{"prompt": f"q{i} ", "choices": ["a", "b", "c"], "answer": i % 3} for i in range(12)])
    write_job(
        job_dir,
        FedJobConfig(
            rounds=rounds, base_model=str(base_dir), eval_test=str(test), eval_rows=eval_rows, plugin_gain=plugin_gain
        ),
    )
    state = JobState(bundle=read_bundle(job_dir / "bundle").digest)
    adapter = adapter_state_dict(emulator, layout, adapter_blocks)
    generator = torch.Generator().manual_seed(1)
    for round_number in range(completed + 1):
        if round_number:
            adapter = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in adapter.items()}
        save_checkpoint(job_dir, state, round_number, adapter, {"round": round_number} if round_number else None)
    return job_dir, base, tokenizer, adapter, bundle, test


def test_finish_plugs_in_the_last_checkpoint_and_scores_it(tmp_path):
    job_dir, base, tokenizer, adapter, bundle, test = make_finished_job(tmp_path, eval_rows=10)
    written = finish_job(job_dir)
    plugged = AutoModelForCausalLM.from_pretrained(written["plug_in"]).eval()
    state = plugged.state_dict()
    base_state = base.state_dict()
    for key, tensor in adapter.items():  # blocks.{i}.{name} -> model.layers.{i}.{name}
        index, name = key.split(".", 2)[1:]
        assert torch.equal(state[f"model.layers.{index}.{name}"], tensor), key
    for index in SHAPE.kept_middle(N_BLOCKS) + [2, 3]:  # the real middle, untouched
        for name, tensor in base_state.items():
            if name.startswith(f"model.layers.{index}."):
                assert torch.equal(state[name], tensor), name
    provenance = json.loads((written["plug_in"] / "offsite.json").read_text())
    assert provenance["round"] == 2

    report = json.loads(written["report"].read_text())[0]
    assert report["test_rows"] == 10
    assert set(report["results"]) == {"full_zero_shot", "emulator_zero_shot", "emulator_ft", "plug_in"}
    rescored = score_mc(plugged, tokenizer, read_mc_jsonl(test, limit=10), 4)
    assert math.isclose(report["results"]["plug_in"]["accuracy"], rescored.accuracy)
    zero_shot = score_mc(base, tokenizer, read_mc_jsonl(test, limit=10), 4).accuracy
    assert math.isclose(report["results"]["full_zero_shot"]["accuracy"], zero_shot)
    assert report["meta"]["tune"]["federated"] == dataclasses.asdict(FEDERATED_TUNING)  # the job's whole TuneConfig
    assert report["meta"]["tune"]["rounds"] == 2
    assert report["meta"]["bundle_digest"] == bundle.digest and report["meta"]["model"] == str(tmp_path / "base")

    # idempotent: the same checkpoint is not plugged in twice
    stamp = (written["plug_in"] / "model.safetensors").stat().st_mtime_ns
    finish_job(job_dir)
    assert (written["plug_in"] / "model.safetensors").stat().st_mtime_ns == stamp


def test_finish_applies_the_jobs_plugin_gain(tmp_path):
    job_dir, base, tokenizer, adapter, bundle, test = make_finished_job(tmp_path, eval_rows=6, plugin_gain=1.5)
    written = finish_job(job_dir)
    state = AutoModelForCausalLM.from_pretrained(written["plug_in"]).state_dict()
    base_state = base.state_dict()
    for key, tensor in adapter.items():
        index, name = key.split(".", 2)[1:]
        real = base_state[f"model.layers.{index}.{name}"]
        # the plugged block moved 1.5 times as far from the real one as the global adapter did
        plugged = state[f"model.layers.{index}.{name}"]
        torch.testing.assert_close(plugged - real, 1.5 * (tensor - real), rtol=1e-5, atol=1e-6)
    report = json.loads(written["report"].read_text())[0]
    assert report["meta"]["plugin_gain"] == 1.5


def test_cloud_plugin_takes_the_gain_of_the_job_whose_checkpoint_it_is(tmp_path):
    """`offsite cloud plugin --adapter JOB/checkpoints/round-N.safetensors` plugs in at the job's
    gain (job.json); the same file elsewhere falls back to the preset's (the default's is 1)."""
    job_dir, base, tokenizer, adapter, bundle, test = make_finished_job(tmp_path, plugin_gain=1.5)
    checkpoint = job_dir / "checkpoints" / "round-0002.safetensors"
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copy(checkpoint, copy)
    base_state = base.state_dict()
    for source, out, gain in ((checkpoint, "in-job", 1.5), (copy, "copied", 1.0)):
        assert (
            main(
                [
                    "cloud",
                    "plugin",
                    "--model",
                    str(tmp_path / "base"),
                    "--bundle",
                    str(job_dir / "bundle"),
                    "--adapter",
                    str(source),
                    "--out",
                    str(tmp_path / out),
                ]
            )
            == 0
        )
        state = AutoModelForCausalLM.from_pretrained(tmp_path / out).state_dict()
        for key, tensor in adapter.items():
            index, name = key.split(".", 2)[1:]
            real = base_state[f"model.layers.{index}.{name}"]
            plugged = state[f"model.layers.{index}.{name}"]
            torch.testing.assert_close(plugged - real, gain * (tensor - real), rtol=1e-5, atol=1e-6)


def test_finish_refuses_an_unfinished_job(tmp_path):
    job_dir, *_ = make_finished_job(tmp_path, rounds=3, completed=2)
    with pytest.raises(JobError, match="2 of 3 rounds"):
        finish_job(job_dir)


def test_round_lr_schedule():
    constant = FedJobConfig(rounds=4, tuning=dataclasses.replace(FEDERATED_TUNING, lr=1e-3))
    assert [constant.round_lr(r) for r in range(1, 5)] == [1e-3] * 4
    cosine = FedJobConfig(
        rounds=5, tuning=dataclasses.replace(FEDERATED_TUNING, lr=1e-3), lr_schedule="cosine", final_lr_ratio=0.1
    )
    lrs = [cosine.round_lr(r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[2] == pytest.approx(5.5e-4)  # halfway: the mean of the two ends
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(JobError, match="eval_test needs base_model"):
        FedJobConfig(eval_test="x.jsonl")
