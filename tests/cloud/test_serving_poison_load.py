"""Load under poison: while one client sends every hostile request of :mod:`tests.cloud.hostile`
in a loop (tiny temperatures, a job whose scores overflow, smuggling framing, bodies that used to
be 500s, uploads refused before their body, malformed gRPC messages, idle connections held open),
16 streaming clients over four jobs and the base finish every request, with no error, against
``offsite cloud serve`` in its own process on loopback. The clients stop after a bounded count of
requests (or at a deadline, which fails the test); the test stops the server."""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

from offsite.cloud.serving import registry
from offsite.protocol._generated import serving_pb2, serving_pb2_grpc
from offsite.protocol.adapter import save_update
from tests.cloud import hostile
from tests.cloud.serving_setup import chat_tokenizer, fill_registry, four_jobs, perturbed_blocks, tiny_base

STREAMERS = 16
REQUESTS = 6  # per streaming client, at least; each goes on until the poison client has made two passes
POISON_PASSES = 2
DEADLINE_S = 400.0  # a bound on the test, not a measurement: every client stops here, and reports it
ADMIN = "poison-admin"
MODELS = ["alpha", "beta", "gamma", "delta", "base"]
IDLE_SOCKETS = 8


def _start_server(tmp: Path) -> tuple[subprocess.Popen, tuple[str, int], str, Path]:
    base = tiny_base(dtype=torch.float32)
    base.save_pretrained(tmp / "model")
    chat_tokenizer().save_pretrained(tmp / "model")
    fill_registry(tmp / "registry", base, four_jobs(base), tmp / "sources")
    # finite weights, so they pass registration, large enough that the MLP overflows float32:
    # every row of this job is NaN
    huge = {key: value * 1e30 if "mlp" in key else value for key, value in perturbed_blocks(base, 5).items()}
    registry.add(
        tmp / "registry", "poison", save_update(tmp / "poison.safetensors", huge, {"mode": "blocks"}), base=base
    )
    log = tmp / "server.log"
    command = [
        sys.executable, "-m", "offsite.cli", "cloud", "serve", "--model", str(tmp / "model"),
        "--registry", str(tmp / "registry"), "--port", "0", "--grpc-port", "0", "--threads", "1",
        "--max-batch", "32", "--max-context", "256", "--max-tokens", "24",
        "--max-connections", "64", "--idle-timeout", "30",
    ]  # fmt: skip
    with open(log, "w") as out:
        env = os.environ | {"PYTHONUNBUFFERED": "1", "OFFSITE_ADMIN_TOKEN": ADMIN}
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    http_address = grpc_target = None
    while time.monotonic() < deadline and grpc_target is None:
        for line in log.read_text().splitlines():
            if line.startswith("http: http://"):
                host, port = line.split()[1][len("http://") :].split(":")
                http_address = (host, int(port))
            elif line.startswith("grpc: "):
                grpc_target = line.split()[1]
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    if http_address is None or grpc_target is None:
        process.kill()
        raise AssertionError(f"the server did not start:\n{log.read_text()}")
    return process, http_address, grpc_target, log


