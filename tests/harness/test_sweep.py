"""`offsite sweep` and SFT evaluation on a tiny model saved as a local Hugging Face directory."""

import json
import math

import pytest

from offsite.cli import main
from offsite.cloud.evaluate import SETTINGS, Report
from offsite.cloud.prepare import config_for
from offsite.cloud.presets import Preset
from offsite.emulator.distill import DistillConfig
from offsite.emulator.quantize import Quantize
from offsite.emulator.sandwich import SandwichShape
from offsite.emulator.tune import TuneConfig
from offsite.harness.pipeline import EvalJob, run_eval_job
from offsite.harness.sweep import EMULATOR_SETTINGS, SweepJob, adapter_name, parse_emulator, run_sweep
from tests.conftest import write_jsonl
from tests.harness.test_pipeline import task, tiny_dir  # noqa: F401 (fixtures)

TUNE = TuneConfig(steps=3, batch_size=4, lr=1e-3, device="cpu")


@pytest.fixture
def sft_task(tmp_path):
    rows = [{"prompt": f"Entry {i}:\n", "completion": f" word {i} means {i % 5} and {i % 3}"} for i in range(30)]
    write_jsonl(tmp_path / "sft.train.jsonl", rows[:22])
    write_jsonl(tmp_path / "sft.test.jsonl", rows[22:])
    return tmp_path / "sft.train.jsonl", tmp_path / "sft.test.jsonl"


def test_emulator_specs_parse_onto_the_base_recipe():
    base = Preset("p", "m", SandwichShape(2, 10, 2), DistillConfig(steps=60, lr=3e-4))
    e = parse_emulator("2-26-2/kd0/q34g16/gain1.5", base)
    assert (str(e.shape), e.distill.steps, e.distill.lr, e.quantize, e.plugin_gain) == (
        "2-26-2",
        0,
        3e-4,
        Quantize((3, 4), 16),
        1.5,
    )
    plain = parse_emulator("2-18-2", base)
    assert (plain.distill.steps, plain.distill.kl_weight, plain.quantize, plain.plugin_gain, plain.select) == (
        60,
        0.0,
        None,
        1.0,
        "uniform",
    )
    levers = parse_emulator("2-10-2/kd30/kl0.5/cka/samples", base)
    assert (levers.distill.steps, levers.distill.kd_weight, levers.distill.kl_weight, levers.select) == (
        30,
        1.0,
        0.5,
        "cka",
    )
    assert (config_for(levers).select, config_for(levers, "x.txt").corpus) == ("cka", "model-samples")
    # emulators that differ only in the gain, wherever it is written, share one adapter; no others do
    assert (
        adapter_name("2-10-2/gain2/cka") == adapter_name("2-10-2/cka/gain1.5") == "2-10-2/cka" != adapter_name("2-10-2")
    )
    assert (config_for(plain).select, config_for(plain).corpus, config_for(plain, "x.txt").corpus) == (
        "uniform",
        "python-docs",
        "x.txt",
    )
    for bad in (
        "2-18",
        "2-18-2/kd",
        "2-18-2/q9g16",
        "2-18-2/x",
        "2-18-2/gain-1",
        "2-18-2/kl",
        "2-18-2/kl1.2.3",
        "2-18-2/ckb",
    ):
        with pytest.raises(ValueError, match="emulator"):
            parse_emulator(bad, base)


