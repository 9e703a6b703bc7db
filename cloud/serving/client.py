"""Clients of ``offsite cloud serve`` (what ``offsite query`` uses): HTTP (standard library,
server-sent events) and gRPC (the generated stub)."""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from offsite.protocol._generated import serving_pb2, serving_pb2_grpc


class QueryError(RuntimeError):
    """The server refused or failed a request; the message is the server's."""


@dataclass
class Query:
    """One request: ``messages`` (chat, the model's chat template) or ``prompt`` (raw text)."""

    model: str
    prompt: str | None = None
    messages: list[dict] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def body(self) -> dict:
        body: dict = {"model": self.model}
        if self.messages:
            body["messages"] = self.messages
        else:
            body["prompt"] = self.prompt or ""
        for key in ("max_tokens", "temperature", "top_p", "seed"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        if self.stop:
            body["stop"] = self.stop
        return body


class HttpClient:
    """The OpenAI-compatible HTTP API at ``url`` (``http://host:port``)."""

    def __init__(
        self, url: str, api_key: str | None = None, timeout: float = 600.0, cafile: Path | str | None = None
    ) -> None:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https"):
            raise QueryError(f"{url}: the URL must start with http:// or https://")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname or "127.0.0.1", parts.port
        self.api_key, self.timeout = api_key, timeout
        self.context = (
            ssl.create_default_context(cafile=str(cafile) if cafile else None) if self.scheme == "https" else None
        )

    def _connection(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _request(
        self, method: str, path: str, body: dict | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        connection = self._connection()
        try:
            connection.request(
                method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers
            )
            response = connection.getresponse()
        except OSError as error:
            connection.close()
            raise QueryError(f"{self.scheme}://{self.host}:{self.port}: {error}") from None
        if response.status >= 400:
            data = response.read()
            connection.close()
            raise QueryError(_error_message(response.status, data))
        return connection, response

    def models(self) -> list[dict]:
        connection, response = self._request("GET", "/v1/models")
        with contextlib.closing(connection):
            return json.loads(response.read())["data"]

    def stream(self, query: Query) -> Iterator[str]:
        """The answer's text, piece by piece, as the server decodes it."""
        chat = bool(query.messages)
        connection, response = self._request(
            "POST", "/v1/chat/completions" if chat else "/v1/completions", query.body() | {"stream": True}
        )
        with contextlib.closing(connection):
            for line in response:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:") :].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise QueryError(event["error"].get("message", str(event["error"])))
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                    if text:
                        yield text
        raise QueryError("the stream ended without [DONE]")


def _error_message(status: int, data: bytes) -> str:
    try:
        return f"{status}: {json.loads(data)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {data[:200].decode(errors='replace')}"


class GrpcClient:
    """The gRPC service at ``target`` (``host:port``): over TLS trusting ``cafile`` when given,
    else a plain channel."""

    def __init__(
        self, target: str, api_key: str | None = None, timeout: float = 600.0, cafile: Path | str | None = None
    ) -> None:
        if cafile:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(cafile).read_bytes()))
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = serving_pb2_grpc.ServingStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    def _request(self, query: Query):
        request = serving_pb2.GenerateRequest(
            model=query.model, prompt=query.prompt or "", max_tokens=query.max_tokens or 0, stop=query.stop
        )
        request.messages.extend(serving_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in query.messages)
        for key in ("temperature", "top_p", "seed"):
            if getattr(query, key) is not None:
                setattr(request, key, getattr(query, key))
        return request

    def models(self) -> list[dict]:
        try:
            reply = self.stub.ListModels(serving_pb2.ListModelsRequest(), metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise QueryError(f"{error.code().name}: {error.details()}") from None
        return [
            {"id": m.id, "kind": m.kind, "adapter_blocks": list(m.adapter_blocks), "context_length": m.context_length}
            for m in reply.models
        ]

    def stream(self, query: Query) -> Iterator[str]:
        try:
            for chunk in self.stub.GenerateStream(self._request(query), metadata=self.metadata, timeout=self.timeout):
                if chunk.text:
                    yield chunk.text
        except grpc.RpcError as error:
            raise QueryError(f"{error.code().name}: {error.details()}") from None

    def close(self) -> None:
        self.channel.close()
