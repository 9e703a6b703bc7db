"""The batched decoder: a mixed batch over several jobs decodes exactly what each job's plugged-in
model decodes alone; the registry refuses adapters that do not fit the base model."""

from __future__ import annotations

import time

import pytest
import torch

from offsite.cloud.serving import registry
from offsite.cloud.serving.engine import LlamaStack, Request, SamplingParams, Scheduler
from offsite.cloud.serving.registry import RegistryError, served_job
from offsite.emulator.arch import UnsupportedModelError
from offsite.protocol.adapter import save_update
from tests.cloud.serving_setup import (
    ADAPTER_BLOCKS,
    finished_job_dir,
    four_jobs,
    greedy,
    lora_factors,
    one_thread,  # noqa: F401 (a fixture)
    perturbed_blocks,
    tiny_base,
)
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _collect(request: Request, timeout: float = 60.0) -> tuple[list[int], str]:
    tokens = []
    deadline = time.monotonic() + timeout
    while True:
        kind, value = request.events.get(timeout=max(0.1, deadline - time.monotonic()))
        if kind == "token":
            tokens.append(value)
        elif kind == "done":
            return tokens, value
        else:
            raise AssertionError(value)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 98, (2 + (5 * i) % 23,), generator=generator).tolist() for i in range(count)]


def test_mixed_batch_over_four_jobs_matches_each_plugged_in_model():
    """18 requests over 4 jobs (2 whole-block, 2 LoRA of ranks 4 and 2) and the bare base, in three
    waves that join while the earlier ones decode: greedy tokens equal each job's plugged-in model
    (LoRA merged into its blocks) run alone."""
    base = tiny_base()
    specs = four_jobs(base)
    jobs = [served_job(s.name, s.tensors, s.meta, base) for s in specs] + [None]
    references = [s.plugged(base) for s in specs] + [base]
    scheduler = Scheduler(LlamaStack(base, slots=16), eos_ids=set())
    try:
        prompts = _prompts(18)
        requests = [
            Request(jobs[i % 5], p, SamplingParams(max_tokens=10 + (3 * i) % 17, temperature=0))
            for i, p in enumerate(prompts)
        ]
        for wave in range(3):
            steps = scheduler.stats.steps
            for request in requests[6 * wave : 6 * wave + 6]:
                scheduler.submit(request)
            deadline = time.monotonic() + 30
            while scheduler.stats.steps == steps and time.monotonic() < deadline:  # the wave is decoding
                time.sleep(0.001)
        for i, request in enumerate(requests):
            tokens, reason = _collect(request)
            expected = greedy(references[i % 5], request.prompt, request.params.max_tokens)
            assert tokens == expected, f"request {i} ({jobs[i % 5].name if jobs[i % 5] else 'base'})"
            assert reason == "length"
        stats = scheduler.stats
        assert stats.max_jobs_in_step == 5  # the four jobs and the base in one forward pass
        assert stats.max_rows > 6  # a wave joined rows that were still decoding
        assert len(stats.histogram) > 3  # rows joined and left between steps
    finally:
        scheduler.close()


def test_eos_stops_a_row_and_the_others_go_on():
    base = tiny_base()
    spec = four_jobs(base)[0]
    job = served_job(spec.name, spec.tensors, spec.meta, base)
    plugged = spec.plugged(base)
    prompts = _prompts(6, seed=3)
    # pick as "eos" a token that the plugged-in model emits early for the first prompt
    stop_token = greedy(plugged, prompts[0], 4)[2]
    scheduler = Scheduler(LlamaStack(base, slots=4), eos_ids={stop_token})
    try:
        requests = [Request(job, p, SamplingParams(max_tokens=12, temperature=0)) for p in prompts]
        for request in requests:
            scheduler.submit(request)
        for request in requests:  # more requests than slots: the rest wait, then join
            tokens, reason = _collect(request)
            assert tokens == greedy(plugged, request.prompt, 12, eos=stop_token)
            assert reason == ("stop" if len(tokens) < 12 else "length")
        assert scheduler.stats.max_rows <= 4
    finally:
        scheduler.close()


def test_cancelled_request_frees_its_slot_and_sampling_is_seeded():
    base = tiny_base()
    scheduler = Scheduler(LlamaStack(base, slots=2), eos_ids=set())
    try:
        long = Request(None, [5, 6, 7], SamplingParams(max_tokens=200, temperature=0))
        scheduler.submit(long)
        assert long.events.get(timeout=30)[0] == "token"
        long.cancel()
        sampled = [
            Request(None, [5, 6, 7], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42))
            for _ in range(3)
        ]
        for request in sampled:
            scheduler.submit(request)
        runs = [_collect(request)[0] for request in sampled]
        assert runs[0] == runs[1] == runs[2]  # same seed, same tokens, whatever the batch
        deadline = time.monotonic() + 10
        while scheduler.load()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.load() == {"active": 0, "waiting": 0}
    finally:
        scheduler.close()


