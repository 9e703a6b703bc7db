"""``offsite cloud simulate``: the deployment's ServerApp and ClientApp on Flower's simulation engine
(Ray), 4 virtual data owners holding a Dirichlet split of a task, 2 rounds on a tiny random llama.
The final adapter is the num-examples-weighted mean of what the clients sent (recomputed here)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import time

import psutil
import pytest
import torch

from offsite.cli import main
from offsite.cloud.fed_job import checkpoint_path, read_job, update_path, write_job
from offsite.protocol.adapter import load_update
from tests.conftest import write_jsonl
from tests.e2e.flower_jobs import make_job

CLIENTS = 4


def task_rows(count: int = 48) -> list[dict]:
    return [{"prompt": f"q{i} ", "choices": [" a", " b", " c"], "answer": (i * 7) % 3} for i in range(count)]


def weighted_mean(updates: list[tuple[dict, float]]) -> dict[str, torch.Tensor]:
    """The oracle: sum_i w_i * t_i / sum_i w_i, in float64."""
    total = sum(weight for _, weight in updates)
    return {key: sum(tensors[key].double() * weight for tensors, weight in updates) / total for key in updates[0][0]}


@pytest.fixture(autouse=True)
def _environment_restored():
    """Ray's in-process driver writes PYTHONPATH (this repo and this venv's site-packages), RAY_* and
    PYTHONBREAKPOINT into os.environ; later tests' subprocesses must not inherit them."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture
def no_leftover_processes():
    """Whatever this test starts (Ray's GCS, raylet, workers) is gone when it ends; stragglers are
    killed by PID and fail the test."""
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}

    def running(child: psutil.Process) -> bool:  # one that exits between listing and reading is gone, not left
        try:
            return child.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    yield
    deadline = time.monotonic() + 20
    while True:
        left = [child for child in me.children(recursive=True) if child.pid not in before and running(child)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    names = []
    for child in left:
        with contextlib.suppress(psutil.NoSuchProcess):  # one that ends while we look has ended
            names.append(f"{child.pid} {child.name()}")
            child.kill()
    assert not names, f"processes left running: {names}"


def test_simulated_rounds_on_a_dirichlet_split(tmp_path, capsys, no_leftover_processes):
    import ray

    job_dir = make_job(tmp_path)  # tiny llama bundle, 2 rounds, record_updates on
    write_job(job_dir, dataclasses.replace(read_job(job_dir), min_nodes=CLIENTS, min_replies=CLIENTS))
    data = tmp_path / "task.jsonl"
    write_jsonl(data, task_rows())

    argv = [
        "cloud",
        "simulate",
        "--job",
        str(job_dir),
        "--data",
        str(data),
        "--clients",
        str(CLIENTS),
        "--alpha",
        "0.5",
        "--seed",
        "3",
        "--min-rows",
        "2",
        "--max-parallel",
        "2",
        "--cpus-per-client",
        "1",
    ]
    assert main(argv) == 0
    assert not ray.is_initialized()
    printed = capsys.readouterr().out
    assert "round 1: 4/4 replied" in printed and "round 2: 4/4 replied" in printed

    # the split: 4 share files in the job, every row in exactly one
    split = json.loads((job_dir / "sim" / "partitions" / "split.json").read_text())
    sizes = sorted(owner["rows"] for owner in split["owners"])
    assert sum(sizes) == 48 and min(sizes) >= 2 and split["method"] == "dirichlet"
    lines = [
        line
        for k in range(CLIENTS)
        for line in (job_dir / "sim" / "partitions" / f"owner-{k}.jsonl").read_text().splitlines()
    ]
    assert sorted(lines) == sorted(json.dumps(row) for row in task_rows())

    state = json.loads((job_dir / "state.json").read_text())
    assert state["completed_round"] == 2 and state["checkpoint"] == "checkpoints/round-0002.safetensors"
    assert len(state["nodes_with_bundle"]) == CLIENTS
    for round_number, record in enumerate(state["history"], start=1):
        assert len(record["replied"]) == CLIENTS and not record["failed"] and not record["dropped"]
        assert sorted(record["num_examples"].values()) == sizes  # each virtual owner trained on its own share
        assert record["coordinator_seconds"] >= 0 and record["checkpoint_seconds"] >= 0
        assert all(seconds > 0 for seconds in record["client_train_seconds"].values())
        updates = []
        for node in record["replied"]:
            tensors, meta = load_update(update_path(job_dir, round_number, node))
            updates.append((tensors, float(meta["num_examples"])))
        got, _ = load_update(checkpoint_path(job_dir, round_number))
        for key, expected in weighted_mean(updates).items():
            assert torch.allclose(got[key].double(), expected, atol=1e-6), key
        assert any(not torch.equal(updates[0][0][k], updates[1][0][k]) for k in got)  # owners sent different updates

    initial, _ = load_update(checkpoint_path(job_dir, 0))
    final, _ = load_update(checkpoint_path(job_dir, 2))
    assert any(not torch.allclose(final[k], initial[k]) for k in final)
    # the bundle crossed once into the virtual owners' cache under the job
    assert [p.name for p in (job_dir / "sim" / "cache" / "bundles").iterdir()] == [state["bundle"]]


def test_simulate_refuses_bad_partitions_before_starting(tmp_path, capsys):
    job_dir = make_job(tmp_path)  # min_nodes 3
    partitions = tmp_path / "owners"
    partitions.mkdir()
    for k in (0, 2):
        write_jsonl(partitions / f"owner-{k}.jsonl", task_rows(4))
    assert main(["cloud", "simulate", "--job", str(job_dir), "--partitions", str(partitions)]) == 2
    assert f"{partitions / 'owner-1.jsonl'}: missing" in capsys.readouterr().err
    write_jsonl(partitions / "owner-1.jsonl", task_rows(4))
    assert main(["cloud", "simulate", "--job", str(job_dir), "--partitions", str(partitions), "--clients", "4"]) == 2
    assert "--clients 4, but" in capsys.readouterr().err
    (partitions / "owner-2.jsonl").unlink()
    assert main(["cloud", "simulate", "--job", str(job_dir), "--partitions", str(partitions)]) == 2
    assert "min_nodes is 3, more than the 2 simulated owners" in capsys.readouterr().err
    assert main(["cloud", "simulate", "--job", str(job_dir)]) == 2
    assert "--data FILE --clients N" in capsys.readouterr().err


def test_simulate_without_ray_says_what_to_install_before_writing_shares(tmp_path, capsys, monkeypatch):
    """Ray is the optional `simulation` extra: without it the command refuses, naming the extra,
    and writes no owners' shares."""
    job_dir = make_job(tmp_path)
    data = tmp_path / "task.jsonl"
    write_jsonl(data, task_rows())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    argv = ["cloud", "simulate", "--job", str(job_dir), "--data", str(data), "--clients", "4", "--iid"]
    assert main(argv) == 2
    assert "pip install 'offsite[simulation]'" in capsys.readouterr().err
    assert not (job_dir / "sim").exists()
