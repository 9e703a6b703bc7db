"""Both front ends around one :class:`.service.ServingService`, started and stopped together."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .grpc_api import GrpcServer
from .http_api import build_app
from .http_server import HttpServer, TlsFiles
from .service import ServingService


@dataclass
class Servers:
    service: ServingService
    http: HttpServer | None
    grpc: GrpcServer | None
    draining: threading.Event = field(default_factory=threading.Event)

    @property
    def http_url(self) -> str:
        return f"{self.http.scheme}://{self.http.host}:{self.http.port}" if self.http else ""

    @property
    def grpc_target(self) -> str:
        return f"{self.grpc.host}:{self.grpc.port}" if self.grpc else ""

    def not_ready(self) -> str | None:
        """Why new requests should go elsewhere now (None: they should come here)."""
        return "the server is shutting down" if self.draining.is_set() else None

    def stop(self) -> None:
        """Graceful: readiness and gRPC health say no, the ports stop taking connections, running
        requests finish (within ``ServeConfig.shutdown_timeout``), then the scheduler stops."""
        self.draining.set()
        if self.grpc:
            self.grpc.drain()
        stoppers = [
            threading.Thread(target=server.stop, name="offsite-serve-stop")
            for server in (self.http, self.grpc)
            if server
        ]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self.service.close()


def start(
    service: ServingService,
    host: str = "127.0.0.1",
    http_port: int | None = 8000,
    grpc_port: int | None = 50051,
    tls: TlsFiles | None = None,
    access_log: bool = True,
) -> Servers:
    """Start the HTTP API and/or the gRPC service (a port of 0 picks a free one; None: not started),
    over TLS when ``tls`` is given."""
    servers = Servers(service, None, None)
    config = service.config
    if http_port is not None:
        app = build_app(service, servers.not_ready, access_log=access_log)
        servers.http = HttpServer(
            app, host, http_port, config.max_connections, config.idle_timeout, config.shutdown_timeout, tls
        ).start()
        service.metrics.connections = lambda: servers.http.connections
    try:
        if grpc_port is not None:
            servers.grpc = GrpcServer(service, host, grpc_port, tls=tls).start()
    except BaseException:
        if servers.http:
            servers.http.stop()
        raise
    return servers
