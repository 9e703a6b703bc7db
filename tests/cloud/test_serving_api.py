"""``offsite cloud serve``'s front ends on loopback, through real clients: HTTP (http.client,
server-sent events) and gRPC (the generated stub); bad input; the admin API; ``offsite query``."""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from offsite.cloud.plugin import plug_in_update
from offsite.cloud.serving import server
from offsite.cloud.serving.service import ServeConfig, ServingService
from offsite.protocol._generated import serving_pb2, serving_pb2_grpc
from offsite.protocol.adapter import save_update
from tests.cloud.serving_setup import (
    ADAPTER_BLOCKS,
    EOS,
    chat_tokenizer,
    fill_registry,
    finished_job_dir,
    four_jobs,
    greedy,
    perturbed_blocks,
    tiny_base,
)

ADMIN = "admin-secret"


@dataclass
class Served:
    servers: server.Servers
    tokenizer: object
    base: torch.nn.Module
    references: dict
    tmp: Path

    @property
    def host_port(self) -> tuple[str, int]:
        return self.servers.http.host, self.servers.http.port


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("serve")
    base = tiny_base()
    jobs = four_jobs(base)
    fill_registry(tmp / "registry", base, jobs, tmp / "sources")
    config = ServeConfig(
        registry=tmp / "registry",
        base_name="tiny-llama",
        max_batch=8,
        max_context=128,
        default_max_tokens=16,
        admin_token=ADMIN,
    )
    service = ServingService(base, chat_tokenizer(), config)
    servers = server.start(service, "127.0.0.1", 0, 0)
    references = {job.name: job.plugged(base) for job in jobs} | {"base": base}
    yield Served(servers, service.tokenizer, base, references, tmp)
    servers.stop()
    torch.set_num_threads(threads)


