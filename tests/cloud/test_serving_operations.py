"""Operating ``offsite cloud serve``: Prometheus ``/metrics`` (parsed by prometheus_client's own
parser, its counters adding up to the requests sent), liveness and readiness, the gRPC health
service, a graceful stop that finishes the running request, and TLS on both ports with real
certificates (cloud/certs.py)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import grpc
import openai
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from offsite.cloud.certs import write_deployment_certs
from offsite.cloud.serving import server
from offsite.cloud.serving.http_server import TlsFiles
from offsite.cloud.serving.service import ServeConfig, ServingService
from offsite.protocol._generated import serving_pb2, serving_pb2_grpc
from tests.cloud.hostile import exchange
from tests.cloud.serving_setup import chat_tokenizer, fill_registry, four_jobs, tiny_base

SERVICE = "offsite.serving.v1.Serving"


@pytest.fixture
def served(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tiny_base()
    fill_registry(tmp_path / "registry", base, four_jobs(base), tmp_path / "sources")
    config = ServeConfig(
        registry=tmp_path / "registry", max_batch=8, max_context=256, default_max_tokens=8, shutdown_timeout=60
    )
    servers = server.start(ServingService(base, chat_tokenizer(), config), "127.0.0.1", 0, 0)
    yield servers
    servers.stop()
    torch.set_num_threads(threads)


def _get(servers: server.Servers, path: str, headers: list[tuple[str, str]] = ()) -> tuple[int, bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    [response] = exchange((servers.http.host, servers.http.port), request.encode())
    return response.status, response.body


def _scrape(servers: server.Servers) -> dict:
    """``{family name: [(labels, value, sample name)]}`` from /metrics, by prometheus_client's parser."""
    status, body = _get(servers, "/metrics")
    assert status == 200
    return {
        family.name: [(s.labels, s.value, s.name) for s in family.samples]
        for family in text_string_to_metric_families(body.decode())
    }


