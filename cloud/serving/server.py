"""Both front ends around one :class:`.service.ServingService`, started and stopped together."""

from __future__ import annotations

from dataclasses import dataclass

from .grpc_api import GrpcServer
from .http_api import HttpServer
from .service import ServingService


@dataclass
class Servers:
    service: ServingService
    http: HttpServer | None
    grpc: GrpcServer | None

    @property
    def http_url(self) -> str:
        return f"http://{self.http.host}:{self.http.port}" if self.http else ""

    @property
    def grpc_target(self) -> str:
        return f"{self.grpc.host}:{self.grpc.port}" if self.grpc else ""

    def stop(self) -> None:
        """Stop taking requests, then stop the scheduler (requests still running fail with 'shutting down')."""
        if self.http:
            self.http.stop()
        if self.grpc:
            self.grpc.stop()
        self.service.close()


def start(service: ServingService, host: str = "127.0.0.1", http_port: int | None = 8000, grpc_port: int | None = 50051) -> Servers:
    """Start the HTTP API and/or the gRPC service (a port of 0 picks a free one; None: not started)."""
    http = HttpServer(service, host, http_port).start() if http_port is not None else None
    try:
        grpc_server = GrpcServer(service, host, grpc_port).start() if grpc_port is not None else None
    except BaseException:
        if http:
            http.stop()
        raise
    return Servers(service, http, grpc_server)
