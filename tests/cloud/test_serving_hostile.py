"""Hostile input against ``offsite cloud serve``'s front ends on loopback, through raw sockets
(HTTP) and raw bytes (gRPC), so the cases hold for whatever server answers the port:

- numerics: temperatures inside the accepted range but tiny, and an absurd plug-in gain at registration;
- framing: bodies that a second parser (a proxy) would read another way, never taken for a request;
- late or leaking errors: deep JSON, long integers, lone surrogates, multi-megabyte prompts (refused
  before they are tokenised), uploads refused before their body is read, malformed gRPC messages;
- connections: a bound on how many are open, and idle ones closed.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
import torch

from offsite.cloud.serving import server
from offsite.cloud.serving.service import ServeConfig, ServingService
from offsite.protocol._generated import serving_pb2, serving_pb2_grpc
from offsite.protocol.adapter import save_update
from tests.cloud import hostile
from tests.cloud.serving_setup import (
    chat_tokenizer,
    fill_registry,
    finished_job_dir,
    four_jobs,
    perturbed_blocks,
    tiny_base,
)

ADMIN = "admin-secret"


class SpyTokenizer:
    """The real tokenizer, noting the longest text it was asked to tokenise."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.longest = 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@dataclass
class Served:
    servers: server.Servers
    tokenizer: SpyTokenizer
    base: torch.nn.Module
    tmp: object

    @property
    def address(self) -> tuple[str, int]:
        return self.servers.http.host, self.servers.http.port


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("hostile")
    base = tiny_base()
    fill_registry(tmp / "registry", base, four_jobs(base), tmp / "sources")
    config = ServeConfig(
        registry=tmp / "registry", max_batch=8, max_context=128, default_max_tokens=8, admin_token=ADMIN
    )
    tokenizer = SpyTokenizer(chat_tokenizer())
    servers = server.start(ServingService(base, tokenizer, config), "127.0.0.1", 0, 0)
    yield Served(servers, tokenizer, base, tmp)
    servers.stop()
    torch.set_num_threads(threads)


def _complete(served: Served, body: dict) -> tuple[int, dict]:
    response = hostile.post(served.address, "/v1/completions", json.dumps(body).encode())
    return response.status, response.json()


