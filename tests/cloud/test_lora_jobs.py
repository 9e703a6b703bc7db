"""Federated LoRA: the three aggregations' arithmetic, what a LoRA job refuses, and one round of
each rule in process (the coordinator's AdapterRule with the data owner's tuning path)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from offsite.client.channels import TunedUpdate
from offsite.client.local import tune_on_bundle
from offsite.cloud.adapter_rule import AdapterRule
from offsite.cloud.aggregate import fedavg, lora_stack
from offsite.cloud.fed_job import FEDERATED_TUNING, FedJobConfig, JobError, SecurityConfig
from offsite.emulator.data import Example
from offsite.emulator.lora import LoRASpec
from offsite.emulator.sandwich import SandwichShape
from offsite.protocol.bundle import read_bundle
from offsite.protocol.dp import noise_generator
from tests.conftest import tiny_model, write_tiny_bundle

OUT, IN, RANK, ALPHA = 6, 5, 2, 4.0
WEIGHTS = [3.0, 5.0, 8.0]


def random_factors(seed: int, a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.q.lora_A": a if a is not None else torch.randn(RANK, IN, generator=generator, dtype=torch.float64),
        "blocks.0.q.lora_B": torch.randn(OUT, RANK, generator=generator, dtype=torch.float64),
    }


def mean_of_products(updates) -> torch.Tensor:
    """sum_i p_i (alpha/r) B_i A_i: the exact global update."""
    total = sum(weight for _, weight in updates)
    return sum(
        weight / total * (ALPHA / RANK) * state["blocks.0.q.lora_B"] @ state["blocks.0.q.lora_A"]
        for state, weight in updates
    )


def product(state) -> torch.Tensor:
    return (ALPHA / RANK) * state["blocks.0.q.lora_B"] @ state["blocks.0.q.lora_A"]


def test_stack_is_the_weighted_mean_of_the_products():
    updates = [(random_factors(seed), weight) for seed, weight in enumerate(WEIGHTS)]
    weight = torch.randn(OUT, IN, dtype=torch.float64)
    merged = lora_stack({"blocks.0.q.weight": weight}, updates, ALPHA)
    torch.testing.assert_close(merged["blocks.0.q.weight"] - weight, mean_of_products(updates), rtol=0, atol=1e-12)
    # GPT-2's Conv1D stores (in, out): the same update, transposed
    transposed = lora_stack({"blocks.0.q.weight": weight.T.contiguous()}, updates, ALPHA, transposed=True)
    expected = mean_of_products(updates)
    torch.testing.assert_close(transposed["blocks.0.q.weight"].T - weight, expected, atol=1e-12, rtol=0)


def test_frozen_a_mean_of_b_is_exact_and_naive_factors_are_not():
    shared_a = torch.randn(RANK, IN, dtype=torch.float64)
    frozen = [(random_factors(seed, a=shared_a), weight) for seed, weight in enumerate(WEIGHTS)]
    torch.testing.assert_close(product(fedavg(frozen)), mean_of_products(frozen), rtol=0, atol=1e-12)
    # every owner trains its own A: the mean of the factors is not the mean of the products
    free = [(random_factors(seed), weight) for seed, weight in enumerate(WEIGHTS)]
    error = (product(fedavg(free)) - mean_of_products(free)).abs().max()
    assert error > 0.1 * mean_of_products(free).abs().max()


def job(aggregation: str = "frozen-a", **changes) -> FedJobConfig:
    frozen = aggregation == "frozen-a"
    lora = LoRASpec(rank=RANK, alpha=ALPHA, freeze_a=frozen, init_seed=0 if frozen else None)
    tuning = dataclasses.replace(FEDERATED_TUNING, mode="lora", lora=lora, steps=2, batch_size=2, lr=1e-2)
    return FedJobConfig(tuning=tuning, lora_aggregation=aggregation, **changes)


@pytest.mark.parametrize("aggregation", ["stack", "factors"])
@pytest.mark.parametrize(
    "security",
    [
        SecurityConfig(secure_aggregation=True),
        SecurityConfig(dp_clip_norm=0.1, dp_noise_multiplier=1.0, dp_mode="local"),
    ],
    ids=["secure-aggregation", "dp"],
)
def test_sums_only_go_with_frozen_a(aggregation, security):
    with pytest.raises(JobError, match=f"lora_aggregation '{aggregation}' cannot go with secure aggregation or DP"):
        job(aggregation, security=security, job_id="j1", min_replies=3, min_nodes=3)
    job("frozen-a", security=security, job_id="j1", min_replies=3, min_nodes=3)  # the exact one that composes


def test_a_lora_job_states_its_aggregation_consistently():
    with pytest.raises(JobError, match="lora_aggregation 'sum' is not one of"):
        FedJobConfig(lora_aggregation="sum")
    unseeded = dataclasses.replace(job().tuning, lora=LoRASpec(freeze_a=True))
    with pytest.raises(JobError, match="shares A through the job: set tuning.lora.init_seed"):
        FedJobConfig(tuning=unseeded)
    with pytest.raises(JobError, match="stack' is an exact weighted mean: aggregator must be 'fedavg'"):
        job("stack", aggregator="median")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-bundle")
    return read_bundle(write_tiny_bundle(tmp / "bundle", tiny_model("llama", n_blocks=4), SandwichShape(1, 1, 1)).root)


EXAMPLES = [Example(f"owner note {i}: ", f"a{i % 3}") for i in range(6)]


@pytest.mark.parametrize("aggregation", ["frozen-a", "stack", "factors"])
def test_one_round_of_each_rule_from_the_owners_tuning_path(bundle, aggregation):
    config = job(aggregation)
    rule = AdapterRule.for_job(config, bundle)
    start = rule.initial()
    replies = []
    for seed, weight in zip((1, 2, 3), WEIGHTS, strict=True):
        tuning = dataclasses.replace(config.round_tuning(1), seed=seed)
        reply = tune_on_bundle(bundle, EXAMPLES, tuning, start={k: v.clone() for k, v in start.items()}, progress=False)
        like = rule.reply_like(start)
        assert set(reply.adapter) == set(like) and all(reply.adapter[k].shape == like[k].shape for k in like)
        replies.append((reply.adapter, weight))
    new = rule.combine(start, replies)
    assert set(new) == set(start)
    if aggregation == "frozen-a":  # only B travels; A is the job's, drawn by every owner from its seed
        assert all(key.endswith(".lora_B") for key in start)
        a = {k: v for k, v in rule.factors.items() if k.endswith(".lora_A")}
        checkpoint = rule.checkpoint(new)
        assert set(checkpoint) == set(rule.factors) and rule.from_checkpoint(checkpoint) == new
        assert all(torch.equal(checkpoint[k], a[k]) for k in a)
    if aggregation == "stack":  # the blocks moved by exactly the weighted mean of the products
        assert all(k.endswith(".weight") or "norm" in k for k in start)
        key = next(k for k in replies[0][0] if k.endswith(".lora_A"))
        stem = key[: -len(".lora_A")]
        total = sum(WEIGHTS)
        expected = sum(
            w / total * (ALPHA / RANK) * (r[stem + ".lora_B"].double() @ r[key].double()) for r, w in replies
        )
        moved = new[stem + ".weight"].double() - start[stem + ".weight"].double()
        torch.testing.assert_close(moved, expected, atol=1e-6, rtol=1e-5)


def test_dp_on_a_frozen_a_job_clips_and_noises_b_only_and_keeps_the_jobs_a(bundle):
    """Local DP on LoRA: what leaves an owner is start + clip(B - start) + N(0, (zC)^2), B only;
    the mean of those is the new B and the checkpoint's A is still the one drawn from the job's seed."""
    clip, multiplier = 1e-3, 0.5
    config = job("frozen-a", security=SecurityConfig(dp_clip_norm=clip, dp_noise_multiplier=multiplier))
    rule = AdapterRule.for_job(config, bundle)
    start = rule.initial()
    instruction = config.instruction(1, bundle.digest)
    assert instruction.dp is not None and instruction.dp.noise_std == pytest.approx(clip * multiplier)
    replies = []
    for seed in (1, 2, 3):
        tuning = dataclasses.replace(config.round_tuning(1), seed=seed)
        tuned = tune_on_bundle(bundle, EXAMPLES, tuning, start={k: v.clone() for k, v in start.items()}, progress=False)
        update = TunedUpdate.of(instruction, start, tuned.adapter, {"num-examples": 6.0}, noise_seed=seed)
        sent = update.adapter()
        assert set(sent) == set(start) and all(key.endswith(".lora_B") for key in sent)
        delta = {k: tuned.adapter[k].double() - start[k].double() for k in start}
        norm = sum(float((d**2).sum()) for d in delta.values()) ** 0.5
        assert norm > clip  # the tuning moved B further than C: clipping is exercised
        generator = noise_generator(seed)
        for key in start:  # same order as the mechanism draws
            noise = clip * multiplier * torch.randn(tuple(start[key].shape), generator=generator, dtype=torch.float64)
            expected = start[key].double() + delta[key] * (clip / norm) + noise
            torch.testing.assert_close(sent[key].double(), expected.to(start[key].dtype).double(), rtol=0, atol=1e-7)
        assert update.weight == 1  # no example count leaves the node under DP
        replies.append((sent, update.weight))
    new = rule.combine(start, replies)
    for key in start:
        torch.testing.assert_close(new[key], sum(r[key] for r, _ in replies) / 3, rtol=1e-6, atol=1e-7)
    checkpoint = rule.checkpoint(new)
    a = {k: v for k, v in rule.factors.items() if k.endswith(".lora_A")}
    assert a and all(torch.equal(checkpoint[k], a[k]) for k in a)
