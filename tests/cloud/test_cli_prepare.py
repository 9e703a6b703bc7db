"""``offsite cloud prepare`` writes a complete federated job directory (job.json + bundle/) that
``offsite cloud run --job`` accepts as is."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from offsite.cli import main
from offsite.cloud.fed_job import FEDERATED_TUNING, FedJobConfig, JobError, SecurityConfig, read_job, write_job
from offsite.cloud.presets import get_preset
from offsite.protocol.bundle import read_bundle
from offsite.protocol.bundle_signing import read_signed_bundle
from offsite.protocol.keys import CoordinatorKeys
from offsite.protocol.messages import MAX_PART_BYTES
from tests.conftest import make_tokenizer, tiny_model


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    """A tiny llama (6 blocks) with its tokenizer, saved the way a user's local HF directory is."""
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))  # prepare's bundle cache stays in the test
    path = tmp_path / "model"
    tiny_model("llama", n_blocks=6).save_pretrained(path)
    make_tokenizer(tmp_path).save_pretrained(path)
    return path


def prepare(model_dir, out, *options: str) -> int:
    recipe = ["--model", str(model_dir), "--shape", "1-2-1", "--distill-steps", "0"]
    return main(["cloud", "prepare", *recipe, "--out", str(out), *options])


def test_prepare_writes_job_json_with_the_given_settings(model_dir, tmp_path, capsys):
    out = tmp_path / "job"
    code = prepare(
        model_dir,
        out,
        "--rounds",
        "4",
        "--min-nodes",
        "3",
        "--min-replies",
        "2",
        "--round-timeout",
        "45",
        "--local-steps",
        "3",
        "--local-lr",
        "0.002",
        "--local-batch-size",
        "4",
        "--aggregator",
        "trimmed-mean",
    )
    assert code == 0
    expected = FedJobConfig(
        rounds=4,
        min_nodes=3,
        min_replies=2,
        round_timeout=45.0,
        aggregator="trimmed-mean",
        tuning=dataclasses.replace(FEDERATED_TUNING, steps=3, lr=0.002, batch_size=4),
    )
    job = read_job(out)
    assert re.fullmatch(r"[0-9a-f]{32}", job.job_id)  # a fresh uuid4 per prepared job
    assert job == dataclasses.replace(expected, job_id=job.job_id, base_model=str(model_dir))
    assert json.loads((out / "job.json").read_text())["kind"] == "federated"
    bundle = read_bundle(out / "bundle")  # verified: every file's sha256 matches the manifest
    assert bundle.adapter_blocks == [0, 5]
    printed = capsys.readouterr().out
    assert f"offsite cloud run --job {out}" in printed
    size = sum(entry["bytes"] for entry in bundle.manifest["files"].values())  # what Bundle.size sums
    files = [path for path in (out / "bundle").rglob("*") if path.is_file() and path.name != "manifest.json"]
    on_disk = sum(path.stat().st_size for path in files)
    assert bundle.size == size == on_disk
    # a random model: no grids
    assert f"bundle: {out / 'bundle'}  ({size / 1e6:.0f} MB, 0 weights packed; shape " in printed


def test_prepare_without_job_options_writes_the_default_job(model_dir, tmp_path):
    out = tmp_path / "job"
    assert prepare(model_dir, out) == 0
    job = read_job(out)
    assert job == FedJobConfig(job_id=job.job_id, base_model=str(model_dir))
    read_bundle(out / "bundle")
    assert not (out / "bundle" / "manifest.sig").exists()  # no --keys: not signed


def test_prepare_takes_the_plugin_gain_from_the_preset_or_the_option(model_dir, tmp_path, capsys):
    assert prepare(model_dir, tmp_path / "q", "--preset", "smollm2-135m/q34g16", "--quantize", "none") == 0
    assert read_job(tmp_path / "q").plugin_gain == get_preset("smollm2-135m/q34g16").plugin_gain
    assert prepare(model_dir, tmp_path / "g", "--plugin-gain", "0.5") == 0
    assert read_job(tmp_path / "g").plugin_gain == 0.5
    assert prepare(model_dir, tmp_path / "bad", "--plugin-gain", "-1") == 2
    assert "plug-in gain must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_contradictory_job_settings_stop_before_anything_is_written(model_dir, tmp_path, capsys):
    out = tmp_path / "job"
    assert prepare(model_dir, out, "--min-nodes", "2", "--min-replies", "3") == 2
    assert "min_replies 3 > min_nodes 2" in capsys.readouterr().err
    assert not out.exists()
    assert prepare(model_dir, out, "--local-steps", "0") == 2
    assert "--local-steps" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        prepare(model_dir, out, "--aggregator", "mean")
    assert not out.exists()