def call(served: Served, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
    connection = http.client.HTTPConnection(*served.host_port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, json.loads(payload) if payload else None


def sse(served: Served, path: str, body: dict) -> tuple[list[dict], bool]:
    """The events of a streamed request, and whether it ended with [DONE]."""
    connection = http.client.HTTPConnection(*served.host_port, timeout=60)
    connection.request(
        "POST", path, body=json.dumps(body | {"stream": True}), headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").split(";")[0] == "text/event-stream"
    events, done = [], False
    for line in response:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            events.append(json.loads(data))
    connection.close()
    return events, done


def expected_text(served: Served, model: str, prompt_ids: list[int], max_tokens: int) -> str:
    return served.tokenizer.decode(
        greedy(served.references[model], prompt_ids, max_tokens, eos=EOS), skip_special_tokens=True
    )


# ---------------------------------------------------------------- HTTP


def test_models_lists_the_base_and_every_job(served):
    status, body = call(served, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    kinds = {m["id"]: m["kind"] for m in body["data"]}
    assert kinds == {"base": "base", "alpha": "blocks", "beta": "blocks", "gamma": "lora", "delta": "lora"}
    assert call(served, "GET", "/v1/models/gamma")[1]["adapter_blocks"] == [0, 1, 6, 7]


def test_completions_match_the_plugged_in_model(served):
    for model in ("alpha", "gamma", "base"):
        prompt = "the cat sat"
        ids = served.tokenizer(prompt).input_ids
        status, body = call(
            served, "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        )
        assert status == 200, body
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["choices"][0]["text"] == expected_text(served, model, ids, 12)
        assert body["usage"]["prompt_tokens"] == len(ids)


def test_streamed_completion_equals_the_whole_one(served):
    request = {
        "model": "delta",
        "prompt": [5, 9, 14, 3, 27],
        "max_tokens": 20,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    whole = call(served, "POST", "/v1/completions", request)[1]
    events, done = sse(served, "/v1/completions", request)
    assert done
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole["choices"][0]["text"]
    assert [e for e in events if e["choices"]][-1]["choices"][0]["finish_reason"] == whole["choices"][0][
        "finish_reason"
    ]
    assert events[-1]["usage"] == whole["usage"]


def test_chat_uses_the_chat_template_and_streams(served):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = served.tokenizer(rendered, add_special_tokens=False).input_ids
    status, body = call(
        served,
        "POST",
        "/v1/chat/completions",
        {"model": "beta", "messages": messages, "max_tokens": 10, "temperature": 0},
    )
    assert status == 200, body
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": expected_text(served, "beta", ids, 10)}
    events, done = sse(
        served, "/v1/chat/completions", {"model": "beta", "messages": messages, "max_tokens": 10, "temperature": 0}
    )
    assert done and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]


def test_stop_sequences_cut_the_text(served):
    body = {"model": "alpha", "prompt": "the cat sat", "max_tokens": 30, "temperature": 0}
    full = call(served, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    assert len(full) > 4
    stop = full[2:4]
    cut = call(served, "POST", "/v1/completions", body | {"stop": [stop]})[1]["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    events, done = sse(served, "/v1/completions", body | {"stop": stop})
    assert done and "".join(e["choices"][0]["text"] for e in events) == cut["text"]


def _assert_error(status_body, status: int, param=None, code=None, type_="invalid_request_error") -> dict:
    got_status, body = status_body
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == type_
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_bad_input_gets_openai_errors(served):
    ok = {"model": "alpha", "prompt": "hello", "max_tokens": 4}
    error = _assert_error(
        call(served, "POST", "/v1/completions", ok | {"model": "nope"}), 404, "model", "model_not_found"
    )
    assert "'nope'" in error["message"]
    _assert_error(
        call(served, "POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        404,
        "model",
    )
    _assert_error(
        call(served, "POST", "/v1/completions", raw=b'{"model": "alpha", "prompt": '), 400, code="invalid_json"
    )
    _assert_error(call(served, "POST", "/v1/completions", raw=b"[1, 2]"), 400, code="invalid_json")
    _assert_error(
        call(served, "POST", "/v1/completions", ok | {"prompt": "x" * 200}), 400, "prompt", "context_length_exceeded"
    )
    _assert_error(
        call(served, "POST", "/v1/completions", ok | {"max_tokens": 127}), 400, "max_tokens", "context_length_exceeded"
    )
    _assert_error(call(served, "POST", "/v1/completions", ok | {"max_tokens": 0}), 400, "max_tokens")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"max_tokens": "4"}), 400, "max_tokens", "invalid_type")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"temperature": 3}), 400, "temperature")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"top_p": 0}), 400, "top_p")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"n": 0}), 400, "n")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"n": 500}), 400, "n")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"logprobs": 21}), 400, "logprobs", "invalid_value")
    _assert_error(
        call(served, "POST", "/v1/completions", ok | {"logit_bias": {"5": 1}}),
        400,
        "logit_bias",
        "unsupported_parameter",
    )
    _assert_error(call(served, "POST", "/v1/completions", ok | {"echo": "yes"}), 400, "echo", "invalid_type")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"stream": "yes"}), 400, "stream")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"prompt": ["a", [1]]}), 400, "prompt")
    _assert_error(call(served, "POST", "/v1/completions", ok | {"prompt": [5, 100]}), 400, "prompt", "invalid_value")
    _assert_error(call(served, "POST", "/v1/completions", {"prompt": "x"}), 400, "model")
    _assert_error(call(served, "POST", "/v1/chat/completions", {"model": "alpha", "messages": []}), 400, "messages")
    _assert_error(
        call(
            served, "POST", "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}
        ),
        400,
        "messages[0].role",
    )
    _assert_error(call(served, "GET", "/v1/nothing"), 404, code="unknown_url")
    # the server still serves, on the same keep-alive connection too
    connection = http.client.HTTPConnection(*served.host_port, timeout=30)
    for body in (b"{oops", json.dumps(ok).encode()):
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
    assert response.status == 200
    connection.close()


def test_a_client_that_disconnects_mid_stream_is_cancelled_and_others_are_served(served):
    body = json.dumps({"model": "gamma", "prompt": "abc", "max_tokens": 120, "temperature": 0, "stream": True}).encode()
    cancelled = call(served, "GET", "/health")[1]["stats"]["cancelled"]
    for _ in range(3):
        sock = socket.create_connection(served.host_port, timeout=30)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while received.count(b"data: ") < 3:  # a few pieces in, then hang up
            received += sock.recv(4096)
        sock.close()
    status, reply = call(
        served, "POST", "/v1/completions", {"model": "alpha", "prompt": "abc", "max_tokens": 5, "temperature": 0}
    )
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("length", "stop")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = call(served, "GET", "/health")[1]
        if health["active"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.1)
    assert (health["active"], health["waiting"]) == (0, 0)
    assert health["stats"]["cancelled"] == cancelled + 3  # the hung-up streams were cancelled, not decoded to the end
    assert health["stats"]["errors"] == 0


# ---------------------------------------------------------------- admin


