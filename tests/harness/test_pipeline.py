"""The operator's pipeline on a tiny model saved as a local Hugging Face directory."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.cloud.evaluate import SETTINGS, Report
from offsite.cloud.models import load_base, publish, resolve_model_dir
from offsite.cloud.prepare import EmulatorConfig, prepare_bundle
from offsite.cloud.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from offsite.emulator.arch import get_path, spec_for
from offsite.emulator.distill import DistillConfig
from offsite.emulator.quantize import Quantize, quantize_blocks
from offsite.emulator.sandwich import SandwichShape, build_emulator
from offsite.emulator.tune import TuneConfig
from offsite.harness.pipeline import EvalJob, run_eval_job, task_files
from offsite.protocol.bundle import load_emulator, read_bundle
from tests.conftest import tiny_model, write_jsonl


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    model = tiny_model("llama", n_blocks=8)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture
def task(tmp_path):
    rows = [{"prompt": f"Is {i} even?\nAnswer:", "choices": [" yes", " no"], "answer": i % 2} for i in range(40)]
    write_jsonl(tmp_path / "train.jsonl", rows[:30])
    write_jsonl(tmp_path / "test.jsonl", rows[30:])
    return tmp_path / "train.jsonl", tmp_path / "test.jsonl"


def test_prepare_caches_the_distilled_bundle(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    base, tokenizer, _ = load_base(str(tiny_dir))
    config = EmulatorConfig(
        SandwichShape(2, 2, 2), DistillConfig(steps=2, batch_size=2, seq_len=16), corpus=str(_corpus(tmp_path))
    )
    first = prepare_bundle(base, tokenizer, config, tmp_path / "job1", progress=False)
    cached = list((tmp_path / "cache" / "bundles").iterdir())
    assert len(cached) == 1
    second = prepare_bundle(base, tokenizer, config, tmp_path / "job2", progress=False)
    assert first.digest == second.digest  # the same bundle, not a second distillation
    assert "heldout_kd_after" in first.manifest["distill"]
    other = prepare_bundle(
        base,
        tokenizer,
        EmulatorConfig(SandwichShape(2, 3, 2), config.distill, config.corpus),
        tmp_path / "job3",
        progress=False,
    )
    assert other.digest != first.digest
    assert len(list((tmp_path / "cache" / "bundles").iterdir())) == 2


def test_prepare_quantises_the_kept_middle_and_records_it(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    base, tokenizer, _ = load_base(str(tiny_dir))
    shape, spec = SandwichShape(2, 4, 2), Quantize((3, 4), 16)
    plain = prepare_bundle(
        base, tokenizer, EmulatorConfig(shape, DistillConfig(steps=0)), tmp_path / "plain", progress=False
    )
    bundle = prepare_bundle(
        base, tokenizer, EmulatorConfig(shape, DistillConfig(steps=0), quantize=spec), tmp_path / "q", progress=False
    )
    assert bundle.digest != plain.digest and "quantize" not in plain.manifest
    assert bundle.manifest["quantize"] == {"bits": [3, 4], "group": 16}
    assert (
        "packed" not in plain.manifest and len(bundle.manifest["packed"]["weights"]) == 4 * 7
    )  # 4 blocks x 7 linear maps
    assert (
        bundle.manifest["files"]["emulator.safetensors"]["bytes"]
        < plain.manifest["files"]["emulator.safetensors"]["bytes"]
    )
    expected, layout = build_emulator(base, shape)
    quantize_blocks(expected, [2, 3, 4, 5], spec)  # the 4 kept middle positions, between 2 + 2 adapter blocks
    shipped = load_emulator(bundle).state_dict()
    for key, tensor in expected.state_dict().items():
        assert torch.equal(shipped[key], tensor), key  # written and read back bit for bit
    blocks, real = get_path(load_emulator(bundle), spec_for(base).blocks), get_path(base, spec_for(base).blocks)
    for position in (0, 1, 6, 7):  # the adapter shells are the real model's blocks, not rounded
        assert all(
            torch.equal(a, b) for a, b in zip(blocks[position].parameters(), real[layout[position]].parameters())
        )
    assert not torch.equal(blocks[2].mlp.down_proj.weight, real[layout[2]].mlp.down_proj.weight)


def test_quantisation_options_override_the_preset():
    from offsite.cli import build_parser
    from offsite.cloud.cli import _preset_from_args

    def preset(*argv):
        return _preset_from_args(build_parser().parse_args(["eval", "--out", "x", *argv]))

    assert preset("--preset", "smollm2-135m/q34g16").quantize == Quantize((3, 4), 16)
    assert preset("--preset", "smollm2-135m/q34g16", "--quantize", "none").quantize is None
    assert preset("--preset", "smollm2-135m/q34g16", "--quant-group", "64").quantize == Quantize((3, 4), 64)
    assert preset("--quantize", "3").quantize == Quantize((3,), 64)
    with pytest.raises(ValueError, match="--quant-group needs --quantize"):
        preset("--quant-group", "16")


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return path


def test_eval_job_writes_report_plug_in_and_adapter(tmp_path, tiny_dir, task, monkeypatch):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    train, test = task
    preset = Preset("tiny", str(tiny_dir), SandwichShape(2, 2, 2), DistillConfig(steps=0))
    tune = TuneConfig(steps=4, batch_size=4, lr=1e-3, device="cpu")
    job = EvalJob(preset=preset, train=train, test=test, out=tmp_path / "job", task="even", tune=tune)
    report = run_eval_job(job, progress=False)
    assert set(report.results) == set(SETTINGS)
    for result in report.results.values():
        assert 0.0 <= result["accuracy"] <= 1.0 and result["correct"] == round(result["accuracy"] * 10)
    assert report.test_rows == 10 and report.train_rows == 30
    saved = json.loads((tmp_path / "job" / "report" / "report.json").read_text())[0]
    assert saved["privacy_gap"] == pytest.approx(report.accuracy("plug_in") - report.accuracy("emulator_ft"))
    assert (tmp_path / "job" / "report" / "report.png").stat().st_size > 1000
    assert "privacy gap" in (tmp_path / "job" / "report" / "report.md").read_text()
    # the plug-in directory is a loadable HF model that differs from the base
    plugged = AutoModelForCausalLM.from_pretrained(tmp_path / "job" / "plug_in")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(plugged(ids).logits, base(ids).logits, atol=1e-5)


def test_eval_job_plugs_in_with_the_presets_gain(tmp_path, tiny_dir, task, monkeypatch):
    """The saved plug-in, the plug-in setting and the adapter file all carry the recipe's gain."""
    from offsite.cloud.plugin import plug_in_update
    from offsite.protocol.adapter import load_update
    from offsite.protocol.bundle import read_bundle

    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    train, test = task
    preset = Preset("tiny", str(tiny_dir), SandwichShape(2, 2, 2), DistillConfig(steps=0), plugin_gain=2.0)
    tune = TuneConfig(steps=3, batch_size=4, lr=1e-3, device="cpu")
    job = EvalJob(
        preset=preset, train=train, test=test, out=tmp_path / "job", task="even", tune=tune, settings=("plug_in",)
    )
    report = run_eval_job(job, progress=False)
    assert report.meta["plugin_gain"] == 2.0
    assert "| plug-in (gain 2) |" in (tmp_path / "job" / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "job" / "job.json").read_text())["plugin_gain"] == 2.0
    update, meta = load_update(tmp_path / "job" / "adapter.safetensors")
    assert meta["plugin_gain"] == 2.0
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    blocks = read_bundle(tmp_path / "job" / "bundle").adapter_blocks
    expected = plug_in_update(base, update, blocks, gain=2.0).state_dict()
    as_tuned = plug_in_update(base, update, blocks).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "job" / "plug_in").state_dict()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    assert any(not torch.equal(saved[key], as_tuned[key]) for key in expected)
    with pytest.raises(ValueError, match="plug-in gain"):
        Preset("tiny", str(tiny_dir), SandwichShape(2, 2, 2), DistillConfig(steps=0), plugin_gain=-1.0)