def test_an_sft_eval_job_scores_the_five_settings_by_nll(tmp_path, tiny_dir, sft_task, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    train, test = sft_task
    preset = Preset("tiny", str(tiny_dir), SandwichShape(2, 2, 2), DistillConfig(steps=0))
    report = run_eval_job(
        EvalJob(preset=preset, train=train, test=test, out=tmp_path / "job", task="sft", tune=TUNE), progress=False
    )
    assert report.kind == "sft" and set(report.results) == set(SETTINGS)
    for result in report.results.values():
        assert result["nll"] > 0 and math.isclose(result["ppl"], math.exp(result["nll"])) and result["tokens"] > 8
    # the privacy gap is emulator-FT's NLL minus the plug-in's: positive when the plug-in is better
    assert report.privacy_gap == pytest.approx(report.value("emulator_ft") - report.value("plug_in"))
    saved = json.loads((tmp_path / "job" / "report" / "report.json").read_text())[0]
    assert saved["kind"] == "sft" and Report.from_dict(saved).to_dict() == saved
    assert "NLL (nats/token)" in (tmp_path / "job" / "report" / "report.md").read_text()


def test_a_sweep_measures_the_baselines_once_and_resumes(tmp_path, tiny_dir, task, monkeypatch):  # noqa: F811
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    train, test = task
    base = Preset("tiny", str(tiny_dir), SandwichShape(2, 2, 2), DistillConfig(steps=0))
    emulators = tuple(parse_emulator(t, base) for t in ("2-2-2", "2-4-2/q2g16", "2-4-2/q2g16/gain2"))
    job = SweepJob(
        emulators=emulators, train=train, test=test, out=tmp_path / "sweep", task="even", tune=TUNE, val_rows=8
    )
    reports = run_sweep(job, progress=False)
    assert [r.meta["preset"] for r in reports] == ["2-2-2", "2-4-2/q2g16", "2-4-2/q2g16/gain2"]
    assert all(set(r.results) == set(SETTINGS) and r.test_rows == 8 and r.train_rows == 22 for r in reports)
    # one cut (2 + 2): full zero-shot and full FT measured once and shared by every emulator
    assert len({json.dumps(r.results["full_ft"]) for r in reports}) == 1
    lines = [json.loads(line) for line in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert [x["what"] for x in lines].count("baselines") == 1 and len(lines) == 4
    assert set(lines[3]["results"]) == set(
        EMULATOR_SETTINGS
    )  # the gain-2 emulator scored its plug-in only, the rest shared
    # the gain-2 emulator reused the gain-1 emulator's adapter: the same emulator-FT, another plug-in gain
    assert reports[2].results["emulator_ft"] == reports[1].results["emulator_ft"]
    assert len(list((tmp_path / "sweep" / "adapters").iterdir())) == 2
    assert (tmp_path / "sweep" / "report" / "frontier.png").stat().st_size > 1000
    again = run_sweep(job, progress=False)  # resumes: nothing measured again
    assert len((tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()) == 4
    assert [r.to_dict() for r in again] == [r.to_dict() for r in reports]


def test_sweep_cli_refuses_a_bad_emulator_before_loading_anything(tmp_path, capsys):
    assert main(["sweep", "2-10-2", "2-10-2/kd", "--out", str(tmp_path / "s")]) == 2
    assert "emulator '2-10-2/kd'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_sweep_directory_holds_one_sweep(tmp_path, tiny_dir, task, monkeypatch):  # noqa: F811
    """Records measured with another tuning are refused by line, before anything is loaded or measured."""
    import dataclasses

    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    train, test = task
    base = Preset("tiny", str(tiny_dir), SandwichShape(2, 2, 2), DistillConfig(steps=0))
    job = SweepJob(
        emulators=(parse_emulator("2-2-2", base),),
        train=train,
        test=test,
        out=tmp_path / "s",
        task="even",
        tune=TUNE,
        val_rows=8,
    )
    run_sweep(job, progress=False)
    # records written before a tuning setting existed still belong to the sweep (the setting's default)
    path = tmp_path / "s" / "sweep.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        del line["tune"]["lora"]["freeze_a"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert len(run_sweep(job, progress=False)) == 1  # resumed: nothing refused
    assert path.read_text().count("\n") == len(lines)  # and nothing measured again
    other = dataclasses.replace(job, tune=dataclasses.replace(TUNE, lr=3e-3))
    with pytest.raises(ValueError, match=r"sweep.jsonl:1: measured with another tune"):
        run_sweep(other, progress=False)
    (tmp_path / "s" / "sweep.jsonl").write_text("[" * 10_000 + "\n")
    with pytest.raises(ValueError, match=r"sweep.jsonl:1: not a sweep record"):
        run_sweep(job, progress=False)
