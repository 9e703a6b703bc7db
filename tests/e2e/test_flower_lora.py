"""Federated LoRA on Flower's deployment engine: TLS, SuperNode authentication, a signed bundle,
three enrolled data owners, and the tiny llama of the other end-to-end tests.

A 2-round ``frozen-a`` LoRA job runs in the clear and again with envelopes: the sealed job's
checkpoints equal the plain job's bit for bit. A ``stack`` job runs one round. Every round is the
exact aggregate of what the owners sent (frozen-a: the weighted mean of B, with the job's A;
stack: the blocks moved by the weighted mean of the products B A). Then a frozen-a job under
secure aggregation: its round equals the plain job's within the stated quantisation bound.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from offsite.cloud.aggregate import fedavg, lora_stack
from offsite.cloud.certs import write_deployment_certs
from offsite.cloud.fed_job import FedJobConfig, SecurityConfig, checkpoint_path, update_path
from offsite.emulator.lora import LoRASpec
from offsite.harness.federation import LocalFederation
from offsite.protocol.adapter import load_update
from tests.e2e.flower_jobs import NUM_EXAMPLES
from tests.e2e.test_flower_envelopes import HONEST, TUNING, enrol, new_job, signed_bundle, start_owners

RANK, ALPHA = 4, 8.0


def lora_job(aggregation: str, job_id: str, **changes) -> FedJobConfig:
    frozen = aggregation == "frozen-a"
    lora = LoRASpec(rank=RANK, alpha=ALPHA, freeze_a=frozen, init_seed=0 if frozen else None)
    return FedJobConfig(
        rounds=changes.pop("rounds", 2),
        min_nodes=3,
        min_replies=3,
        round_timeout=120,
        node_wait_timeout=90,
        bundle_timeout=90,
        bundle_part_bytes=1 << 20,
        tuning=dataclasses.replace(TUNING, mode="lora", lora=lora),
        lora_aggregation=aggregation,
        job_id=job_id,
        **changes,
    )


def checkpoints(job_dir, rounds: int) -> list[tuple[dict[str, torch.Tensor], dict]]:
    return [load_update(checkpoint_path(job_dir, number)) for number in range(rounds + 1)]


def assert_exact_rounds(job_dir, aggregation: str, rounds: int) -> None:
    """Each round's checkpoint is the exact aggregate of the recorded replies."""
    state = json.loads((job_dir / "state.json").read_text())
    assert state["completed_round"] == rounds
    saved = checkpoints(job_dir, rounds)
    for number in range(1, rounds + 1):
        record = state["history"][number - 1]
        assert len(record["replied"]) == 3 and not record["failed"], record
        replies = [load_update(update_path(job_dir, number, node)) for node in record["replied"]]
        updates = [(tensors, float(meta["num_examples"])) for tensors, meta in replies]
        (before, kind), (after, _) = saved[number - 1], saved[number]
        if aggregation == "frozen-a":  # a LoRA checkpoint: the job's A, and the mean of B
            assert kind["mode"] == "lora" and kind["lora_alpha"] == ALPHA
            assert all(set(tensors) == {k for k in after if k.endswith(".lora_B")} for tensors, _ in updates)
            expected = fedavg(updates)
            assert all(torch.equal(after[k], before[k]) for k in after if k.endswith(".lora_A"))
        else:  # whole blocks moved by the weighted mean of the products
            assert kind["mode"] == "blocks"
            assert all(all(k.endswith((".lora_A", ".lora_B")) for k in tensors) for tensors, _ in updates)
            expected = lora_stack(before, updates, ALPHA)
        for key, tensor in expected.items():
            torch.testing.assert_close(after[key], tensor, atol=1e-6, rtol=1e-5, msg=f"round {number} {key}")
        assert any(not torch.equal(after[k], before[k]) for k in after), f"round {number} changed nothing"


def test_lora_jobs_over_tls_with_envelopes_and_secure_aggregation(tmp_path):
    keys, keys_dir, registry = enrol(tmp_path)
    bundle = signed_bundle(tmp_path, keys)
    certs = write_deployment_certs(tmp_path / "certs", nodes=3)
    sealed_security = SecurityConfig(envelopes=True, keys_dir=str(keys_dir), registry=str(registry))
    plain = new_job(tmp_path / "frozena-plain", bundle, lora_job("frozen-a", "frozena-plain", record_updates=True))
    sealed = new_job(
        tmp_path / "frozena-sealed",
        bundle,
        lora_job("frozen-a", "frozena-sealed", record_updates=True, security=sealed_security),
    )
    stacked = new_job(tmp_path / "stack", bundle, lora_job("stack", "stack-plain", rounds=1, record_updates=True))
    masked = new_job(
        tmp_path / "frozena-secagg",
        bundle,
        lora_job(
            "frozen-a",
            "frozena-secagg",
            rounds=1,
            security=dataclasses.replace(sealed_security, secure_aggregation=True, secagg_clip_range=0.5),
        ),
    )
    owners = {name: (rows, index) for index, (name, rows) in enumerate(zip(HONEST, NUM_EXAMPLES, strict=True))}
    with LocalFederation(tmp_path / "federation", certs=certs) as federation:
        federation.start_superlink()
        start_owners(federation, tmp_path, owners, keys_dir)
        for job_dir in (plain, sealed, stacked, masked):
            run = federation.submit({"job-dir": job_dir})
            assert federation.wait(run, timeout=300) == "finished:completed", federation.logs(run)

    assert json.loads((stacked / "job.json").read_text())["lora_aggregation"] == "stack"
    assert_exact_rounds(stacked, "stack", 1)
    assert_exact_rounds(plain, "frozen-a", 2)
    assert_exact_rounds(sealed, "frozen-a", 2)
    for (got, _), (expected, _) in zip(checkpoints(sealed, 2), checkpoints(plain, 2), strict=True):
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)

    # secure aggregation: the same first round as the plain frozen-a job, within the stated bound
    record = json.loads((masked / "state.json").read_text())["history"][0]
    bound = record["secagg"]["error_bound"]
    (got, _), (expected, _) = load_update(checkpoint_path(masked, 1)), load_update(checkpoint_path(plain, 1))
    assert set(got) == set(expected)
    worst = max(float((got[k].double() - expected[k].double()).abs().max()) for k in got)
    assert worst <= bound + 1e-6, (worst, bound)
    moved = max(float(got[k].abs().max()) for k in got if k.endswith(".lora_B"))
    assert moved > 100 * (bound + 1e-6)  # the round did move B: the comparison is not of two zeros
