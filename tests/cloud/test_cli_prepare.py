"""``offsite cloud prepare`` writes a complete federated job directory (job.json + bundle/) that
``offsite cloud run --job`` accepts as is."""

from __future__ import annotations

import json

import pytest

from offsite.cli import main
from offsite.cloud.fed_job import FedJobConfig, LocalTuning, read_job
from offsite.protocol.bundle import read_bundle
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
    return main(["cloud", "prepare", "--model", str(model_dir), "--shape", "1-2-1", "--distill-steps", "0", "--out", str(out), *options])


def test_prepare_writes_job_json_with_the_given_settings(model_dir, tmp_path, capsys):
    out = tmp_path / "job"
    code = prepare(
        model_dir, out,
        "--rounds", "4", "--min-nodes", "3", "--min-replies", "2", "--round-timeout", "45",
        "--local-steps", "3", "--local-lr", "0.002", "--local-batch-size", "4", "--aggregator", "trimmed-mean",
    )
    assert code == 0
    expected = FedJobConfig(
        rounds=4, min_nodes=3, min_replies=2, round_timeout=45.0, aggregator="trimmed-mean",
        tuning=LocalTuning(steps=3, lr=0.002, batch_size=4),
    )
    assert read_job(out) == expected
    assert json.loads((out / "job.json").read_text())["kind"] == "federated"
    bundle = read_bundle(out / "bundle")  # verified: every file's sha256 matches the manifest
    assert bundle.adapter_blocks == [0, 5]
    printed = capsys.readouterr().out
    assert f"offsite cloud run --job {out}" in printed


def test_prepare_without_job_options_writes_the_default_job(model_dir, tmp_path):
    out = tmp_path / "job"
    assert prepare(model_dir, out) == 0
    assert read_job(out) == FedJobConfig()
    read_bundle(out / "bundle")


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
