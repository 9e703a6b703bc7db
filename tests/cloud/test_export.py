"""``offsite cloud export``: a LoRA job's factors as a peft adapter that peft loads onto the base
model with our plug-in's logits, the plugged-in model as a HF directory, and the refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.cli import main
from offsite.cloud.adapter_rule import AdapterRule
from offsite.cloud.export import export_job
from offsite.cloud.fed_job import (
    BUNDLE_DIR,
    FEDERATED_TUNING,
    FedJobConfig,
    JobError,
    JobState,
    save_checkpoint,
    write_job,
)
from offsite.cloud.federate.app import open_job
from offsite.cloud.finish import finish_job
from offsite.cloud.plugin import plug_in_update
from offsite.cloud.serving.registry import read_source
from offsite.emulator.lora import LoRASpec
from offsite.emulator.sandwich import SandwichShape
from offsite.protocol.bundle import read_bundle
from tests.conftest import make_tokenizer, tiny_model, write_tiny_bundle

peft = pytest.importorskip("peft")  # a test dependency (pyproject's [test] extra)

GAIN, ALPHA, RANK = 1.5, 8.0, 4
INPUT = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = tiny_model("llama", n_blocks=4)
    model.save_pretrained(root / "base")
    make_tokenizer(root).save_pretrained(root / "base")
    return root / "base"


def make_job(root, base_dir, mode: str):
    """A finished one-round job whose global adapter is random: LoRA factors (frozen-a) or blocks."""
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    job_dir = root / f"job-{mode}"
    bundle = read_bundle(write_tiny_bundle(job_dir / BUNDLE_DIR, base, SandwichShape(1, 1, 1), root).root)
    lora = LoRASpec(rank=RANK, alpha=ALPHA, freeze_a=True, init_seed=0)
    tuning = dataclasses.replace(FEDERATED_TUNING, mode=mode, lora=lora) if mode == "lora" else FEDERATED_TUNING
    config = FedJobConfig(rounds=1, tuning=tuning, base_model=str(base_dir), plugin_gain=GAIN)
    write_job(job_dir, config)
    rule = AdapterRule.for_job(config, bundle)
    generator = torch.Generator().manual_seed(1)
    tuned = {
        key: tensor + 0.05 * torch.randn(tensor.shape, generator=generator) for key, tensor in rule.initial().items()
    }
    state = JobState(bundle=bundle.digest)
    save_checkpoint(job_dir, state, 1, rule.checkpoint(tuned), {"round": 1}, rule.kind)
    return job_dir, rule.checkpoint(tuned), bundle


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def test_the_peft_export_loads_with_peft_and_gives_our_plug_in_logits(tmp_path, base_dir):
    job_dir, factors, bundle = make_job(tmp_path, base_dir, "lora")
    assert main(["cloud", "export", "--job", str(job_dir), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA * GAIN
    assert config["layers_to_transform"] == bundle.adapter_blocks == [0, 3]
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "peft").eval()
    ours = plug_in_update(AutoModelForCausalLM.from_pretrained(base_dir).eval(), factors, [0, 3], ALPHA, gain=GAIN)
    assert (logits(ours) - logits(base)).abs().max() > 1e-3  # the adapter changes the model
    assert (logits(loaded) - logits(ours)).abs().max() <= 1e-5

    # --format hf: the plugged-in model, loadable by transformers alone
    export_job(job_dir, "hf", tmp_path / "hf")
    plugged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (logits(plugged) - logits(ours)).abs().max() <= 1e-5


def test_export_refuses_what_it_cannot_write(tmp_path, base_dir):
    job_dir, _, _ = make_job(tmp_path, base_dir, "blocks")
    with pytest.raises(JobError, match="whole blocks, not LoRA factors: export it with --format hf"):
        export_job(job_dir, "peft", tmp_path / "out")
    export_job(job_dir, "hf", tmp_path / "hf")  # whole blocks go out as the plugged-in model
    assert (tmp_path / "hf" / "config.json").is_file()
    shutil.rmtree(job_dir / "checkpoints")
    (job_dir / "state.json").unlink()
    with pytest.raises(JobError, match="no completed round to export"):
        export_job(job_dir, "hf", tmp_path / "hf2")


def test_a_lora_job_resumes_finishes_and_serves(tmp_path, base_dir):
    job_dir, factors, bundle = make_job(tmp_path, base_dir, "lora")
    resumed = open_job(job_dir)  # frozen-a resumes from B; A is the job's
    assert resumed.state.completed_round == 1 and resumed.rule.name == "frozen-a"
    assert set(resumed.adapter) == {key for key in factors if key.endswith(".lora_B")}
    assert all(torch.equal(resumed.adapter[key], factors[key]) for key in resumed.adapter)

    ours = plug_in_update(AutoModelForCausalLM.from_pretrained(base_dir).eval(), factors, [0, 3], ALPHA, gain=GAIN)
    plugged = AutoModelForCausalLM.from_pretrained(finish_job(job_dir)["plug_in"]).eval()
    assert (logits(plugged) - logits(ours)).abs().max() <= 1e-5

    tensors, meta = read_source(job_dir)  # what `offsite cloud serve --add job=DIR` registers
    assert (meta["mode"], meta["lora_alpha"], meta["plugin_gain"]) == ("lora", ALPHA, GAIN)
    assert set(tensors) == set(factors)