def test_report_gaps():
    report = Report("t", 100, 10)
    report.results = {
        s: {"accuracy": a, "stderr": 0.05, "correct": int(a * 100)}
        for s, a in zip(SETTINGS, (0.5, 0.4, 0.6, 0.7, 0.75))
    }
    assert report.privacy_gap == pytest.approx(0.1)
    assert report.utility_gap == pytest.approx(0.05)
    assert "| plug-in | 0.700 |" in report.markdown()
    assert "privacy gap (plug-in - emulator-FT): +10.0 points" in report.markdown()


def test_report_gaps_fall_back_to_the_federated_settings():
    """The demo's default runs only the federated job and the full FT: the gaps are taken on the
    federated emulator-FT and plug-in, and say so; a centralised result, when present, wins."""

    def entry(accuracy):
        return {"accuracy": accuracy, "stderr": 0.05, "correct": int(accuracy * 100)}

    report = Report("t", 100, 10)
    report.results = {
        "full_zero_shot": entry(0.5),
        "emulator_zero_shot": entry(0.45),
        "federated_emulator_ft": entry(0.55),
        "federated_plug_in": entry(0.62),
        "full_ft": entry(0.8),
    }
    assert report.privacy_gap == pytest.approx(0.07) and report.utility_gap == pytest.approx(0.18)
    text = report.markdown()
    assert (
        "privacy gap (plug-in - emulator-FT, federated): +7.0 points" in text
        and "federated plug-in - centralised" not in text
    )
    assert (
        text.index("| emulator zero-shot")
        < text.index("| emulator-FT, federated")
        < text.index("| plug-in, federated")
        < text.index("| full FT")
    )
    report.results |= {"emulator_ft": entry(0.6), "plug_in": entry(0.65)}
    assert report.privacy_gap == pytest.approx(0.05) and report.utility_gap == pytest.approx(0.15)
    assert "federated plug-in - centralised plug-in: -3.0 points" in report.markdown()