def _stream(address: tuple[str, int], index: int, n: int, rng: random.Random) -> str | None:
    """One streamed request; None when it finished as it should, else what went wrong."""
    model = MODELS[(index + n) % len(MODELS)]
    chat = n % 2 == 0
    body = {
        "model": model,
        "max_tokens": rng.randint(4, 24),
        "temperature": 0.8,
        "seed": rng.randrange(1 << 30),
        "stream": True,
    }
    body |= (
        {"messages": [{"role": "user", "content": f"question {index}.{n}"}]}
        if chat
        else {"prompt": "x" * rng.randint(1, 40)}
    )
    try:
        connection = http.client.HTTPConnection(*address, timeout=120)
        connection.request(
            "POST",
            "/v1/chat/completions" if chat else "/v1/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        if response.status != 200:
            return f"{model}: HTTP {response.status}: {response.read()[:200]!r}"
        finish, done = None, False
        for line in response:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return f"{model}: {event['error']}"
                for choice in event.get("choices", []):
                    finish = choice.get("finish_reason") or finish
        connection.close()
    except (OSError, ValueError) as error:
        return f"{model}: {type(error).__name__}: {error}"
    return (
        None
        if done and finish in ("stop", "length")
        else f"{model}: incomplete stream (done={done}, finish_reason={finish})"
    )


def _complete(address, body: dict) -> hostile.Response:
    return hostile.post(address, "/v1/completions", json.dumps(body).encode())


def _numerics(address, grpc_target: str) -> list[str]:
    problems = []
    for t in (1e-45, 1e-300, 5e-324):
        response = _complete(address, {"model": "delta", "prompt": "abc", "max_tokens": 8, "temperature": t})
        if response.status != 200:
            problems.append(f"temperature {t}: HTTP {response.status} {response.body[:200]!r}")
    with grpc.insecure_channel(grpc_target) as channel:
        try:
            serving_pb2_grpc.ServingStub(channel).Generate(
                serving_pb2.GenerateRequest(model="beta", prompt="abc", max_tokens=8, temperature=1e-45), timeout=60
            )
        except grpc.RpcError as error:
            problems.append(f"gRPC temperature 1e-45: {error.code()} {error.details()!r}")
    return problems


def _poisoned_job(address) -> list[str]:
    """A request on the job whose scores overflow fails, alone, with an error that says so."""
    response = _complete(address, {"model": "poison", "prompt": "abc", "max_tokens": 8, "temperature": 0.7})
    problems = hostile.error_body_problems(response.body)
    if response.status != 500 or "non-finite" not in response.body.decode():
        problems.append(f"the poisoned job: HTTP {response.status} {response.body[:200]!r}")
    return problems


def _absurd_gain(address) -> list[str]:
    body = json.dumps({"name": "absurd", "path": "/nonexistent", "plugin_gain": 1e308}).encode()
    response = hostile.post(address, "/admin/models", body, [("Authorization", f"Bearer {ADMIN}")])
    return [] if response.status == 400 else [f"plugin_gain 1e308: HTTP {response.status} {response.body[:200]!r}"]


def _poison_pass(address, grpc_target: str, bad_bodies: list, tally: hostile.Tally) -> None:
    idle = [socket.create_connection(address, timeout=30) for _ in range(IDLE_SOCKETS)]  # held through the pass
    try:
        tally.add("tiny temperatures", _numerics(address, grpc_target))
        tally.add("poisoned job", _poisoned_job(address))
        tally.add("absurd gain", _absurd_gain(address))
        for name, data, statuses in hostile.FRAMING_CASES:
            tally.add(name, hostile.check_framing(address, name, data, statuses))
        for case in bad_bodies:
            tally.add(case[0], hostile.check_bad_body(address, *case))
        for case in hostile.early_uploads("alpha"):
            tally.add(case[0], hostile.check_early_upload(address, ADMIN, *case))
        with grpc.insecure_channel(grpc_target) as channel:
            tally.add("malformed gRPC", hostile.check_grpc_malformed(channel))
    finally:
        for sock in idle:
            sock.close()


def test_poison_requests_fail_no_other_request(tmp_path):
    process, address, grpc_target, log = _start_server(tmp_path)
    deadline = time.monotonic() + DEADLINE_S
    errors: list[str] = []
    completed = [0] * STREAMERS
    tally = hostile.Tally()
    passes = [0]
    bad_bodies = hostile.bad_bodies(256)

    def streamer(index: int) -> None:
        rng = random.Random(index)
        while (completed[index] < REQUESTS or passes[0] < POISON_PASSES) and time.monotonic() < deadline:
            problem = _stream(address, index, completed[index], rng)
            if problem:
                errors.append(problem)
            completed[index] += 1
        if completed[index] < REQUESTS or passes[0] < POISON_PASSES:
            errors.append(f"client {index}: stopped at the deadline after {completed[index]} requests")

    def poisoner() -> None:
        while time.monotonic() < deadline and (passes[0] < POISON_PASSES or any(t.is_alive() for t in streamers)):
            _poison_pass(address, grpc_target, bad_bodies, tally)
            passes[0] += 1

    streamers = [threading.Thread(target=streamer, args=(i,), daemon=True) for i in range(STREAMERS)]
    poison = threading.Thread(target=poisoner, daemon=True)
    try:
        poison.start()
        for thread in streamers:
            thread.start()
        for thread in streamers + [poison]:
            thread.join(max(1.0, deadline - time.monotonic() + 60))
        assert not any(thread.is_alive() for thread in streamers + [poison]), "a client hung"
        connection = http.client.HTTPConnection(*address, timeout=30)
        connection.request("GET", "/health")
        health = json.loads(connection.getresponse().read())
        connection.close()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    print(
        f"\n{sum(completed)} streams by {STREAMERS} clients beside {passes[0]} poison passes "
        f"({sum(tally.sent.values())} hostile cases); health {health}"
    )
    assert errors == [], errors[:5]
    assert tally.problems == [], tally.problems[:5]
    assert passes[0] >= POISON_PASSES and all(count >= REQUESTS for count in completed), (passes, completed)
    assert (health["active"], health["waiting"]) == (0, 0)
    assert health["stats"]["errors"] == tally.sent["poisoned job"]  # each poisoned request failed, alone
    assert "Traceback" not in log.read_text()