def test_prepare_with_keys_signs_the_bundle_and_writes_the_security_settings(model_dir, tmp_path, capsys):
    keys = CoordinatorKeys.generate()
    keys.save(tmp_path / "keys")
    out = tmp_path / "job"
    code = prepare(
        model_dir,
        out,
        "--min-nodes",
        "3",
        "--min-replies",
        "3",
        "--keys",
        str(tmp_path / "keys"),
        "--registry",
        str(tmp_path / "senders.json"),
        "--envelopes",
        "--max-update-norm",
        "5",
        "--secure-aggregation",
        "--secagg-clip-range",
        "0.5",
        "--dp-clip",
        "0.1",
        "--dp-noise",
        "1.2",
        "--dp-mode",
        "distributed",
        "--dp-delta",
        "1e-6",
        "--job-id",
        "trial-7",
    )
    assert code == 0
    job = read_job(out)
    assert job.job_id == "trial-7"
    assert job.security == SecurityConfig(
        envelopes=True,
        keys_dir=str((tmp_path / "keys").resolve()),
        registry=str((tmp_path / "senders.json").resolve()),
        max_update_norm=5.0,
        secure_aggregation=True,
        secagg_clip_range=0.5,
        dp_clip_norm=0.1,
        dp_noise_multiplier=1.2,
        dp_mode="distributed",
        dp_delta=1e-6,
    )
    # manifest.sig verifies
    assert read_signed_bundle(out / "bundle", keys.public()).digest == read_bundle(out / "bundle").digest
    printed = capsys.readouterr().out
    assert "security: job id trial-7, envelopes" in printed and "not there yet" in printed
    assert "bundle signed" in printed


def test_contradictory_security_options_stop_before_anything_is_written(model_dir, tmp_path, capsys):
    out = tmp_path / "job"
    assert prepare(model_dir, out, "--dp-clip", "0.1", "--dp-mode", "distributed") == 2
    assert "needs secure aggregation" in capsys.readouterr().err
    assert prepare(model_dir, out, "--envelopes") == 2
    assert "keys_dir" in capsys.readouterr().err
    assert prepare(model_dir, out, "--keys", str(tmp_path / "no-keys")) == 2
    assert "no-keys" in capsys.readouterr().err
    assert not out.exists()


def test_job_json_keeps_the_plugin_gain_and_refuses_a_bad_one(tmp_path):
    write_job(tmp_path, FedJobConfig(plugin_gain=1.5))
    assert read_job(tmp_path).plugin_gain == 1.5
    data = json.loads((tmp_path / "job.json").read_text())
    for bad in (-0.5, "2", None):
        (tmp_path / "job.json").write_text(json.dumps({**data, "plugin_gain": bad}))
        with pytest.raises(JobError, match=r"job\.json.*(plug-in gain|'plugin_gain': expected float)"):
            read_job(tmp_path)


def test_prepare_makes_a_lora_job_and_refuses_sums_of_factors(model_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    options = ("--mode", "lora", "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj")
    assert prepare(model_dir, out, *options) == 0
    job = read_job(out)
    lora = job.tuning.lora
    assert job.tuning.mode == "lora" and job.lora_aggregation == "frozen-a"
    assert (lora.rank, lora.alpha, lora.targets) == (4, 8.0, ("q_proj", "v_proj"))
    assert lora.freeze_a and lora.init_seed == job.tuning.seed  # every owner draws the same A
    assert json.loads((out / "job.json").read_text())["lora_aggregation"] == "frozen-a"
    for aggregation in ("stack", "factors"):
        refused = tmp_path / f"refused-{aggregation}"
        assert prepare(model_dir, refused, *options, "--lora-aggregation", aggregation, "--secure-aggregation") == 2
        assert f"lora_aggregation '{aggregation}' cannot go with secure aggregation" in capsys.readouterr().err
        assert not refused.exists()  # refused before the bundle is built
    assert prepare(model_dir, tmp_path / "stack", *options, "--lora-aggregation", "stack") == 0
    assert not read_job(tmp_path / "stack").tuning.lora.freeze_a


def test_a_lora_preset_makes_a_lora_job_and_options_override_it(model_dir, tmp_path):
    assert prepare(model_dir, tmp_path / "preset", "--preset", "smollm2-135m/lora") == 0
    job = read_job(tmp_path / "preset")
    preset = get_preset("smollm2-135m/lora").tune
    assert job.tuning.mode == "lora" and job.lora_aggregation == "frozen-a"
    assert (job.tuning.lora.rank, job.tuning.lora.alpha, job.tuning.lr) == (preset.lora.rank, preset.lora.alpha, 1e-3)
    options = ("--preset", "smollm2-135m/lora", "--lora-rank", "2", "--local-lr", "5e-4", "--mode", "blocks")
    assert prepare(model_dir, tmp_path / "blocks", *options) == 0
    assert read_job(tmp_path / "blocks").tuning.mode == "blocks"
    assert read_job(tmp_path / "blocks").tuning.lr == 5e-4


def test_a_job_whose_bundle_parts_are_larger_than_a_data_owner_accepts_is_refused():
    # every data owner refuses a part over MAX_PART_BYTES (protocol.messages): such a job could never start a round
    assert FedJobConfig(bundle_part_bytes=MAX_PART_BYTES).bundle_part_bytes == MAX_PART_BYTES
    for size in (0, MAX_PART_BYTES + 1):
        with pytest.raises(JobError, match=f"between 1 and {MAX_PART_BYTES}"):
            FedJobConfig(bundle_part_bytes=size)
