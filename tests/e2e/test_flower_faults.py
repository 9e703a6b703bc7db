"""Faults on Flower's deployment engine, on loopback with a tiny random llama:

- a data owner's SuperNode crashes (SIGKILL of it and its children) while it trains round 1: the
  round completes with the other two, the coordinator names the dropped node, and the data
  owner's daemon restarts the SuperNode, which contributes to round 2;
- the coordinator crashes after round 1 is checkpointed (SIGKILL of the ServerApp process the
  SuperLink started for the run) and the job is submitted again: the new run resumes at round 2
  without touching round 1 and finishes it;
- (in the same run) one data owner's file has a broken line: its reply is an error naming the
  file and line, and every round completes with the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from offsite.cloud.fed_job import checkpoint_path, read_job, write_job
from offsite.cloud.superlink import free_port
from offsite.harness.federation import LocalFederation, _children, _descendants, kill_tree
from tests.e2e.flower_jobs import data_file, make_job

ROUND_TIMEOUT = 40.0  # the two healthy nodes reply in ~10 s here; a dead one is waited for this long


def fault_job(tmp_path, rounds: int) -> Path:
    """``make_job``'s bundle with a job that completes a round on 2 of 3 nodes."""
    job_dir = make_job(tmp_path, rounds=rounds)
    config = dataclasses.replace(
        read_job(job_dir), min_nodes=3, min_replies=2, round_timeout=ROUND_TIMEOUT, record_updates=False
    )
    write_job(job_dir, config)
    return job_dir


