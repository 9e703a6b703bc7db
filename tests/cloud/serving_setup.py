"""Shared set-up of the serving tests: a tiny llama base, four jobs (two whole-block, two LoRA of
different ranks and targets) in a registry, and each job's plugged-in model as the reference."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from offsite.cloud.fed_job import FedJobConfig, JobState, save_checkpoint, write_job
from offsite.cloud.plugin import plug_in_update
from offsite.cloud.serving import registry
from offsite.emulator.sandwich import adapter_state_dict
from offsite.protocol.adapter import save_update
from tests.conftest import make_tokenizer, tiny_model

N_BLOCKS = 8
ADAPTER_BLOCKS = [0, 1, 6, 7]
EOS = 1  # the tiny tokenizer's <eos>
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_base(family: str = "llama", dtype: torch.dtype = torch.float64) -> nn.Module:
    model = tiny_model(family, N_BLOCKS).to(dtype)
    model.config.eos_token_id = EOS
    model.generation_config.eos_token_id = EOS
    return model


def chat_tokenizer():
    tokenizer = make_tokenizer(None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def perturbed_blocks(base: nn.Module, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The base's adapter blocks plus noise: a stand-in for a tuned whole-block adapter."""
    generator = torch.Generator().manual_seed(seed)
    own = adapter_state_dict(base, list(range(N_BLOCKS)), ADAPTER_BLOCKS)
    return {
        key: value + scale * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        for key, value in own.items()
    }


def lora_factors(
    base: nn.Module, seed: int, rank: int, targets: tuple[str, ...], scale: float = 0.3
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    own = adapter_state_dict(base, list(range(N_BLOCKS)), ADAPTER_BLOCKS)
    factors = {}
    for index in ADAPTER_BLOCKS:
        for stem in targets:
            out_features, in_features = own[f"blocks.{index}.{stem}.weight"].shape
            dtype = own[f"blocks.{index}.{stem}.weight"].dtype
            factors[f"blocks.{index}.{stem}.lora_A"] = scale * torch.randn(
                rank, in_features, generator=generator, dtype=dtype
            )
            factors[f"blocks.{index}.{stem}.lora_B"] = scale * torch.randn(
                out_features, rank, generator=generator, dtype=dtype
            )
    return factors


@dataclass
class JobSpec:
    name: str
    tensors: dict[str, torch.Tensor]
    lora_alpha: float | None = None
    plugin_gain: float = 1.0

    @property
    def meta(self) -> dict:
        return {
            "mode": "lora" if self.lora_alpha else "blocks",
            "lora_alpha": self.lora_alpha,
            "plugin_gain": self.plugin_gain,
        }

    def plugged(self, base: nn.Module) -> nn.Module:
        return plug_in_update(base, self.tensors, ADAPTER_BLOCKS, self.lora_alpha, self.plugin_gain)


def four_jobs(base: nn.Module) -> list[JobSpec]:
    return [
        JobSpec("alpha", perturbed_blocks(base, 1)),
        JobSpec("beta", perturbed_blocks(base, 2), plugin_gain=1.5),  # the recipe's plug-in gain, from job.json
        JobSpec("gamma", lora_factors(base, 3, 4, ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")), 8.0),
        JobSpec(
            "delta",
            lora_factors(
                base, 4, 2, ("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
            ),
            4.0,
            plugin_gain=0.5,
        ),  # from the update file's metadata
    ]


def finished_job_dir(root: Path, adapter: dict[str, torch.Tensor], rounds: int = 2, plugin_gain: float = 1.0) -> Path:
    """A federated job directory (job.json, and a state.json that names its last round's checkpoint)."""
    write_job(root, FedJobConfig(rounds=rounds, plugin_gain=plugin_gain))
    state = JobState(bundle="0" * 64)
    for round_number in range(1, rounds + 1):
        save_checkpoint(root, state, round_number, adapter, {"round": round_number})
    return root


def fill_registry(path: Path, base: nn.Module, jobs: list[JobSpec], sources: Path) -> Path:
    """Register ``jobs``: whole-block ones from finished job directories, LoRA ones from update files."""
    for job in jobs:
        if job.lora_alpha is None:
            source = finished_job_dir(sources / job.name, job.tensors, plugin_gain=job.plugin_gain)
        else:
            source = save_update(sources / f"{job.name}.safetensors", job.tensors, job.meta)
        registry.add(path, job.name, source, base=base)
    return path


def greedy(model: nn.Module, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The plain greedy loop on one model, one request alone (no cache); stops before ``eos``."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                break
            ids.append(token)
    return ids[len(prompt) :]


@pytest.fixture
def one_thread():
    """The engine's tests run torch on one thread (and give the caller's count back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outcome(request, timeout: float = 60.0) -> tuple[list[int], str]:
    """A queued engine request's tokens and how it ended: ``"done:<reason>"`` or ``"error:<message>"``."""
    tokens = []
    deadline = time.monotonic() + timeout
    while True:
        kind, value = request.events.get(timeout=max(0.1, deadline - time.monotonic()))
        if kind == "token":
            tokens.append(value)
        else:
            return tokens, f"{kind}:{value}"