def test_presets_are_well_formed():
    assert DEFAULT_PRESET in PRESETS
    for name, preset in PRESETS.items():
        preset.shape.check(30)
        assert get_preset(name) is preset
    with pytest.raises(KeyError, match="known"):
        get_preset("nope/1-1-1")


def test_shipped_tasks_exist():
    from offsite.emulator.data import read_test_rows
    from offsite.harness.pipeline import known_tasks

    names = [
        "jargon_entries",
        "wordnet_definitions",
        "formal_fallacies_syllogisms_negation",
        "hyperbaton",
        "sports_understanding",
        "vitaminc_fact_verification",
    ]
    assert known_tasks() == names  # the skill tasks first
    for name in names:
        train, test = task_files(name)
        assert train.stat().st_size > 0 and test.stat().st_size > 0
    assert read_test_rows(task_files("jargon_entries")[1])[0] == "sft"
    assert read_test_rows(task_files("wordnet_definitions")[1], limit=5)[0] == "mc"
    with pytest.raises(FileNotFoundError, match="jargon_entries, wordnet_definitions, .*hyperbaton"):
        task_files("nope")


def test_model_sources(tmp_path, tiny_dir):
    assert resolve_model_dir(str(tiny_dir)) == tiny_dir
    with pytest.raises(FileNotFoundError, match="GGUF"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        resolve_model_dir(str(tmp_path / "missing"))


def test_a_conversion_published_twice_keeps_the_first_copy(tmp_path, tiny_dir):
    """Two processes converting the same GGUF at once (two daemons starting on one host): the one
    that finishes second keeps the first's copy instead of failing on a non-empty directory."""
    import shutil

    target = tmp_path / "models" / "model-0123"
    target.parent.mkdir()
    first, second = tmp_path / ".convert-a", tmp_path / ".convert-b"
    shutil.copytree(tiny_dir, first)
    shutil.copytree(tiny_dir, second)
    (second / "marker").write_text("second")
    assert publish(first, target) == target and not first.exists()
    before = {path.name: path.read_bytes() for path in target.iterdir()}
    assert publish(second, target) == target
    assert not second.exists()  # ours is dropped, not left behind in the cache
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before
    assert AutoModelForCausalLM.from_pretrained(target) is not None

    stray = tmp_path / "models" / "model-4567"
    (stray / "junk").mkdir(parents=True)
    third = tmp_path / ".convert-c"
    shutil.copytree(tiny_dir, third)
    with pytest.raises(OSError, match="model-4567: exists but holds no converted model"):
        publish(third, stray)


def test_jobs_sharing_an_out_directory_each_get_a_whole_bundle(tmp_path, tiny_dir, monkeypatch):
    """Experiments started together with one --out: each copies the cached bundle into the same
    directory. Each must get a whole, verified bundle; before, one failed in rmtree or copytree."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    base, tokenizer, _ = load_base(str(tiny_dir))
    config = EmulatorConfig(SandwichShape(2, 2, 2), DistillConfig(steps=0))
    first = prepare_bundle(base, tokenizer, config, tmp_path / "job", progress=False)  # fills the cache
    (tmp_path / "job" / "emulator.safetensors").write_bytes(b"damaged")  # a copy to be replaced, not reused

    def prepare(_):
        return prepare_bundle(base, tokenizer, config, tmp_path / "job", progress=False).digest

    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(prepare, range(48)))
    assert set(digests) == {first.digest}
    assert read_bundle(tmp_path / "job").digest == first.digest  # the hashes of every file checked again
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left behind


@pytest.mark.parametrize("fault", ["missing train", "malformed test", "unknown setting"])
def test_eval_job_refuses_bad_input_before_loading_anything(tmp_path, task, monkeypatch, fault):
    """A typo in a path, a bad row or a bad setting fails at once, naming it, not after the model
    loaded and the emulator was distilled; nothing is written."""
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    train, test = task
    settings = SETTINGS
    if fault == "missing train":
        train, expected = tmp_path / "trian.jsonl", "trian.jsonl"
    elif fault == "malformed test":
        test.write_text(test.read_text() + '{"prompt": "x", "choices": [" a"], "answer": 3}\n')
        expected = "test.jsonl:11"
    else:
        settings, expected = ("plug_in", "plug-in"), "unknown settings"
    # a model that cannot be loaded: reaching it would fail with a different error
    preset = Preset("tiny", str(tmp_path / "no-such-model"), SandwichShape(2, 2, 2), DistillConfig(steps=5))
    job = EvalJob(
        preset=preset,
        train=train,
        test=test,
        out=tmp_path / "job",
        task="even",
        tune=TuneConfig(steps=1),
        settings=settings,
    )
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        run_eval_job(job, progress=False)
    assert not (tmp_path / "job").exists() and not (tmp_path / "cache").exists()


def test_eval_job_tunes_on_the_emulator_only_for_the_settings_that_need_it(tmp_path, tiny_dir, task, monkeypatch):
    """Emulator zero-shot and full FT alone: the emulator is scored but not tuned (that run is
    minutes of waste on a real model), and no adapter is written."""
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    train, test = task
    preset = Preset("tiny", str(tiny_dir), SandwichShape(2, 2, 2), DistillConfig(steps=0))
    tune = TuneConfig(steps=2, batch_size=4, lr=1e-3, device="cpu")
    job = EvalJob(
        preset=preset,
        train=train,
        test=test,
        out=tmp_path / "job",
        task="even",
        tune=tune,
        settings=("emulator_zero_shot", "full_ft"),
    )
    report = run_eval_job(job, progress=False)
    assert set(report.results) == {"emulator_zero_shot", "full_ft"}
    assert "full_tuning" in report.meta and "emulator_tuning" not in report.meta
    assert not (tmp_path / "job" / "adapter.safetensors").exists() and not (tmp_path / "job" / "plug_in").exists()


def test_eval_runs_in_pieces_join_into_the_whole_table(tmp_path, tiny_dir, task, monkeypatch):
    """Two `offsite eval --settings` runs of one recipe make one five-setting table, each setting
    as its own run scored it; a third run on another test file is refused, not mixed in."""
    from offsite.cloud.combine import ReportError, combine
    from offsite.protocol.bundle import sha256_file

    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    train, test = task
    preset = Preset("tiny", str(tiny_dir), SandwichShape(2, 2, 2), DistillConfig(steps=0))
    tune = TuneConfig(steps=2, batch_size=4, lr=1e-3, device="cpu")

    def run(name, settings, test=test):
        return run_eval_job(
            EvalJob(
                preset=preset, train=train, test=test, out=tmp_path / name, task="even", tune=tune, settings=settings
            ),
            progress=False,
        )

    first = run("a", ("full_zero_shot", "emulator_ft", "plug_in"))
    rest = run("b", ("emulator_zero_shot", "full_ft"))
    assert first.meta["test_sha256"] == sha256_file(test) and first.meta["bundle_digest"] == rest.meta["bundle_digest"]
    (joined,) = combine([tmp_path / "a", tmp_path / "b"])
    assert set(joined.results) == set(SETTINGS)
    for piece in (first, rest):
        for setting, result in piece.results.items():
            assert joined.results[setting]["correct"] == result["correct"]
    assert joined.privacy_gap == pytest.approx(first.accuracy("plug_in") - first.accuracy("emulator_ft"))
    assert joined.utility_gap == pytest.approx(rest.accuracy("full_ft") - first.accuracy("plug_in"))

    other = tmp_path / "other.jsonl"
    other.write_text(test.read_text().replace("Is 30 even?", "Is 30 odd?"))
    run("c", ("full_zero_shot",), test=other)
    with pytest.raises(ReportError, match="differ in 'test_sha256'"):
        combine([tmp_path / "a", tmp_path / "c"])