def test_context_limit_ends_with_length():
    base = tiny_base()
    scheduler = Scheduler(LlamaStack(base, max_context=12, slots=2), eos_ids=set())
    try:
        request = Request(None, list(range(2, 12)), SamplingParams(max_tokens=50, temperature=0))
        scheduler.submit(request)
        tokens, reason = _collect(request)
        assert (len(tokens), reason) == (2, "length")  # 10 prompt tokens + 2 = the limit of 12
        with pytest.raises(ValueError, match="context limit is 12"):
            scheduler.submit(Request(None, list(range(2, 14)), SamplingParams(max_tokens=1, temperature=0)))
    finally:
        scheduler.close()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_models(family):
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(0)
        config = Qwen3Config(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            initializer_range=0.2,
        )
        base = Qwen3ForCausalLM(config).eval().double()
    else:
        base = tiny_model(family, 8).double()
    jobs = [
        ("b", perturbed_blocks(base, 5), None),
        ("l", lora_factors(base, 6, 3, ("self_attn.q_proj", "mlp.up_proj")), 2.0),
    ]
    from offsite.cloud.plugin import plug_in_update

    served = [served_job(n, t, {"mode": "lora" if a else "blocks", "lora_alpha": a}, base) for n, t, a in jobs]
    refs = [plug_in_update(base, t, ADAPTER_BLOCKS, a) for _, t, a in jobs]
    scheduler = Scheduler(LlamaStack(base, slots=4), eos_ids=set())
    try:
        prompts = _prompts(4, seed=7)
        requests = [
            Request(served[i % 2], p, SamplingParams(max_tokens=6, temperature=0)) for i, p in enumerate(prompts)
        ]
        for request in requests:
            scheduler.submit(request)
        for i, request in enumerate(requests):
            assert _collect(request)[0] == greedy(refs[i % 2], request.prompt, 6)
    finally:
        scheduler.close()


def test_gpt2_and_opt_are_refused_naming_the_supported_families():
    for family in ("gpt2", "opt"):
        with pytest.raises(UnsupportedModelError, match="llama family.*llama, mistral, qwen2, qwen3"):
            LlamaStack(tiny_model(family, 4))


# ---------------------------------------------------------------- the registry


def test_the_registry_applies_the_recipes_plugin_gain(tmp_path):
    """A job's plug-in gain (job.json, or the update file's metadata) is served the way
    `offsite cloud plugin` plugs it in: whole blocks own + gain x (adapter - own), LoRA scaled."""
    import json

    from offsite.emulator.sandwich import adapter_state_dict

    base = tiny_base(dtype=torch.float32)
    blocks = perturbed_blocks(base, 1)
    registry.add(tmp_path / "reg", "fed", finished_job_dir(tmp_path / "job", blocks, plugin_gain=2.0), base=base)
    assert json.loads((tmp_path / "reg" / "fed" / "meta.json").read_text())["plugin_gain"] == 2.0
    fed = registry.load(tmp_path / "reg", "fed", base)
    own = adapter_state_dict(base, list(range(8)), ADAPTER_BLOCKS)
    key = "blocks.6.mlp.up_proj.weight"
    torch.testing.assert_close(fed.blocks[6]["mlp.up_proj.weight"] - own[key], 2.0 * (blocks[key] - own[key]))
    save_update(
        tmp_path / "u.safetensors",
        lora_factors(base, 2, 4, ("self_attn.q_proj",)),
        {"mode": "lora", "lora_alpha": 16.0, "plugin_gain": 0.5},
    )
    registry.add(tmp_path / "reg", "tuned", tmp_path / "u.safetensors", base=base)
    assert registry.load(tmp_path / "reg", "tuned", base).lora[0]["self_attn.q_proj"][2] == 0.5 * 16.0 / 4
    save_update(tmp_path / "bad.safetensors", blocks, {"mode": "blocks", "plugin_gain": -1})
    with pytest.raises(RegistryError, match="bad.safetensors: the plug-in gain must be"):
        registry.add(tmp_path / "reg", "bad", tmp_path / "bad.safetensors", base=base)


