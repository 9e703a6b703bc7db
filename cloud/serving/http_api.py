"""The OpenAI-compatible HTTP API: a thin FastAPI app over :class:`.service.ServingService`
(served by :mod:`.http_server`; the OpenAPI docs are at ``/docs``).

Inference (``Authorization: Bearer KEY`` when API keys are on)::

    GET  /v1/models, /v1/models/{id}   "base" and every registered job (vLLM's root and parent)
    POST /v1/completions               prompt(s) or token ids; echo, logprobs, n, stop, seed, stream
    POST /v1/chat/completions          messages (the tokenizer's chat template); logprobs, top_logprobs, n
    GET  /metrics                      Prometheus (an API key or the admin token when API keys are on)
    GET  /health                       liveness: the scheduler runs (with its counters)
    GET  /ready                        readiness: takes requests now (not draining, queue not full)

Admin (``Authorization: Bearer ADMIN_TOKEN``)::

    GET    /admin/models               the registered jobs with their metadata
    POST   /admin/models               {"name", "path", "replace", "plugin_gain"}
    PUT    /admin/models/{name}        body: an adapter file (safetensors); ?replace=true, ?plugin_gain=G
    DELETE /admin/models/{name}
    POST   /v1/load_lora_adapter       vLLM's: {"lora_name", "lora_path", "load_inplace"}
    POST   /v1/unload_lora_adapter     vLLM's: {"lora_name"}

Every error is an OpenAI error body; ``stream: true`` answers with server-sent events ending in
``data: [DONE]`` (an error after the first event is an event of its own before it). A client that
goes away has its requests cancelled. A body is at most 8 MiB (an adapter upload: 4 GiB), and an
answer given before the body was read closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .generation import ClientGone, LoopWaker, follow
from .metrics import CONTENT_TYPE
from .openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    RegisterRequest,
    UnloadLoraAdapterRequest,
    brief,
    parse_json,
    validate,
)
from .responses import Reply, TokenTexts
from .service import Prepared, ServingError, ServingService

log = logging.getLogger(__name__)
access = logging.getLogger("offsite.serving.access")

MAX_JSON_BYTES = 8 << 20
INLINE_BODY_BYTES = 256 << 10  # larger bodies are parsed and validated off the event loop
ENDPOINTS = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/admin/models",
    "/metrics",
    "/health",
    "/ready",
    "/docs",
    "/openapi.json",
)


def endpoint_label(path: str) -> str:
    """The metrics label of a path: its route, never the raw path (clients cannot grow the labels)."""
    if path in ENDPOINTS:
        return path
    for prefix in ("/v1/models/", "/admin/models/"):
        if path.startswith(prefix):
            return prefix + "{name}"
    return "other"


class Gate:
    """ASGI middleware: the access log, the request counter, and ``Connection: close`` on an answer
    given before the request's body was read (its bytes would otherwise be read as a request)."""

    def __init__(self, app, service: ServingService, access_log: bool = True) -> None:
        self.app, self.service, self.access_log = app, service, access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        framing = {name: value for name, value in scope["headers"] if name in (b"content-length", b"transfer-encoding")}
        state = {
            "body_done": framing.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in framing,
            "status": 500,
        }

        async def receive_() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def send_(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                if not state["body_done"]:
                    message = message | {"headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive_, send_)
        finally:
            model = scope.get("state", {}).get("model")
            self.service.metrics.count_request("http", endpoint_label(scope["path"]), model, str(state["status"]))
            if self.access_log:
                client = scope.get("client") or ("-", 0)
                access.info(
                    '%s:%s "%s %s" %d %s %.3fs',
                    client[0],
                    client[1],
                    scope["method"],
                    brief(scope["path"]),
                    state["status"],
                    model or "-",
                    time.perf_counter() - started,
                )


def _schema(model) -> dict:
    """``model``'s JSON schema with its ``$defs`` inlined (an OpenAPI request body of its own)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None else None  # llhttp has checked it: ASCII digits


async def read_body(request: Request, limit: int = MAX_JSON_BYTES) -> bytes:
    """The request's body, at most ``limit`` bytes (a larger declared length is refused before a
    byte is read); a body that ends before its declared length is a 400."""
    declared = _content_length(request)
    if declared is not None and declared > limit:
        raise ServingError(413, f"the body is {declared} bytes; the limit is {limit}", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServingError(413, f"the body is over {limit} bytes, the limit", code="too_large")
        chunks.append(chunk)
    if declared is not None and size < declared:
        raise ServingError(400, f"the body ended after {size} of {declared} bytes", code="incomplete_body")
    return b"".join(chunks)


def _sse(data) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


def build_app(
    service: ServingService, ready: Callable[[], str | None] | None = None, access_log: bool = True
) -> FastAPI:
    """The app. ``ready()`` says why the server should not take new requests now (None: it should)."""
    app = FastAPI(
        title="Offsite serving",
        version="1",
        summary="OpenAI-compatible API over the base model and every registered job",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.add_middleware(Gate, service=service, access_log=access_log)
    _add_error_handlers(app)
    _add_inference(app, service)
    _add_operations(app, service, ready or (lambda: None))
    _add_admin(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, error: ServingError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        refused = ServingError(
            error.status_code, f"no such endpoint: {request.method} {brief(request.url.path)}", code="unknown_url"
        )
        return JSONResponse(refused.body(), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        return JSONResponse(
            ServingError(400, "the request's path or query is invalid", code="invalid_value").body(), status_code=400
        )

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def internal_error(
        request: Request, error: Exception
    ) -> Response:  # a bug: the cause goes to the log, not to the client
        log.error("%s %s failed", request.method, brief(request.url.path), exc_info=error)
        return JSONResponse(
            ServingError(500, "internal error (the server logged the cause)", type="server_error").body(),
            status_code=500,
        )


def _add_inference(app: FastAPI, service: ServingService) -> None:
    texts = TokenTexts(service.tokenizer)
    wakers: dict[asyncio.AbstractEventLoop, LoopWaker] = {}  # one per event loop serving the app (uvicorn: one)

    async def prepare(request: Request, method: Callable[[dict], Prepared]) -> Prepared:
        service.check_api_key(request.headers.get("authorization"))
        raw = await read_body(request)

        def parsed() -> Prepared:
            return method(parse_json(raw))

        prepared = parsed() if len(raw) <= INLINE_BODY_BYTES else await run_in_threadpool(parsed)
        request.state.model = prepared.model
        return prepared

    async def answer(request: Request, prepared: Prepared) -> Response:
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        waker = wakers.get(loop) or wakers.setdefault(loop, LoopWaker(loop))
        generations = service.start(prepared, waker.listener(wake))
        reply = Reply(prepared, generations, texts)
        if prepared.stream:
            return StreamingResponse(
                _stream(reply, wake), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )

        async def alive() -> bool:
            return not await request.is_disconnected()

        try:
            async for _ in follow(generations, wake, alive):
                pass
        except ClientGone:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        return JSONResponse(reply.body())

    @app.post("/v1/completions", openapi_extra=_schema(CompletionRequest), tags=["inference"])
    async def completions(request: Request) -> Response:
        return await answer(request, await prepare(request, service.prepare_completion))

    @app.post("/v1/chat/completions", openapi_extra=_schema(ChatCompletionRequest), tags=["inference"])
    async def chat_completions(request: Request) -> Response:
        return await answer(request, await prepare(request, service.prepare_chat))

    @app.get("/v1/models", tags=["inference"])
    async def models(request: Request) -> dict:
        service.check_api_key(request.headers.get("authorization"))
        return {"object": "list", "data": service.models()}

    @app.get("/v1/models/{name}", tags=["inference"])
    async def model(name: str, request: Request) -> dict:
        service.check_api_key(request.headers.get("authorization"))
        return service.model_info(name, service.resolve(name))


def _add_operations(app: FastAPI, service: ServingService, ready: Callable[[], str | None]) -> None:
    @app.get("/health", tags=["operations"])
    async def health() -> Response:
        """Liveness: 200 while the scheduler runs (503: restart the server)."""
        stats = service.scheduler.snapshot()
        body = {
            "status": "ok" if service.scheduler.running else "dead",
            **service.scheduler.load(),
            "stats": {
                "steps": stats.steps,
                "decode_tokens": stats.decode_tokens,
                "prefill_tokens": stats.prefill_tokens,
                "finished": stats.finished,
                "cancelled": stats.cancelled,
                "errors": stats.errors,
                "max_rows": stats.max_rows,
                "max_jobs_in_step": stats.max_jobs_in_step,
                "kv_cache_bytes": service.stack.cache.nbytes(),
            },
        }
        return JSONResponse(body, status_code=200 if service.scheduler.running else 503)

    @app.get("/ready", tags=["operations"])
    async def readiness() -> Response:
        """Readiness: 200 while new requests are taken (503 while draining or with the queue full)."""
        reason = ready()
        if reason is None and not service.scheduler.alive:
            reason = "the scheduler is not running"
        if reason is None and service.scheduler.load()["waiting"] >= service.config.max_queue:
            reason = "the queue is full"
        return JSONResponse(
            {"status": "ready"} if reason is None else {"status": "not ready", "reason": reason},
            status_code=200 if reason is None else 503,
        )

    @app.get("/metrics", tags=["operations"])
    async def metrics(request: Request) -> Response:
        service.check_metrics_access(request.headers.get("authorization"))
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)


def _add_admin(app: FastAPI, service: ServingService) -> None:
    def admin(request: Request) -> None:
        service.check_admin(request.headers.get("authorization"))

    @app.get("/admin/models", tags=["admin"])
    async def listed(request: Request) -> dict:
        admin(request)
        jobs = service.jobs()
        return {
            "object": "list",
            "data": [
                service.model_info(n, job) | {"meta": job.meta, "bytes": job.nbytes()}
                for n, job in sorted(jobs.items())
            ],
        }

    @app.post("/admin/models", openapi_extra=_schema(RegisterRequest), tags=["admin"], status_code=201)
    async def register(request: Request) -> Response:
        admin(request)
        body = validate(RegisterRequest, parse_json(await read_body(request)))
        info = await run_in_threadpool(service.register, body.name, body.path, body.replace, body.plugin_gain)
        return JSONResponse(info, status_code=201)

    @app.put("/admin/models/{name}", tags=["admin"], status_code=201)
    async def upload(name: str, request: Request) -> Response:
        """The body is an adapter file; name, gain and size are checked before it is read."""
        admin(request)
        replace = request.query_params.get("replace", "false").lower() in ("1", "true", "yes")
        gain = _plugin_gain(request)
        upload = service.begin_upload(name, _content_length(request), replace=replace, plugin_gain=gain)
        try:
            async for chunk in request.stream():
                upload.write(chunk)
        except BaseException:
            upload.abort()
            raise
        return JSONResponse(await run_in_threadpool(upload.finish), status_code=201)

    @app.delete("/admin/models/{name}", tags=["admin"])
    async def unregister(name: str, request: Request) -> dict:
        admin(request)
        return await run_in_threadpool(service.unregister, name)

    _add_vllm_admin(app, service, admin)


def _plugin_gain(request: Request) -> float | None:
    """The upload's ``plugin_gain`` query parameter (None when absent)."""
    gain = request.query_params.get("plugin_gain")
    try:
        return float(gain) if gain is not None else None
    except ValueError:
        raise ServingError(
            400, f"'plugin_gain' must be a number, got {brief(gain)}", param="plugin_gain", code="invalid_type"
        ) from None


def _add_vllm_admin(app: FastAPI, service: ServingService, admin: Callable[[Request], None]) -> None:
    """vLLM's names for registering and unregistering adapters."""

    @app.post("/v1/load_lora_adapter", openapi_extra=_schema(LoadLoraAdapterRequest), tags=["admin"])
    async def load_lora_adapter(request: Request) -> Response:
        """vLLM's name for ``POST /admin/models``."""
        admin(request)
        body = validate(LoadLoraAdapterRequest, parse_json(await read_body(request)))
        await run_in_threadpool(service.register, body.lora_name, body.lora_path, body.load_inplace, body.plugin_gain)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", openapi_extra=_schema(UnloadLoraAdapterRequest), tags=["admin"])
    async def unload_lora_adapter(request: Request) -> Response:
        """vLLM's name for ``DELETE /admin/models/{name}``."""
        admin(request)
        body = validate(UnloadLoraAdapterRequest, parse_json(await read_body(request)))
        await run_in_threadpool(service.unregister, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def _stream(reply: Reply, wake: asyncio.Event):
    try:
        for chunk in reply.opening():
            yield _sse(chunk)
        async for index, piece in follow(reply.generations, wake):
            for chunk in reply.chunks(index, piece):
                yield _sse(chunk)
        for chunk in reply.closing():
            yield _sse(chunk)
    except ServingError as error:  # the headers are out: report it in the stream
        yield _sse(error.body())
    yield _sse(b"[DONE]")