def _still_serves(served: Served) -> None:
    status, body = _complete(served, {"model": "alpha", "prompt": "abc", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body


# ---------------------------------------------------------------- 1. numerics


def test_tiny_temperatures_answer_like_greedy_on_both_apis_beside_other_requests(served):
    """Each tiny temperature is sent while other requests decode beside it (as a batch): every
    one is answered, and its text is the greedy one."""
    prompt = {"model": "gamma", "prompt": "the cat", "max_tokens": 6}
    greedy = _complete(served, prompt | {"temperature": 0})[1]["choices"][0]["text"]
    temperatures = (1e-45, 1e-300, 1e-320, 5e-324, 1e-9)
    results: dict = {}

    def ask(key, body):
        results[key] = _complete(served, body)

    threads = [threading.Thread(target=ask, args=(t, prompt | {"temperature": t, "seed": 1})) for t in temperatures]
    threads += [
        threading.Thread(
            target=ask, args=(f"other{i}", {"model": m, "prompt": "hello", "max_tokens": 12, "temperature": 0.8})
        )
        for i, m in enumerate(("alpha", "delta", "base"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for key, (status, body) in results.items():
        assert status == 200, (key, body)
    assert {t: results[t][1]["choices"][0]["text"] for t in temperatures} == {t: greedy for t in temperatures}
    with grpc.insecure_channel(served.servers.grpc_target) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        for t in (1e-45, 1e-38):  # float32 on the wire: 1e-45 arrives as 1.4e-45
            reply = stub.Generate(
                serving_pb2.GenerateRequest(model="gamma", prompt="the cat", max_tokens=6, temperature=t), timeout=30
            )
            assert reply.text == greedy
    assert served.servers.service.scheduler.stats.errors == 0


def test_an_absurd_plugin_gain_is_refused_at_registration(served):
    auth = {"Authorization": f"Bearer {ADMIN}"}
    job_dir = finished_job_dir(served.tmp / "gain-job", perturbed_blocks(served.base, 21))
    upload = served.tmp / "gain-job" / "u.safetensors"
    save_update(upload, perturbed_blocks(served.base, 22), {"mode": "blocks"})
    for gain in (1e308, 11, 1e3):
        connection = http.client.HTTPConnection(*served.address, timeout=60)
        connection.request(
            "POST", "/admin/models", json.dumps({"name": "gainy", "path": str(job_dir), "plugin_gain": gain}), auth
        )
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
        assert (response.status, error["param"], error["code"]) == (400, "plugin_gain", "invalid_value"), (gain, error)
        connection.request("PUT", f"/admin/models/gainy?plugin_gain={gain}", upload.read_bytes(), auth)
        response = connection.getresponse()
        assert response.status == 400 and json.loads(response.read())["error"]["param"] == "plugin_gain"
        connection.close()
    assert "gainy" not in served.servers.service.jobs()
    _still_serves(served)


# ---------------------------------------------------------------- 2. framing


@pytest.mark.parametrize("name,data,statuses", hostile.FRAMING_CASES, ids=[case[0] for case in hostile.FRAMING_CASES])
def test_ambiguous_framing_is_refused_and_no_body_is_read_as_a_request(served, name, data, statuses):
    assert hostile.check_framing(served.address, name, data, statuses) == []
    _still_serves(served)


def test_a_refused_body_closes_a_kept_alive_connection(served):
    """The body of a request refused before it was read (404 here) is not left on the connection:
    the server says it closes, and does."""
    body = hostile.SMUGGLED_REQUEST
    with socket.create_connection(served.address, timeout=30) as sock:
        sock.sendall(b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        raw = b""
        while chunk := sock.recv(65536):  # no half-close: the server must close by itself
            raw += chunk
    responses = hostile.parse_responses(raw)
    assert [r.status for r in responses] == [404] and responses[0].header("Connection") == "close"


# ---------------------------------------------------------------- 3. errors that leaked internals or came late


@pytest.mark.parametrize("case", hostile.bad_bodies(128), ids=[case[0] for case in hostile.bad_bodies(128)])
def test_bad_bodies_are_400s_that_name_the_problem(served, case):
    assert hostile.check_bad_body(served.address, *case) == []
    assert served.tokenizer.longest <= served.servers.service.max_prompt_chars  # refused before tokenising
    _still_serves(served)


def test_grpc_prompts_too_long_for_the_context_are_refused_before_tokenising(served):
    with grpc.insecure_channel(served.servers.grpc_target) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        for request in (
            serving_pb2.GenerateRequest(model="base", prompt="ab " * 1_000_000),
            serving_pb2.GenerateRequest(
                model="base", messages=[serving_pb2.ChatMessage(role="user", content="x" * 3_000_000)]
            ),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(request, timeout=30)
            assert (
                caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context length" in caught.value.details()
            )
    assert served.tokenizer.longest <= served.servers.service.max_prompt_chars


def test_uploads_are_refused_before_their_body_is_read(served):
    for case in hostile.early_uploads("alpha"):
        assert hostile.check_early_upload(served.address, ADMIN, *case) == []
    # a body that ends early is an error of its own, and leaves nothing behind
    with socket.create_connection(served.address, timeout=30) as sock:
        sock.sendall(
            b"PUT /admin/models/short HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: 1000\r\n\r\n0123456789" % ADMIN.encode()
        )
        sock.shutdown(socket.SHUT_WR)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    response = hostile.parse_responses(raw)[0]
    assert response.status == 400 and response.json()["error"]["code"] == "incomplete_body", response.body
    assert [p.name for p in (served.tmp / "registry").iterdir() if p.name.startswith(".")] == []
    _still_serves(served)


def test_malformed_grpc_messages_are_invalid_argument(served):
    with grpc.insecure_channel(served.servers.grpc_target) as channel:
        assert hostile.check_grpc_malformed(channel) == []


# ---------------------------------------------------------------- 4. connections


def _small_server(tmp_path, **config) -> server.Servers:
    service = ServingService(
        tiny_base(dtype=torch.float32),
        chat_tokenizer(),
        ServeConfig(registry=tmp_path / "reg", max_batch=2, max_context=64, **config),
    )
    return server.start(service, "127.0.0.1", 0, None)


def test_connections_are_bounded(tmp_path):
    """Four connections open, idle: the server holds four connections, and answers every further
    connection 503 at once and closes it, without holding it. A freed place is taken again."""
    servers = _small_server(tmp_path, max_connections=4, idle_timeout=300)
    address = (servers.http.host, servers.http.port)
    idle = [socket.create_connection(address, timeout=30) for _ in range(4)]
    try:
        deadline = time.monotonic() + 30
        while servers.http.connections < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert servers.http.connections == 4
        for _ in range(24):
            with socket.create_connection(address, timeout=30) as extra:
                raw = b""
                while chunk := extra.recv(65536):
                    raw += chunk
            [response] = hostile.parse_responses(raw)
            assert response.status == 503 and response.json()["error"]["code"] == "too_many_connections"
            assert hostile.error_body_problems(response.body) == []
        assert servers.http.connections == 4
        idle.pop().close()
        deadline, status = time.monotonic() + 30, None
        while status != 200 and time.monotonic() < deadline:
            connection = http.client.HTTPConnection(*address, timeout=30)
            connection.request("GET", "/health")
            status = connection.getresponse().status
            connection.close()
        assert status == 200
    finally:
        for sock in idle:
            sock.close()
        servers.stop()


def test_idle_and_stalled_connections_are_closed(tmp_path):
    servers = _small_server(tmp_path, idle_timeout=0.5)
    address = (servers.http.host, servers.http.port)
    try:
        for sent in (b"", b"GET /hea", b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"mod'):
            with socket.create_connection(address, timeout=30) as sock:
                sock.sendall(sent)
                raw = b""
                while chunk := sock.recv(65536):  # ends when the server closes; the timeout only bounds the test
                    raw += chunk
            assert b" 200 " not in raw
        # a kept-alive connection, idle after its request, is closed too
        connection = http.client.HTTPConnection(*address, timeout=30)
        connection.request("GET", "/health")
        assert connection.getresponse().read()
        assert connection.sock.recv(1) == b""
        connection.close()
    finally:
        servers.stop()


def test_serve_help_states_the_bounds(capsys):
    from offsite.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["cloud", "serve", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-connections N at most N HTTP connections open at once" in text and "default 256" in text
    assert "--idle-timeout S close a connection whose client sends nothing for S seconds" in text
