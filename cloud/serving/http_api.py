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

Connections: at most ``ServeConfig.max_connections`` at once (one thread each; one more is answered
503 and closed), each closed after ``idle_timeout`` seconds without a byte from its client. A
request body is framed by exactly one plain ``Content-Length``: a duplicate, a sign, a
``Transfer-Encoding``, a malformed header line or a body on GET/DELETE is refused with 400 (411
for chunked) and the connection closed, and a connection whose body was not read to its end is
closed after the answer, so no body byte is ever read as a request.
"""

from __future__ import annotations

import json
import logging
import re
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .service import (
    ClientGone,
    Generation,
    Prepared,
    ServingError,
    ServingService,
    brief,
)

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 8 << 20
MAX_JSON_DEPTH = 32  # an OpenAI request nests about 5 levels (messages -> content parts)
LINGER_S, LINGER_BYTES = 2.0, 1 << 20  # what a closing connection reads and drops of its client's unread bytes, at most
_LENGTH = re.compile(r"[0-9]{1,19}")  # ASCII digits only: no sign, no '_', no other scripts' digits


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them: one more is answered 503 and
    closed from the accepting thread, without a thread of its own."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, service: ServingService, max_connections: int, idle_timeout: float) -> None:
        self.service = service
        self.max_connections, self.idle_timeout = max_connections, idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            name = f"offsite-serve-http-{self.server_address[1]}"  # a connection's thread, named for its server
            threading.Thread(target=self.process_request_thread, args=(request, client_address), name=name, daemon=True).start()
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        error = ServingError(503, f"the server has {self.max_connections} connections open, its limit; retry later", type="server_error", code="too_many_connections")
        data = json.dumps(error.body()).encode()
        head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        try:
            request.setblocking(False)  # never wait on this client: the reply fits the socket's buffer or is dropped
            request.send(head.encode() + data)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close_request(request)

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
    server: _Server
    _length = 0  # the request body's length (Content-Length)
    _left = 0  # the body's bytes not read yet

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # a connection whose client sends nothing for this long is closed
        self._linger = False
        super().setup()

    def finish(self) -> None:
        """Closing with request bytes unread: stop sending, then read (and drop) what the client is
        still sending for a moment, so that it gets the answer and not a reset (a lingering close)."""
        try:
            super().finish()
            if self._linger:
                self.connection.shutdown(socket.SHUT_WR)
                deadline, drained = time.monotonic() + LINGER_S, 0
                while drained < LINGER_BYTES and time.monotonic() < deadline:
                    self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = self.connection.recv(1 << 16)
                    if not chunk:
                        break
                    drained += len(chunk)
        except OSError:
            pass

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
        if self._left:  # the unread body would be taken for the next request
            self.close_connection = self._linger = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ServingError) -> None:
        self._send_json(error.status, error.body())

    def parse_request(self) -> bool:
        """The stdlib's parsing, then the body's framing: anything two parsers could read two ways
        (a proxy in front and this server) is refused with 400 and the connection closed."""
        self._length = self._left = 0
        if not super().parse_request():
            return False
        try:
            self._length = self._left = _body_length(self.headers)
            if self._length and self.command in ("GET", "HEAD", "DELETE"):
                raise ServingError(400, f"a {self.command} request takes no body (this one has {self._length} bytes)", code="bad_framing")
        except ServingError as error:
            self._length = self._left = 0
            self.close_connection = self._linger = True
            self._send_error(error)
            return False
        return True

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body (b'' once it is all read)."""
        data = self.rfile.read(min(size, self._left)) if self._left else b""
        self._left = 0 if not data else self._left - len(data)
        return data

    def _json_body(self) -> dict:
        if self._length > MAX_JSON_BYTES:
            raise ServingError(413, f"the body is {self._length} bytes; the limit is {MAX_JSON_BYTES}", code="too_large")
        return parse_json(self._read(self._length))

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
            try:
                self._send_error(error)
            except OSError:
                self.close_connection = True
        except (ConnectionError, TimeoutError, ClientGone):
            self.close_connection = True
        except Exception:  # a bug: answer 500 (the cause goes to the log, not to the client), keep serving
            log.exception("%s %s failed", method, path)
            try:
                self._send_error(ServingError(500, "internal error (the server logged the cause)", type="server_error"))
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
        elif name and method == "PUT":  # name, gain and size are checked before the body is read; it goes to disk as it comes
            query = parse_qs(urlsplit(self.path).query)
            replace = query.get("replace", ["false"])[0].lower() in ("1", "true", "yes")
            gain = query.get("plugin_gain", [None])[0]
            if gain is not None:
                try:
                    gain = float(gain)
                except ValueError:
                    raise ServingError(400, f"'plugin_gain' must be a number, got {brief(gain)}", param="plugin_gain", code="invalid_type") from None
            self._send_json(201, service.register_upload(name, self._read, self._length, replace=replace, plugin_gain=gain))
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


def _body_length(headers) -> int:
    """The body's length from ``headers``; ServingError for framing that is not one plain Content-Length."""
    if headers.defects or headers.get_payload():  # a header line the parser could not read, e.g. "Content-Length : 5"
        raise ServingError(400, "a header line is malformed", code="bad_framing")
    lengths = headers.get_all("Content-Length") or []
    if headers.get_all("Transfer-Encoding"):
        if lengths:
            raise ServingError(400, "the request has both Transfer-Encoding and Content-Length", code="bad_framing")
        raise ServingError(411, "send the body with a Content-Length (chunked request bodies are not supported)", code="length_required")
    if len(lengths) > 1:
        raise ServingError(400, f"the request has {len(lengths)} Content-Length headers", code="bad_framing")
    if not lengths:
        return 0
    if not _LENGTH.fullmatch(lengths[0].strip(" \t")):
        raise ServingError(400, f"Content-Length must be a decimal number of bytes, got {brief(lengths[0])}", code="bad_framing")
    return int(lengths[0].strip(" \t"))


def parse_json(raw: bytes) -> dict:
    """A request body: one JSON object, at most :data:`MAX_JSON_DEPTH` levels deep. Every way it
    can be wrong is a ServingError (400) that says how, in words of its own."""
    try:
        body = json.loads(raw) if raw else None
    except json.JSONDecodeError as error:
        raise ServingError(400, f"the body is not valid JSON ({error.msg}: line {error.lineno} column {error.colno})", code="invalid_json") from None
    except UnicodeDecodeError:
        raise ServingError(400, "the body is not valid JSON (not UTF-8 text)", code="invalid_json") from None
    except RecursionError:
        raise ServingError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except ValueError:  # an integer literal past Python's 4300-digit limit
        raise ServingError(400, "the body holds a number too long to read", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ServingError(400, "the body must be a JSON object", code="invalid_json")
    level, depth = [body], 1
    while level:
        if depth > MAX_JSON_DEPTH:
            raise ServingError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, (dict, list))]
        depth += 1
    return body


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
        config = service.config
        self._server = _Server((host, port), _Handler, service, config.max_connections, config.idle_timeout)
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="offsite-serve-http", daemon=True)

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
