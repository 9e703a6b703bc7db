"""The gRPC query service (``protocol/serving.proto``): Generate, GenerateStream, ListModels;
beside it the standard health service (``grpc.health.v1.Health``: SERVING while requests are
taken, NOT_SERVING once the server drains).

Requests are validated exactly as the HTTP API's (the same :class:`.service.ServingService`);
a refusal is a gRPC status (NOT_FOUND, INVALID_ARGUMENT, UNAUTHENTICATED, ...) with the same
message. A client that cancels or disconnects has its request cancelled. With TLS files the port
speaks TLS only.
"""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from offsite.protocol._generated import serving_pb2, serving_pb2_grpc

from .generation import ClientGone
from .http_server import TlsFiles
from .service import ServingError, ServingService

log = logging.getLogger(__name__)

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.ALREADY_EXISTS, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}  # fmt: skip
_SERVICE = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name


def _body(request: serving_pb2.GenerateRequest) -> dict:
    """The request as an OpenAI body, so both APIs share one validation."""
    body: dict = {"model": request.model}
    if request.max_tokens:
        body["max_tokens"] = request.max_tokens
    for key in ("temperature", "top_p", "seed"):
        if request.HasField(key):
            body[key] = getattr(request, key)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.messages:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        body["prompt"] = request.prompt
    return body


def _parse(message_type, data: bytes, context: grpc.ServicerContext):
    """A request's bytes as ``message_type``; bytes that are not one (or a string that is not
    UTF-8) are the client's error: INVALID_ARGUMENT, not grpcio's INTERNAL."""
    try:
        return message_type.FromString(data)
    except (DecodeError, ValueError):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {message_type.DESCRIPTOR.full_name} message"
        )


def _counted(servicer: ServingServicer, name: str, method):
    """``method`` with each call counted in the metrics (by its final status)."""

    def call(data, context):
        try:
            return method(data, context)
        finally:
            servicer.count(name, context)

    return call


def _handlers(servicer: ServingServicer) -> dict:
    """The service's methods, each taking its request as bytes and parsing it itself."""

    def unary(name, method, message_type):
        return _counted(servicer, name, lambda data, context: method(_parse(message_type, data, context), context))

    def stream(data, context):
        try:
            yield from servicer.GenerateStream(_parse(serving_pb2.GenerateRequest, data, context), context)
        finally:
            servicer.count("GenerateStream", context)

    return {
        "Generate": grpc.unary_unary_rpc_method_handler(
            unary("Generate", servicer.Generate, serving_pb2.GenerateRequest),
            response_serializer=serving_pb2.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            stream, response_serializer=serving_pb2.GenerateChunk.SerializeToString
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            unary("ListModels", servicer.ListModels, serving_pb2.ListModelsRequest),
            response_serializer=serving_pb2.ListModelsResponse.SerializeToString,
        ),
    }


class ServingServicer(serving_pb2_grpc.ServingServicer):
    def __init__(self, service: ServingService) -> None:
        self.service = service
        self.models: dict = {}  # context -> the model its call resolved

    def count(self, method: str, context: grpc.ServicerContext) -> None:
        code = context.code()  # set by abort; None: OK
        self.service.metrics.count_request(
            "grpc", method, self.models.pop(context, None), code.name if code is not None else "OK"
        )

    def _authorize(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.service.check_api_key(metadata.get("authorization"))

    def _start(self, request: serving_pb2.GenerateRequest, context: grpc.ServicerContext):
        self._authorize(context)
        body = _body(request)
        prepared = self.service.prepare_chat(body) if request.messages else self.service.prepare_completion(body)
        self.models[context] = prepared.model
        [generation] = self.service.start(prepared)
        context.add_callback(generation.cancel)  # runs when the RPC ends, however it ends
        return generation

    @staticmethod
    def _abort(context: grpc.ServicerContext, error: ServingError):
        context.abort(_CODES.get(error.status, grpc.StatusCode.INTERNAL), error.message)

    @staticmethod
    def _usage(generation) -> serving_pb2.Usage:
        return serving_pb2.Usage(**generation.usage())

    def Generate(self, request, context):
        try:
            generation = self._start(request, context)
            text = "".join(piece.text for piece in generation.pieces(context.is_active))
            return serving_pb2.GenerateResponse(
                model=request.model,
                text=text,
                token_ids=generation.token_ids,
                finish_reason=generation.finish_reason or "",
                usage=self._usage(generation),
            )
        except ServingError as error:
            self._abort(context, error)
        except ClientGone:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled by the client")

    def GenerateStream(self, request, context):
        try:
            generation = self._start(request, context)
            for piece in generation.pieces(context.is_active):
                if piece.text or piece.token_ids:
                    yield serving_pb2.GenerateChunk(text=piece.text, token_ids=piece.token_ids)
            yield serving_pb2.GenerateChunk(finish_reason=generation.finish_reason or "", usage=self._usage(generation))
        except ServingError as error:
            self._abort(context, error)
        except ClientGone:
            context.set_code(grpc.StatusCode.CANCELLED)

    def ListModels(self, request, context):
        try:
            self._authorize(context)
        except ServingError as error:
            self._abort(context, error)
        infos = [
            serving_pb2.ModelInfo(
                id=m["id"],
                kind=m["kind"],
                adapter_blocks=m["adapter_blocks"],
                base=m["base"],
                context_length=m["context_length"],
            )
            for m in self.service.models()
        ]
        return serving_pb2.ListModelsResponse(models=infos)


class GrpcServer:
    """The gRPC service and the health service on ``host:port`` (0: a free port), over TLS when
    ``tls`` is given.

    ``workers`` threads run calls; at most ``ServeConfig.max_connections`` calls are in flight (one
    more is RESOURCE_EXHAUSTED), and a connection idle for ``idle_timeout`` seconds is closed."""

    def __init__(
        self,
        service: ServingService,
        host: str = "127.0.0.1",
        port: int = 50051,
        workers: int = 64,
        tls: TlsFiles | None = None,
    ) -> None:
        config = service.config
        self.shutdown_timeout = config.shutdown_timeout
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="offsite-serve-grpc"),
            maximum_concurrent_rpcs=config.max_connections,
            options=[("grpc.max_connection_idle_ms", int(config.idle_timeout * 1000))],
        )
        handlers = _handlers(ServingServicer(service))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
        self._server.add_registered_method_handlers(_SERVICE, handlers)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.host, self.tls = host, tls
        address = f"{host}:{port}"
        if tls:
            credentials = grpc.ssl_server_credentials(
                [(Path(tls.keyfile).read_bytes(), Path(tls.certfile).read_bytes())]
            )
            self.port = self._server.add_secure_port(address, credentials)
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"gRPC: cannot listen on {address}")

    def _set_health(self, status) -> None:
        for name in ("", _SERVICE):
            self.health.set(name, status)

    def start(self) -> GrpcServer:
        self._server.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self

    def drain(self) -> None:
        """Say NOT_SERVING (the health service) and stop taking calls; running ones go on."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self) -> None:
        """Graceful: new calls are refused, running ones get ``shutdown_timeout`` seconds to finish."""
        self.drain()
        self._server.stop(self.shutdown_timeout).wait(self.shutdown_timeout + 5)