def supernode_ids(log: Path) -> list[int]:
    """Every node id a SuperNode's log announced (one per incarnation)."""
    return [int(found) for found in re.findall(r"SuperNode ID: (\d+)", log.read_text(errors="replace"))]


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def state_of(job_dir: Path) -> dict | None:
    try:
        return json.loads((job_dir / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def serverapp_pids(superlink_pid: int) -> list[int]:
    """The ``flwr-serverapp`` processes under the SuperLink (its SuperExec starts one per run)."""
    found = []
    for pid in _descendants(superlink_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(Path(part.decode(errors="replace")).name == "flwr-serverapp" for part in command[:2]):
            found.append(pid)
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_client_killed_mid_round(tmp_path):
    job_dir = fault_job(tmp_path, rounds=2)
    with LocalFederation(tmp_path / "federation") as federation:
        federation.start_superlink()
        healthy = [
            federation.start_supernode(
                {
                    "data-path": data_file(tmp_path / f"data-{i}.jsonl", 4, i),
                    "cache-dir": tmp_path / f"cache-{i}",
                    "threads": 1,
                },
                wait=False,
            )
            for i in range(2)
        ]
        federation.wait_listening(healthy)  # started side by side
        # the third data owner runs the supervised daemon: it restarts its SuperNode after a crash
        daemon_log_path = tmp_path / "daemon.log"
        daemon_log = open(daemon_log_path, "wb")
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "offsite.cli",
                "client",
                "start",
                "--superlink",
                federation.address,
                "--insecure",
                "--data",
                str(data_file(tmp_path / "data-2.jsonl", 4, 2)),
                "--cache-dir",
                str(tmp_path / "cache-2"),
                "--runtime-port",
                str(free_port()),
                "--threads",
                "1",
            ],
            stdout=daemon_log,
            stderr=subprocess.STDOUT,
            env=federation.env,
        )
        try:
            victim_id = wait_until(lambda: supernode_ids(daemon_log_path), 60, "the daemon's SuperNode to connect")[0]
            healthy_ids = [
                wait_until(lambda node=node: supernode_ids(node.log_path), 60, f"{node.name}'s id")[0]
                for node in healthy
            ]
            run_id = federation.submit({"job-dir": job_dir})

            # round 1 reaches the daemon's SuperNode: crash it (and the ClientApp it started) mid-training
            wait_until(
                lambda: "Receiving: train message" in daemon_log_path.read_text(errors="replace"),
                120,
                "round 1's train message",
            )
            supernode_pid = wait_until(lambda: _children(daemon.pid), 5, "the daemon's SuperNode process")[0]
            kill_tree(supernode_pid)
            assert "Sending: train message" not in daemon_log_path.read_text(errors="replace"), (
                "the node replied before the kill"
            )

            # the supervisor brings it back with the same config; without a registered key it gets a new node id
            rejoined_id = wait_until(lambda: supernode_ids(daemon_log_path)[1:], 60, "the restarted SuperNode")[0]
            status = federation.wait(run_id, timeout=240)
            logs = federation.logs(run_id)
            assert status == "finished:completed", logs
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
            daemon_log.close()

    daemon_text = daemon_log_path.read_text(errors="replace")
    assert re.search(r"child \d+ exited with -9 after [\d.]+s; restart 1", daemon_text), daemon_text[-3000:]

    state = state_of(job_dir)
    round_1, round_2 = state["history"]
    assert round_1["replied"] == sorted(healthy_ids)
    assert round_1["dropped"] == [victim_id] and not round_1["failed"], round_1
    assert re.search(rf"round 1: node {victim_id} dropped: ", logs), logs
    assert round_2["replied"] == sorted([*healthy_ids, rejoined_id]), round_2
    # the dead incarnation may still count as connected (until it misses 2 heartbeats): then it is dropped again
    assert set(round_2["dropped"]) <= {victim_id} and not round_2["failed"], round_2
    assert state["completed_round"] == 2


def test_coordinator_killed_after_round_1(tmp_path):
    job_dir = fault_job(tmp_path, rounds=2)
    broken = data_file(tmp_path / "data-2.jsonl", 4, 2)
    lines = broken.read_text().splitlines(keepends=True)
    lines[2] = '{"prompt": "q2-2 ", "completion": \n'  # line 3 is cut off mid-row
    broken.write_text("".join(lines))

    with LocalFederation(tmp_path / "federation") as federation:
        federation.start_superlink()
        nodes = [
            federation.start_supernode(
                {
                    "data-path": data_file(tmp_path / f"data-{i}.jsonl", 4, i) if i < 2 else broken,
                    "cache-dir": tmp_path / f"cache-{i}",
                    "threads": 1,
                },
                wait=False,
            )
            for i in range(3)
        ]
        federation.wait_listening(nodes)  # started side by side
        node_ids = [
            wait_until(lambda node=node: supernode_ids(node.log_path), 60, f"{node.name}'s id")[0] for node in nodes
        ]
        first_run = federation.submit({"job-dir": job_dir})

        # the coordinator (the ServerApp process the SuperLink's SuperExec started) dies once round 1 is on disk
        wait_until(
            lambda: (state_of(job_dir) or {}).get("completed_round", 0) >= 1, 180, "round 1's checkpoint", poll=0.1
        )
        serverapp = wait_until(lambda: serverapp_pids(federation.superlink.process.pid), 5, "the ServerApp process")
        for pid in serverapp:
            kill_tree(pid)
        wait_until(lambda: not serverapp_pids(federation.superlink.process.pid), 30, "the ServerApp to be gone")
        after_crash = state_of(job_dir)
        assert after_crash["completed_round"] == 1, "the crash came too late: round 2 was already checkpointed"
        round_1_checkpoint = checkpoint_path(job_dir, 1)
        round_1_digest, round_1_mtime = sha256(round_1_checkpoint), round_1_checkpoint.stat().st_mtime_ns

        # the operator submits the job again: a new run, a new ServerApp, the same job directory
        first_status = wait_until(
            lambda: (status := federation.run_status(first_run)).startswith("finished") and status,
            120,
            "the SuperLink to see the first run end",
            poll=2,
        )
        assert first_status != "finished:completed", first_status
        second_run = federation.submit({"job-dir": job_dir})
        status = federation.wait(second_run, timeout=240)
        logs = federation.logs(second_run)
        assert status == "finished:completed", logs
        assert second_run != first_run
        assert "resuming after round 1 of 2" in logs, logs

    state = state_of(job_dir)
    assert [record["round"] for record in state["history"]] == [1, 2]
    assert state["completed_round"] == 2 and state["checkpoint"] == "checkpoints/round-0002.safetensors"
    assert state["history"][0] == after_crash["history"][0]  # round 1 as the first run recorded it
    assert sha256(round_1_checkpoint) == round_1_digest and round_1_checkpoint.stat().st_mtime_ns == round_1_mtime
    assert sha256(job_dir / state["checkpoint"]) == state["checkpoint_sha256"]

    # the broken file: an error naming file and line, every round, and the rounds went on without it
    good, bad = sorted(node_ids[:2]), node_ids[2]
    for record in state["history"]:
        assert record["replied"] == good, record
        assert record["failed"][str(bad)].startswith(f"DATA_FORMAT: {broken}:3: not valid JSON"), record
    assert re.search(rf"round 2: node {bad} failed: DATA_FORMAT: {re.escape(str(broken))}:3: ", logs), logs
