"""OpenAI-compatible HTTP on the standard library's threading HTTP server (HTTP/1.1, keep-alive).

Inference (``Authorization: Bearer KEY`` when API keys are on)::

    GET  /v1/models                 the served models: "base" and every registered job
    GET  /v1/models/{id}
    POST /v1/completions            {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"}
    POST /v1/chat/completions       {"model", "messages", ...}; the tokenizer's chat template
    GET  /health                    {"status": "ok", "active", "waiting", scheduler counters}

Admin (``Authorization: Bearer ADMIN_TOKEN``)::

    GET    /admin/models            the registered jobs with their metadata
    POST   /admin/models            {"name", "path": a finished job dir or adapter file on the server, "replace",
                                     "plugin_gain": the recipe's plug-in gain (default: the source's own, else 1)}
    PUT    /admin/models/{name}     body: an adapter file (safetensors); ?replace=true to replace, ?plugin_gain=G
    DELETE /admin/models/{name}

``stream: true`` answers with server-sent events (chunked), one ``data: {json}`` per piece of text,
ending with ``data: [DONE]``. Every error is an OpenAI error body
``{"error": {"message", "type", "param", "code"}}``; a client that goes away mid-request has its
request cancelled, and the server goes on serving everyone else.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .service import (
    MAX_UPLOAD_BYTES,
    ClientGone,
    Generation,
    Prepared,
    ServingError,
    ServingService,
)

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 8 << 20


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, service: ServingService) -> None:
        self.service = service
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up between requests is normal; anything else is logged, and the server goes on."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("%s: %s", client_address, error)
        else:
            log.error("request from %s failed", client_address, exc_info=error)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "offsite-serve"
    timeout = 120  # an idle keep-alive connection is closed after this many seconds
    server: _Server

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------ plumbing

    @property
    def service(self) -> ServingService:
        return self.server.service

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ServingError) -> None:
        self._send_json(error.status, error.body())

    def _read_body(self, limit: int) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ServingError(411, "send the body with a Content-Length (chunked request bodies are not supported)", code="length_required")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise ServingError(400, "Content-Length is not a number", code="invalid_request") from None
        if length > limit:
            self.close_connection = True
            raise ServingError(413, f"the body is {length} bytes; the limit is {limit}", code="too_large")
        self._consumed = True
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self) -> dict:
        raw = self._read_body(MAX_JSON_BYTES)
        try:
            body = json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ServingError(400, f"the body is not valid JSON ({error})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ServingError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _alive(self) -> bool:
        """False once the client has closed its end (checked while a generation waits)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if readable:
                return self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False
        return True

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._consumed = False
        try:
            if path.startswith("/admin/"):
                self.service.check_admin(self.headers.get("Authorization"))
                self._admin(method, path)
                return
            if path == "/health" and method == "GET":
                self._send_json(200, {"status": "ok", **self.service.scheduler.load(), "stats": _stats(self.service)})
                return
            if not path.startswith("/v1/"):
                raise ServingError(404, f"no such endpoint: {method} {path}", code="unknown_url")
            self.service.check_api_key(self.headers.get("Authorization"))
            if method == "GET" and path == "/v1/models":
                self._send_json(200, {"object": "list", "data": self.service.models()})
            elif method == "GET" and path.startswith("/v1/models/"):
                name = path[len("/v1/models/"):]
                self._send_json(200, self.service.model_info(name, self.service.resolve(name)))
            elif method == "POST" and path == "/v1/completions":
                self._complete(self.service.prepare_completion(self._json_body()), chat=False)
            elif method == "POST" and path == "/v1/chat/completions":
                self._complete(self.service.prepare_chat(self._json_body()), chat=True)
            else:
                raise ServingError(404 if path not in ("/v1/models", "/v1/completions", "/v1/chat/completions") else 405,
                                   f"no such endpoint: {method} {path}", code="unknown_url")
        except ServingError as error:
            if not self._consumed and self.headers.get("Content-Length", "0") not in ("", "0"):
                self.close_connection = True  # the unread body would be taken for the next request
            try:
                self._send_error(error)
            except OSError:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            self.close_connection = True
        except Exception as error:  # a bug: answer 500, keep serving
            log.exception("%s %s failed", method, path)
            try:
                self._send_error(ServingError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))
            except OSError:
                self.close_connection = True

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    # ------------------------------------------------------------ admin

    def _admin(self, method: str, path: str) -> None:
        service = self.service
        name = path[len("/admin/models/"):] if path.startswith("/admin/models/") else None
        if path == "/admin/models" and method == "GET":
            jobs = service.jobs()
            self._send_json(200, {"object": "list", "data": [service.model_info(n, job) | {"meta": job.meta, "bytes": job.nbytes()} for n, job in sorted(jobs.items())]})
        elif path == "/admin/models" and method == "POST":
            body = self._json_body()
            name, source, replace = body.get("name"), body.get("path"), body.get("replace", False)
            if not isinstance(source, str) or not source:
                raise ServingError(400, "'path' must name a finished job directory or an adapter file on the server", param="path", code="invalid_value")
            if not isinstance(replace, bool):
                raise ServingError(400, "'replace' must be true or false", param="replace", code="invalid_type")
            self._send_json(201, service.register(name, source, replace=replace, plugin_gain=body.get("plugin_gain")))
        elif name and method == "PUT":
            query = parse_qs(urlsplit(self.path).query)
            replace = query.get("replace", ["false"])[0].lower() in ("1", "true", "yes")
            gain = query.get("plugin_gain", [None])[0]
            if gain is not None:
                try:
                    gain = float(gain)
                except ValueError:
                    raise ServingError(400, f"'plugin_gain' must be a number, got {gain!r}", param="plugin_gain", code="invalid_type") from None
            self._send_json(201, service.register_bytes(name, self._read_body(MAX_UPLOAD_BYTES), replace=replace, plugin_gain=gain))
        elif name and method == "DELETE":
            self._send_json(200, service.unregister(name))
        else:
            raise ServingError(404, f"no such endpoint: {method} {path}", code="unknown_url")

    # ------------------------------------------------------------ completions

    def _complete(self, prepared: Prepared, chat: bool) -> None:
        generation = self.service.start(prepared)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        try:
            if prepared.stream:
                self._stream(generation, prepared, ident, created, kind + (".chunk" if chat else ""), chat)
            else:
                text = "".join(piece for piece, _ in generation.pieces(self._alive))
                choice = {"index": 0, "finish_reason": generation.finish_reason, "logprobs": None}
                choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                self._send_json(200, {"id": ident, "object": kind, "created": created, "model": prepared.model,
                                      "choices": [choice], "usage": generation.usage()})
        finally:
            generation.cancel()  # a no-op once finished; frees the slot when the client went away

    def _stream(self, generation: Generation, prepared: Prepared, ident: str, created: int, kind: str, chat: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": ident, "object": kind, "created": created, "model": prepared.model}

        def event(payload) -> None:
            data = ("data: " + (payload if isinstance(payload, str) else json.dumps(payload)) + "\n\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def chunk(text: str | None, finish: str | None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return base | {"choices": [choice]}

        try:
            if chat:
                event(base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]})
            for piece, _ in generation.pieces(self._alive):
                if piece:
                    event(chunk(piece, None))
            event(chunk(None if chat else "", generation.finish_reason))
            if prepared.include_usage:
                event(base | {"choices": [], "usage": generation.usage()})
        except ServingError as error:  # the headers are out: report it in the stream
            event(error.body())
        event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _stats(service: ServingService) -> dict:
    stats = service.scheduler.stats
    return {
        "steps": stats.steps, "decode_tokens": stats.decode_tokens, "prefill_tokens": stats.prefill_tokens,
        "finished": stats.finished, "cancelled": stats.cancelled, "errors": stats.errors, "max_rows": stats.max_rows,
        "max_jobs_in_step": stats.max_jobs_in_step, "kv_cache_bytes": service.stack.cache.nbytes(),
    }  # fmt: skip


class HttpServer:
    """The HTTP API on ``host:port`` (0: a free port), served from a background thread."""

    def __init__(self, service: ServingService, host: str = "127.0.0.1", port: int = 8000) -> None:
        self._server = _Server((host, port), _Handler, service)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="offsite-serve-http", daemon=True)

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
