"""The gRPC query service (``protocol/serving.proto``): Generate, GenerateStream, ListModels.

Requests are validated exactly as the HTTP API's (the same :class:`.service.ServingService`);
a refusal is a gRPC status (NOT_FOUND, INVALID_ARGUMENT, UNAUTHENTICATED, ...) with the same
message. A client that cancels or disconnects has its request cancelled.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError
from offsite.protocol._generated import serving_pb2, serving_pb2_grpc

from .service import ClientGone, ServingError, ServingService

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
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {message_type.DESCRIPTOR.full_name} message")


def _handlers(servicer: ServingServicer) -> dict:
    """The service's methods, each taking its request as bytes and parsing it itself."""

    def unary(method, message_type):
        return lambda data, context: method(_parse(message_type, data, context), context)

    def stream(data, context):
        yield from servicer.GenerateStream(_parse(serving_pb2.GenerateRequest, data, context), context)

    return {
        "Generate": grpc.unary_unary_rpc_method_handler(
            unary(servicer.Generate, serving_pb2.GenerateRequest), response_serializer=serving_pb2.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(stream, response_serializer=serving_pb2.GenerateChunk.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            unary(servicer.ListModels, serving_pb2.ListModelsRequest), response_serializer=serving_pb2.ListModelsResponse.SerializeToString),
    }


class ServingServicer(serving_pb2_grpc.ServingServicer):
    def __init__(self, service: ServingService) -> None:
        self.service = service

    def _authorize(self, context: grpc.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.service.check_api_key(metadata.get("authorization"))

    def _start(self, request: serving_pb2.GenerateRequest, context: grpc.ServicerContext):
        self._authorize(context)
        body = _body(request)
        prepared = self.service.prepare_chat(body) if request.messages else self.service.prepare_completion(body)
        generation = self.service.start(prepared)
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
            text = "".join(piece for piece, _ in generation.pieces(context.is_active))
            return serving_pb2.GenerateResponse(
                model=request.model, text=text, token_ids=generation.token_ids, finish_reason=generation.finish_reason or "",
                usage=self._usage(generation),
            )
        except ServingError as error:
            self._abort(context, error)
        except ClientGone:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled by the client")

    def GenerateStream(self, request, context):
        try:
            generation = self._start(request, context)
            for piece, ids in generation.pieces(context.is_active):
                if piece or ids:
                    yield serving_pb2.GenerateChunk(text=piece, token_ids=ids)
            yield serving_pb2.GenerateChunk(finish_reason=generation.finish_reason or "", usage=self._usage(generation))
        except ServingError as error:
            self._abort(context, error)
        except ClientGone:
            return

    def ListModels(self, request, context):
        try:
            self._authorize(context)
        except ServingError as error:
            self._abort(context, error)
        infos = [
            serving_pb2.ModelInfo(id=m["id"], kind=m["kind"], adapter_blocks=m["adapter_blocks"], base=m["base"], context_length=m["context_length"])
            for m in self.service.models()
        ]
        return serving_pb2.ListModelsResponse(models=infos)


class GrpcServer:
    """The gRPC service on ``host:port`` (0: a free port), insecure (put TLS in front, or use loopback).

    ``workers`` threads run calls; at most ``ServeConfig.max_connections`` calls are in flight (one
    more is RESOURCE_EXHAUSTED), and a connection idle for ``idle_timeout`` seconds is closed."""

    def __init__(self, service: ServingService, host: str = "127.0.0.1", port: int = 50051, workers: int = 64) -> None:
        config = service.config
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="offsite-serve-grpc"),
            maximum_concurrent_rpcs=config.max_connections,
            options=[("grpc.max_connection_idle_ms", int(config.idle_timeout * 1000))],
        )
        handlers = _handlers(ServingServicer(service))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
        self._server.add_registered_method_handlers(_SERVICE, handlers)
        self.host = host
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"gRPC: cannot listen on {host}:{port}")

    def start(self) -> GrpcServer:
        self._server.start()
        return self

    def stop(self, grace: float = 2.0) -> None:
        self._server.stop(grace).wait(grace + 5)