def test_a_gain_given_at_registration_overrides_the_sources(tmp_path):
    """A client's update file does not know the recipe's gain: the operator says it when
    registering. The stated gain replaces the source's (job.json's 2.0 here), and a bad one is
    refused before anything is written."""
    import json

    from offsite.emulator.sandwich import adapter_state_dict

    base = tiny_base(dtype=torch.float32)
    blocks = perturbed_blocks(base, 3)
    own = adapter_state_dict(base, list(range(8)), ADAPTER_BLOCKS)
    key = "blocks.1.self_attn.o_proj.weight"
    save_update(tmp_path / "u.safetensors", blocks, {"mode": "blocks"})
    registry.add(tmp_path / "reg", "client", tmp_path / "u.safetensors", base=base, plugin_gain=1.5)
    assert json.loads((tmp_path / "reg" / "client" / "meta.json").read_text())["plugin_gain"] == 1.5
    served = registry.load(tmp_path / "reg", "client", base).blocks[1]["self_attn.o_proj.weight"]
    torch.testing.assert_close(served - own[key], 1.5 * (blocks[key] - own[key]))
    job_dir = finished_job_dir(tmp_path / "job", blocks, plugin_gain=2.0)
    registry.add(tmp_path / "reg", "zero", job_dir, base=base, plugin_gain=0)
    assert torch.equal(registry.load(tmp_path / "reg", "zero", base).blocks[1]["self_attn.o_proj.weight"], own[key])
    for bad in (-0.5, float("nan"), True):
        with pytest.raises(RegistryError, match="registering 'late': the plug-in gain must be"):
            registry.add(tmp_path / "reg", "late", job_dir, base=base, plugin_gain=bad)
    assert not (tmp_path / "reg" / "late").exists()


def test_registry_from_a_finished_job_and_from_an_update_file(tmp_path):
    base = tiny_base(dtype=torch.float32)
    blocks = perturbed_blocks(base, 1)
    job_dir = finished_job_dir(tmp_path / "job", blocks, rounds=3)
    registry.add(tmp_path / "reg", "fed", job_dir, base=base)
    lora = lora_factors(base, 2, 4, ("self_attn.q_proj",))
    save_update(tmp_path / "u.safetensors", lora, {"mode": "lora", "lora_alpha": 16.0})
    registry.add(tmp_path / "reg", "tuned", tmp_path / "u.safetensors", base=base)
    assert registry.names(tmp_path / "reg") == ["fed", "tuned"]
    fed = registry.load(tmp_path / "reg", "fed", base)
    assert fed.mode == "blocks" and fed.adapter_blocks == ADAPTER_BLOCKS and fed.meta["round"] == 3
    assert torch.equal(fed.blocks[6]["mlp.up_proj.weight"], blocks["blocks.6.mlp.up_proj.weight"])
    tuned = registry.load(tmp_path / "reg", "tuned", base)
    assert tuned.mode == "lora" and tuned.lora[0]["self_attn.q_proj"][2] == 16.0 / 4
    with pytest.raises(RegistryError, match="already registered"):
        registry.add(tmp_path / "reg", "fed", job_dir, base=base)
    (tmp_path / "reg" / "fed" / "adapter.safetensors").write_bytes(b"tampered")
    with pytest.raises(RegistryError, match="sha256 does not match"):
        registry.load(tmp_path / "reg", "fed", base)
    registry.remove(tmp_path / "reg", "fed")
    assert registry.names(tmp_path / "reg") == ["tuned"]


def test_registry_refuses_what_does_not_fit(tmp_path):
    base = tiny_base(dtype=torch.float32)
    blocks = perturbed_blocks(base, 1)
    for name in ("base", "../x", "", "a" * 65):
        with pytest.raises(RegistryError, match="job name"):
            registry.check_name(name)
    wrong = dict(blocks) | {"blocks.0.mlp.up_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(RegistryError, match=r"blocks\.0\.mlp\.up_proj\.weight': shape \(3, 3\)"):
        served_job("x", wrong, {"mode": "blocks"}, base)
    partial = {k: v for k, v in blocks.items() if k != "blocks.1.input_layernorm.weight"}
    with pytest.raises(RegistryError, match=r"adapter block 1: .*missing \['blocks\.1\.input_layernorm\.weight'\]"):
        served_job("x", partial, {"mode": "blocks"}, base)
    with pytest.raises(RegistryError, match="names block 8; the base model has blocks 0..7"):
        served_job("x", {"blocks.8.input_layernorm.weight": torch.ones(32)}, {"mode": "blocks"}, base)
    lora = lora_factors(base, 2, 4, ("self_attn.q_proj",))
    with pytest.raises(RegistryError, match="positive 'lora_alpha'"):
        served_job("x", lora, {"mode": "lora"}, base)
    lora["blocks.0.self_attn.q_proj.lora_B"] = torch.zeros(32, 5)
    with pytest.raises(RegistryError, match=r"blocks\.0\.self_attn\.q_proj: LoRA shapes"):
        served_job("x", lora, {"mode": "lora", "lora_alpha": 8}, base)
    with pytest.raises(RegistryError, match="not a finished job"):
        registry.add(tmp_path / "reg", "empty", (tmp_path / "nojob").mkdir() or tmp_path / "nojob", base=base)
    with pytest.raises(RegistryError, match="no such adapter update"):
        registry.add(tmp_path / "reg", "missing", tmp_path / "missing.safetensors", base=base)
    assert registry.names(tmp_path / "reg") == []