def test_admin_registers_and_unregisters_at_run_time(served):
    auth = {"Authorization": f"Bearer {ADMIN}"}
    adapter = perturbed_blocks(served.base, 11)
    job_dir = finished_job_dir(served.tmp / "late-job", adapter)
    _assert_error(
        call(served, "POST", "/admin/models", {"name": "late", "path": str(job_dir)}), 401, type_="authentication_error"
    )
    _assert_error(
        call(
            served, "POST", "/admin/models", {"name": "late", "path": str(job_dir)}, {"Authorization": "Bearer wrong"}
        ),
        401,
        type_="authentication_error",
    )
    status, info = call(served, "POST", "/admin/models", {"name": "late", "path": str(job_dir)}, auth)
    assert status == 201 and info["id"] == "late" and info["kind"] == "blocks"
    _assert_error(call(served, "POST", "/admin/models", {"name": "late", "path": str(job_dir)}, auth), 409, "name")
    _assert_error(call(served, "POST", "/admin/models", {"name": "bad name!", "path": str(job_dir)}, auth), 400, "name")
    _assert_error(
        call(served, "POST", "/admin/models", {"name": "x", "path": str(served.tmp / "missing")}, auth), 400, "path"
    )
    served.references["late"] = plug_in_update(served.base, adapter, ADAPTER_BLOCKS)
    reply = call(
        served, "POST", "/v1/completions", {"model": "late", "prompt": [7, 8, 9], "max_tokens": 8, "temperature": 0}
    )[1]
    assert reply["choices"][0]["text"] == expected_text(served, "late", [7, 8, 9], 8)
    # an uploaded adapter file (PUT) is served too
    upload = served.tmp / "upload.safetensors"
    save_update(upload, perturbed_blocks(served.base, 12), {"mode": "blocks"})
    status, info = call(
        served,
        "PUT",
        "/admin/models/uploaded",
        raw=upload.read_bytes(),
        headers=auth | {"Content-Type": "application/octet-stream"},
    )
    assert status == 201 and info["id"] == "uploaded"
    _assert_error(
        call(served, "PUT", "/admin/models/junk", raw=b"not safetensors", headers=auth), 400, code="invalid_adapter"
    )
    # the recipe's plug-in gain, said at registration (a client's update file carries none)
    gained = perturbed_blocks(served.base, 13)
    save_update(upload, gained, {"mode": "blocks"})
    status, info = call(served, "PUT", "/admin/models/gained?plugin_gain=1.5", raw=upload.read_bytes(), headers=auth)
    assert status == 201
    served.references["gained"] = plug_in_update(served.base, gained, ADAPTER_BLOCKS, gain=1.5)
    reply = call(
        served, "POST", "/v1/completions", {"model": "gained", "prompt": [3, 1, 4], "max_tokens": 8, "temperature": 0}
    )[1]
    assert reply["choices"][0]["text"] == expected_text(served, "gained", [3, 1, 4], 8)
    _assert_error(
        call(served, "PUT", "/admin/models/g2?plugin_gain=much", raw=upload.read_bytes(), headers=auth),
        400,
        "plugin_gain",
    )
    for bad in (-1, "1.5"):
        _assert_error(
            call(served, "POST", "/admin/models", {"name": "g3", "path": str(job_dir), "plugin_gain": bad}, auth),
            400,
            "plugin_gain",
        )
    listed = {m["id"]: m for m in call(served, "GET", "/admin/models", headers=auth)[1]["data"]}
    assert {"late", "uploaded", "gained"} <= set(listed) and not {"junk", "g2", "g3"} & set(listed)
    assert listed["gained"]["meta"]["plugin_gain"] == 1.5 and listed["late"]["meta"]["plugin_gain"] == 1.0
    for name in ("late", "uploaded", "gained"):
        assert call(served, "DELETE", f"/admin/models/{name}", headers=auth) == (
            200,
            {"id": name, "object": "model", "deleted": True},
        )
    _assert_error(
        call(served, "POST", "/v1/completions", {"model": "late", "prompt": "x", "max_tokens": 2}), 404, "model"
    )
    _assert_error(call(served, "DELETE", "/admin/models/late", headers=auth), 404, "name")
    assert not (served.tmp / "registry" / "late").exists()


