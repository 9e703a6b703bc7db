"""Shared parts of the Flower end-to-end tests: a job on a tiny random llama (2 rounds, 3 data
owners of different sizes), the owners' private rows, and the check that every round's checkpoint
is the weighted FedAvg of the updates the clients sent. ``test_flower_secure`` runs it over TLS
with node authentication, ``test_flower_envelopes`` with signed bundles and sealed updates."""

from __future__ import annotations

import dataclasses
import json

import torch

from offsite.cloud.aggregate import fedavg
from offsite.cloud.fed_job import FEDERATED_TUNING, FedJobConfig, checkpoint_path, update_path, write_job
from offsite.emulator.sandwich import SandwichShape
from offsite.protocol.adapter import load_update
from tests.conftest import tiny_model, write_jsonl, write_tiny_bundle

NUM_EXAMPLES = [3, 5, 8]  # different sizes, so weighted and unweighted means differ


def make_job(tmp_path, rounds: int = 2):
    job_dir = tmp_path / "job"
    write_tiny_bundle(job_dir / "bundle", tiny_model("llama", n_blocks=6), SandwichShape(1, 2, 1), tmp_path)
    tuning = dataclasses.replace(FEDERATED_TUNING, steps=2, batch_size=2, lr=1e-2, max_length=32)
    write_job(
        job_dir,
        FedJobConfig(
            rounds=rounds,
            min_nodes=3,
            min_replies=3,
            round_timeout=90,
            node_wait_timeout=60,
            bundle_timeout=60,
            bundle_part_bytes=1 << 20,
            record_updates=True,
            tuning=tuning,
        ),
    )
    return job_dir


def data_rows(rows: int, seed: int) -> list[dict]:
    """A data owner's private rows: text distinctive enough to be searched for on the wire."""
    return [{"prompt": f"owner{seed} private note {i}: ", "completion": f"a{(i * 7 + seed) % 10}"} for i in range(rows)]


def data_file(path, rows: int, seed: int):
    write_jsonl(path, data_rows(rows, seed))
    return path


def assert_rounds_are_weighted_means(job_dir, rounds: int) -> dict:
    """Every round completed on all 3 nodes, and each checkpoint is the weighted mean of what the
    clients sent (the recorded updates); returns state.json."""
    state = json.loads((job_dir / "state.json").read_text())
    assert state["completed_round"] == rounds
    assert len(state["nodes_with_bundle"]) == 3
    for round_number in range(1, rounds + 1):
        record = state["history"][round_number - 1]
        assert len(record["replied"]) == 3 and not record["failed"] and not record["dropped"]
        assert sorted(record["num_examples"].values()) == sorted(NUM_EXAMPLES)
        updates = []
        for node in record["replied"]:
            tensors, meta = load_update(update_path(job_dir, round_number, node))
            assert meta["num_examples"] == record["num_examples"][str(node)]
            updates.append((tensors, float(meta["num_examples"])))
        expected = fedavg(updates)
        got, _ = load_update(checkpoint_path(job_dir, round_number))
        previous, _ = load_update(checkpoint_path(job_dir, round_number - 1))
        for key, tensor in expected.items():
            assert torch.allclose(got[key], tensor, atol=1e-6), key
        # the round did something: the global moved, and the clients did not all send the same
        assert any(not torch.allclose(got[k], previous[k]) for k in got)
        assert any(not torch.allclose(updates[0][0][k], updates[1][0][k]) for k in got)
    return state
