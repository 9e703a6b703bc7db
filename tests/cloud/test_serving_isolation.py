"""Nothing one request carries fails another: sampling at any accepted temperature, a job whose
scores overflow, a row whose forward raises. Each failing row fails alone, its batch-mates decode
exactly what they decode without it, and a later request in its cache slot is not touched by it."""

from __future__ import annotations

import pytest
import torch

from offsite.cloud.presets import MAX_GAIN, check_gain
from offsite.cloud.serving.engine import LlamaStack, Request, SamplingParams, Scheduler
from offsite.cloud.serving.registry import RegistryError, ServedJob, served_job
from tests.cloud.serving_setup import (  # noqa: F401 (one_thread: a fixture)
    ADAPTER_BLOCKS,
    four_jobs,
    greedy,
    one_thread,
    outcome,
    perturbed_blocks,
    tiny_base,
)

# Temperatures inside the accepted range [0, 2] that overflowed the old float32 softmax to NaN:
# 1.4e-45 is the smallest float32 (what gRPC's float field carries for 1e-45), 5e-324 the smallest float64.
TINY_TEMPERATURES = (1e-45, 1.401298464324817e-45, 1e-300, 1e-320, 5e-324)


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 98, (3 + (7 * i) % 19,), generator=generator).tolist() for i in range(count)]


def _overflowing_job(base) -> ServedJob:
    """Whole adapter blocks with finite weights (they pass the registry's checks) so large that
    the block's MLP overflows float64 to inf, and the row's scores to NaN."""
    huge = {key: value * 1e200 if "mlp" in key else value for key, value in perturbed_blocks(base, 9).items()}
    return served_job("overflowing", huge, {"mode": "blocks"}, base)


def test_tiny_temperatures_sample_the_most_likely_token_and_fail_nothing():
    base = tiny_base()
    spec = four_jobs(base)[0]
    job, plugged = served_job(spec.name, spec.tensors, spec.meta, base), spec.plugged(base)
    scheduler = Scheduler(LlamaStack(base, slots=16), eos_ids=set())
    try:
        prompts = _prompts(2 * len(TINY_TEMPERATURES), seed=1)
        requests = [
            Request(
                job,
                p,
                SamplingParams(
                    max_tokens=8,
                    temperature=TINY_TEMPERATURES[i % len(TINY_TEMPERATURES)],
                    top_p=1.0 if i % 2 else 0.5,
                    seed=i,
                ),
            )
            for i, p in enumerate(prompts)
        ]
        for request in requests:  # one batch: a failing row would take the others with it
            scheduler.submit(request)
        for i, request in enumerate(requests):
            tokens, end = outcome(request)
            assert end == "done:length", (request.params.temperature, end)
            assert tokens == greedy(plugged, request.prompt, 8), request.params.temperature  # T -> 0 is the argmax
        assert scheduler.stats.errors == 0
    finally:
        scheduler.close()


def test_a_job_whose_scores_overflow_fails_alone_and_leaves_its_slot_clean():
    base = tiny_base()
    specs = four_jobs(base)
    healthy = [served_job(s.name, s.tensors, s.meta, base) for s in specs] + [None]
    references = [s.plugged(base) for s in specs] + [base]
    broken = _overflowing_job(base)
    scheduler = Scheduler(LlamaStack(base, slots=12), eos_ids=set())
    try:
        for wave in range(2):  # the second wave decodes in the slots the broken rows failed in
            prompts = _prompts(10, seed=10 + wave)
            good = [
                Request(healthy[i % 5], p, SamplingParams(max_tokens=6 + i % 4, temperature=0))
                for i, p in enumerate(prompts)
            ]
            bad = [Request(broken, [7] * 30, SamplingParams(max_tokens=8, temperature=t, seed=3)) for t in (0, 0.7)]
            for request in (bad[:1] + good + bad[1:]) if wave == 0 else good:
                scheduler.submit(request)
            for i, request in enumerate(good):
                tokens, end = outcome(request)
                assert end == "done:length", (wave, i, end)
                assert tokens == greedy(references[i % 5], request.prompt, request.params.max_tokens), (wave, i)
            for request in bad if wave == 0 else []:
                tokens, end = outcome(request)
                assert end.startswith("error:") and "non-finite" in end and "Traceback" not in end, end
        assert scheduler.stats.errors == 2
    finally:
        scheduler.close()


def test_a_row_whose_forward_raises_fails_alone():
    """A job the forward pass cannot run (its LoRA factors do not fit the block: built directly,
    past the registry's checks) fails the batch's forward; its rows fail, the others are served."""
    base = tiny_base()
    spec = four_jobs(base)[2]  # LoRA
    job, plugged = served_job(spec.name, spec.tensors, spec.meta, base), spec.plugged(base)
    unfit = ServedJob(
        "unfit",
        "lora",
        lora={
            ADAPTER_BLOCKS[0]: {
                "self_attn.q_proj": (torch.ones(2, 5, dtype=base.dtype), torch.ones(32, 2, dtype=base.dtype), 1.0)
            }
        },
    )
    scheduler = Scheduler(LlamaStack(base, slots=8), eos_ids=set())
    try:
        prompts = _prompts(6, seed=4)
        good = [
            Request(job if i % 2 else None, p, SamplingParams(max_tokens=7, temperature=0))
            for i, p in enumerate(prompts)
        ]
        bad = Request(unfit, [3, 4, 5], SamplingParams(max_tokens=5, temperature=0))
        for request in good[:3] + [bad] + good[3:]:
            scheduler.submit(request)
        for i, request in enumerate(good):
            tokens, end = outcome(request)
            assert end == "done:length", end
            assert tokens == greedy(plugged if i % 2 else base, request.prompt, 7)
        tokens, end = outcome(bad)
        assert tokens == [] and end.startswith("error:generation failed") and "shape" not in end, end
        assert scheduler.stats.errors == 1
    finally:
        scheduler.close()


def test_the_plugin_gain_is_bounded_and_served_tensors_are_finite():
    assert check_gain(MAX_GAIN) == MAX_GAIN and check_gain(1.5) == 1.5
    for bad in (1e308, MAX_GAIN * 1.01, float("inf")):
        with pytest.raises(ValueError, match="plug-in gain must"):
            check_gain(bad)
    base = tiny_base(dtype=torch.float32)
    blocks = perturbed_blocks(base, 1)
    with pytest.raises(RegistryError, match="plug-in gain must be at most"):
        served_job("x", blocks, {"mode": "blocks", "plugin_gain": 1e308}, base)
    nan = dict(blocks) | {
        "blocks.0.mlp.up_proj.weight": torch.full_like(blocks["blocks.0.mlp.up_proj.weight"], float("nan"))
    }
    with pytest.raises(RegistryError, match="non-finite"):
        served_job("x", nan, {"mode": "blocks"}, base)
    overflow = {key: value * 1e38 for key, value in blocks.items()}  # finite in float32; x gain 10 is not
    with pytest.raises(RegistryError, match="not finite as served"):
        served_job("x", overflow, {"mode": "blocks", "plugin_gain": 10.0}, base)