def test_api_keys_and_admin_off(tmp_path):
    config = ServeConfig(registry=tmp_path / "reg", api_keys=frozenset({"k1", "k2"}), max_batch=2, max_context=64)
    service = ServingService(tiny_base(dtype=torch.float32), chat_tokenizer(), config)
    servers = server.start(service, "127.0.0.1", 0, 0)
    try:
        local = Served(servers, service.tokenizer, service.model, {}, tmp_path)
        _assert_error(call(local, "GET", "/v1/models"), 401, code="invalid_api_key", type_="authentication_error")
        _assert_error(
            call(local, "GET", "/v1/models", headers={"Authorization": "Bearer k3"}), 401, type_="authentication_error"
        )
        assert call(local, "GET", "/v1/models", headers={"Authorization": "Bearer k2"})[0] == 200
        _assert_error(
            call(local, "GET", "/admin/models", headers={"Authorization": "Bearer k1"}),
            403,
            code="admin_disabled",
            type_="permission_error",
        )
        with grpc.insecure_channel(servers.grpc_target) as channel:
            stub = serving_pb2_grpc.ServingStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListModels(serving_pb2.ListModelsRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.ListModels(
                serving_pb2.ListModelsRequest(), metadata=(("authorization", "Bearer k1"),), timeout=10
            )
            assert [m.id for m in reply.models] == ["base"]
    finally:
        servers.stop()


# ---------------------------------------------------------------- gRPC


def test_grpc_generate_stream_and_list(served):
    with grpc.insecure_channel(served.servers.grpc_target) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        models = stub.ListModels(serving_pb2.ListModelsRequest(), timeout=10).models
        assert {m.id: m.kind for m in models} == {
            "base": "base",
            "alpha": "blocks",
            "beta": "blocks",
            "gamma": "lora",
            "delta": "lora",
        }
        assert all(m.context_length == 128 and m.base == "tiny-llama" for m in models)
        prompt = "hello there"
        ids = served.tokenizer(prompt).input_ids
        for model in ("beta", "delta"):
            request = serving_pb2.GenerateRequest(model=model, prompt=prompt, max_tokens=15, temperature=0)
            reply = stub.Generate(request, timeout=30)
            assert list(reply.token_ids) == greedy(served.references[model], ids, 15, eos=EOS)
            assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(reply.token_ids)
            chunks = list(stub.GenerateStream(request, timeout=30))
            assert "".join(c.text for c in chunks) == reply.text
            assert [t for c in chunks for t in c.token_ids] == list(reply.token_ids)
            assert (
                chunks[-1].finish_reason == reply.finish_reason
                and chunks[-1].usage.total_tokens == reply.usage.total_tokens
            )
        chat = serving_pb2.GenerateRequest(
            model="alpha", messages=[serving_pb2.ChatMessage(role="user", content="hi")], max_tokens=6, temperature=0
        )
        assert stub.Generate(chat, timeout=30).usage.completion_tokens >= 1
        for request, code in (
            (serving_pb2.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND),
            (serving_pb2.GenerateRequest(model="alpha", prompt="x", temperature=7), grpc.StatusCode.INVALID_ARGUMENT),
            (serving_pb2.GenerateRequest(model="alpha", prompt="x" * 300), grpc.StatusCode.INVALID_ARGUMENT),
            (serving_pb2.GenerateRequest(model="alpha", prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            for call_ in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
                with pytest.raises(grpc.RpcError) as caught:
                    call_(request, timeout=10)
                assert caught.value.code() == code, caught.value.details()
        # a stream the client cancels frees its slot
        stream = stub.GenerateStream(
            serving_pb2.GenerateRequest(model="gamma", prompt="abc", max_tokens=100, temperature=0), timeout=30
        )
        next(stream)
        stream.cancel()
    deadline = time.monotonic() + 20
    while served.servers.service.scheduler.load()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.servers.service.scheduler.load()["active"] == 0


# ---------------------------------------------------------------- offsite query


def test_offsite_query_streams_the_answer(served, capsys):
    from offsite.cli import main

    ids = served.tokenizer("abc").input_ids
    expected = expected_text(served, "alpha", ids, 9)
    assert main(["query", "--url", served.servers.http_url, "-m", "alpha", "--raw", "--max-tokens", "9", "abc"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert (
        main(["query", "--grpc", served.servers.grpc_target, "-m", "alpha", "--raw", "--max-tokens", "9", "abc"]) == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    assert main(["query", "--url", served.servers.http_url, "-m", "beta", "--max-tokens", "3", "hi"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["query", "--url", served.servers.http_url, "--list"]) == 0
    assert capsys.readouterr().out.split("\n")[0].startswith("base ")
    assert main(["query", "--url", served.servers.http_url, "-m", "nope", "hi"]) == 1
    assert "404: The model 'nope' does not exist" in capsys.readouterr().err


def test_serve_checks_plugin_gain_before_loading_the_model(tmp_path, capsys):
    from offsite.cli import main

    registry_dir = tmp_path / "registry"
    assert (
        main(
            [
                "cloud",
                "serve",
                "--registry",
                str(registry_dir),
                "--model",
                str(tmp_path / "no-model"),
                "--add",
                f"job={tmp_path / 'u.safetensors'}",
                "--plugin-gain",
                "-1",
            ]
        )
        == 2
    )
    assert "--plugin-gain: the plug-in gain must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert (
        main(
            [
                "cloud",
                "serve",
                "--registry",
                str(registry_dir),
                "--model",
                str(tmp_path / "no-model"),
                "--plugin-gain",
                "1.5",
            ]
        )
        == 2
    )
    assert "--plugin-gain applies to --add jobs; there are none" in capsys.readouterr().err
    assert not registry_dir.exists()