def test_metrics_parse_and_add_up_to_the_requests_sent(served):
    client = openai.OpenAI(base_url=served.http_url + "/v1", api_key="none", max_retries=0, timeout=60)
    usages = [
        client.completions.create(model="alpha", prompt=f"p{i}", max_tokens=5, temperature=0).usage for i in range(3)
    ]
    for i in range(2):
        chunks = list(
            client.chat.completions.create(
                model="beta",
                messages=[{"role": "user", "content": f"q{i}"}],
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usages.append(chunks[-1].usage)
    for bad in ({"model": "nope"}, {"temperature": 9}):
        with pytest.raises(openai.APIStatusError):
            client.completions.create(**({"model": "alpha", "prompt": "x", "max_tokens": 2} | bad))
    client.models.list()
    assert _get(served, "/v1/nowhere")[0] == 404
    client.close()
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        usages.append(
            stub.Generate(
                serving_pb2.GenerateRequest(model="alpha", prompt="g", max_tokens=3, temperature=0), timeout=30
            ).usage
        )
        with pytest.raises(grpc.RpcError):
            stub.Generate(serving_pb2.GenerateRequest(model="nope", prompt="g"), timeout=30)
    sent = {
        ("http", "/v1/completions", "alpha", "200"): 3,
        ("http", "/v1/chat/completions", "beta", "200"): 2,
        ("http", "/v1/completions", "", "404"): 1,
        ("http", "/v1/completions", "", "400"): 1,
        ("http", "/v1/models", "", "200"): 1,
        ("http", "other", "", "404"): 1,
        ("grpc", "Generate", "alpha", "OK"): 1,
        ("grpc", "Generate", "", "NOT_FOUND"): 1,
    }
    deadline = (
        time.monotonic() + 30
    )  # a stream's request is counted as its task ends, just after the client read [DONE]
    while True:
        metrics = _scrape(served)
        counted = {
            (labels["api"], labels["endpoint"], labels["model"], labels["status"]): value
            for labels, value, name in metrics["offsite_serving_requests"]
            if name.endswith("_total") and labels["endpoint"] != "/metrics"
        }
        if counted == sent or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counted == sent
    tokens = {
        name: {labels["model"]: value for labels, value, sample in metrics[name] if sample.endswith("_total")}
        for name in ("offsite_serving_prompt_tokens", "offsite_serving_generation_tokens")
    }
    alpha, beta = usages[:3] + usages[5:], usages[3:5]
    assert tokens["offsite_serving_prompt_tokens"] == {
        "alpha": sum(u.prompt_tokens for u in alpha),
        "beta": sum(u.prompt_tokens for u in beta),
    }
    assert tokens["offsite_serving_generation_tokens"] == {
        "alpha": sum(u.completion_tokens for u in alpha),
        "beta": sum(u.completion_tokens for u in beta),
    }
    for name in ("offsite_serving_time_to_first_token_seconds", "offsite_serving_request_latency_seconds"):
        counts = {labels["model"]: value for labels, value, sample in metrics[name] if sample.endswith("_count")}
        assert counts == {"alpha": 4, "beta": 2}, name
    batch = {
        labels.get("le"): value
        for labels, value, sample in metrics["offsite_serving_batch_size"]
        if sample.endswith("_bucket")
    }
    assert batch["+Inf"] == served.service.scheduler.snapshot().steps > 0
    assert {name for name in metrics} >= {
        "offsite_serving_queue_depth",
        "offsite_serving_running_requests",
        "offsite_serving_kv_cache_bytes",
        "offsite_serving_jobs",
        "offsite_serving_http_connections",
        "offsite_serving_failed",
    }
    assert metrics["offsite_serving_jobs"][0][1] == 4


def test_metrics_are_as_closed_as_the_api(tmp_path):
    config = ServeConfig(
        registry=tmp_path / "reg", max_batch=2, max_context=64, api_keys=frozenset({"k1"}), admin_token="adm"
    )
    servers = server.start(
        ServingService(tiny_base(dtype=torch.float32), chat_tokenizer(), config), "127.0.0.1", 0, None
    )
    try:
        assert _get(servers, "/metrics")[0] == 401
        assert _get(servers, "/metrics", [("Authorization", "Bearer k1")])[0] == 200
        assert _get(servers, "/metrics", [("Authorization", "Bearer adm")])[0] == 200
        assert _get(servers, "/health")[0] == 200 and _get(servers, "/ready")[0] == 200  # probes need no key
    finally:
        servers.stop()


def test_liveness_readiness_and_grpc_health(served):
    status, body = _get(served, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert _get(served, "/ready") == (200, b'{"status":"ready"}')
    with grpc.insecure_channel(served.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        served.draining.set()
        served.grpc.drain()
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
    status, body = _get(served, "/ready")
    assert status == 503 and json.loads(body) == {"status": "not ready", "reason": "the server is shutting down"}
    assert _get(served, "/health")[0] == 200  # draining is not dead: liveness stays up


def test_openapi_docs_describe_the_request_bodies(served):
    status, body = _get(served, "/openapi.json")
    spec = json.loads(body)
    assert status == 200 and {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/metrics",
        "/health",
        "/ready",
        "/v1/load_lora_adapter",
        "/admin/models/{name}",
    } <= set(spec["paths"])
    completion = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "echo", "logprobs", "n", "stream"} <= set(completion["properties"]) and completion[
        "required"
    ] == ["model", "prompt"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["properties"]["messages"]["items"]["properties"]["role"]["enum"] == [
        "system",
        "developer",
        "user",
        "assistant",
    ]
    status, page = _get(served, "/docs")
    assert status == 200 and b"swagger" in page.lower()


def test_a_graceful_stop_finishes_the_running_request(served):
    """A stream is half read when the server is told to stop: new connections are refused at once,
    and the stream still ends, whole, with [DONE]."""
    address = (served.http.host, served.http.port)
    body = json.dumps({"model": "gamma", "prompt": "abc", "max_tokens": 200, "temperature": 0, "stream": True}).encode()
    sock = socket.create_connection(address, timeout=60)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    received = sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    stopper = threading.Thread(target=served.stop)
    stopper.start()
    deadline, refused = time.monotonic() + 30, False
    while not refused and time.monotonic() < deadline:
        try:
            socket.create_connection(address, timeout=5).close()
            time.sleep(0.02)
        except OSError:
            refused = True
    assert refused
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    stopper.join(60)
    events = [json.loads(line[6:]) for line in received.split(b"\r\n") if line.startswith(b"data: {")]
    assert b"data: [DONE]" in received
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"][0]["text"]) > 0 for e in events) > 1 and not served.service.scheduler.running


def test_tls_on_both_ports(tmp_path):
    certs = write_deployment_certs(tmp_path / "tls", nodes=0)
    config = ServeConfig(registry=tmp_path / "reg", max_batch=2, max_context=64, default_max_tokens=4)
    servers = server.start(
        ServingService(tiny_base(dtype=torch.float32), chat_tokenizer(), config),
        "127.0.0.1",
        0,
        0,
        tls=TlsFiles(certs.server_cert, certs.server_key),
    )
    try:
        assert servers.http_url.startswith("https://")
        trusted = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(certs.ca_cert)))
        client = openai.OpenAI(base_url=servers.http_url + "/v1", api_key="none", max_retries=0, http_client=trusted)
        assert (
            client.completions.create(model="base", prompt="hi", max_tokens=3, temperature=0).choices[0].finish_reason
            == "length"
        )
        client.close()
        untrusted = openai.OpenAI(base_url=servers.http_url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIConnectionError):  # the system's CAs do not know ours
            untrusted.models.list()
        untrusted.close()
        with socket.create_connection(
            (servers.http.host, servers.http.port), timeout=10
        ) as sock:  # plain HTTP on the TLS port
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200" not in sock.recv(4096)
        credentials = grpc.ssl_channel_credentials(certs.ca_cert.read_bytes())
        with grpc.secure_channel(servers.grpc_target, credentials) as channel:
            reply = serving_pb2_grpc.ServingStub(channel).Generate(
                serving_pb2.GenerateRequest(model="base", prompt="hi", max_tokens=3, temperature=0), timeout=30
            )
            assert reply.usage.completion_tokens >= 1
        with grpc.insecure_channel(servers.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                serving_pb2_grpc.ServingStub(channel).ListModels(serving_pb2.ListModelsRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        servers.stop()


def test_offsite_query_over_tls(tmp_path, capsys):
    from offsite.cli import main

    certs = write_deployment_certs(tmp_path / "tls", nodes=0)
    config = ServeConfig(registry=tmp_path / "reg", max_batch=2, max_context=64, default_max_tokens=4)
    servers = server.start(
        ServingService(tiny_base(dtype=torch.float32), chat_tokenizer(), config),
        "127.0.0.1",
        0,
        0,
        tls=TlsFiles(certs.server_cert, certs.server_key),
    )
    try:
        assert (
            main(
                ["query", "--url", servers.http_url, "--cafile", str(certs.ca_cert), "--raw", "--max-tokens", "3", "hi"]
            )
            == 0
        )
        over_http = capsys.readouterr().out
        assert (
            main(
                [
                    "query",
                    "--grpc",
                    servers.grpc_target,
                    "--cafile",
                    str(certs.ca_cert),
                    "--raw",
                    "--max-tokens",
                    "3",
                    "hi",
                ]
            )
            == 0
        )
        assert capsys.readouterr().out == over_http
        assert main(["query", "--url", servers.http_url, "--raw", "hi"]) == 1  # without the CA: refused, said so
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
    finally:
        servers.stop()
