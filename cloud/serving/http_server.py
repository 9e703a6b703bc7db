"""The HTTP server under the FastAPI app: uvicorn with llhttp (``httptools``), in a thread of its own.

llhttp refuses every ambiguous framing (a second or signed ``Content-Length``, one beside
``Transfer-Encoding``, a header line it cannot read, ...) before the app sees the request; the
protocol here adds what a server exposed to anyone needs and uvicorn leaves out:

- at most ``max_connections`` open connections: one more is answered 503 at once and closed;
- a connection whose client sends nothing for ``idle_timeout`` seconds while the server waits
  for it (a request, the rest of a body, the next request on a kept-alive connection) is closed;
- a client that half-closes after its request still gets the answer (then the connection closes),
  and one that half-closes inside a body gets a 400 that says so;
- refusals are OpenAI error bodies, like every other error.

Stopping is graceful: no new connections, idle ones closed, running requests finish (for at most
``shutdown_timeout`` seconds), then the thread ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .openai_types import ServingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """A PEM certificate (chain) and its private key: HTTPS and gRPC over TLS."""

    certfile: Path
    keyfile: Path

    def __post_init__(self) -> None:
        for path in (self.certfile, self.keyfile):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such certificate or key file")


def _raw_error(error: ServingError) -> bytes:
    """A whole HTTP/1.1 response (closing the connection) carrying ``error``'s body."""
    data = json.dumps(error.body()).encode()
    head = (
        f"HTTP/1.1 {error.status} {'Bad Request' if error.status == 400 else 'Service Unavailable'}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(data)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + data


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's llhttp protocol with the bounds above (``max_connections``, ``idle_timeout``: set
    on a subclass per server)."""

    max_connections = 256
    idle_timeout = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._idle: asyncio.TimerHandle | None = None
        self._eof = False
        if len(self.connections) >= self.max_connections:
            self.transport = transport
            error = ServingError(
                503,
                f"the server has {self.max_connections} connections open, its limit; retry later",
                type="server_error",
                code="too_many_connections",
            )
            transport.write(_raw_error(error))
            transport.close()
            return
        super().connection_made(transport)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        super().connection_lost(exc)

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """Close a connection that has sent nothing for ``idle_timeout`` seconds, unless the app is
        working on a whole request it sent (a long generation is not idleness)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._arm_idle()
        elif not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._arm_idle()
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            reason = "".join(c for c in str(error) if c.isprintable())[:80]
            self._refuse(ServingError(400, f"the request is not valid HTTP/1.1 ({reason})", code="bad_framing"))
        except httptools.HttpParserUpgrade:
            self._refuse(ServingError(400, "protocol upgrades are not supported", code="bad_framing"))

    def _refuse(self, error: ServingError) -> None:
        if self.cycle is None or self.cycle.response_complete:  # never inside another answer
            self.transport.write(_raw_error(error))
        self.transport.close()

    def eof_received(self) -> bool:
        """The client has said it sends nothing more: answer what it sent, then close."""
        self._eof = True
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and not self.pipeline:
            return False  # nothing to answer: close now
        if cycle is not None and not cycle.response_complete and cycle.more_body:  # the body ends before its length
            cycle.more_body = False
            cycle.message_event.set()
        return True

    def shutdown(self) -> None:
        """The server stops: an idle connection whose answers are all sent is dropped at once (a
        TLS client that never answers the close would otherwise hold the stop for its whole
        timeout); one with a request running is closed after it (uvicorn's own)."""
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self.transport.get_write_buffer_size() == 0:
            self.transport.abort()
        else:
            super().shutdown()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._eof and not self.pipeline and not self.transport.is_closing():
            self.transport.close()


class HttpServer:
    """An ASGI app on ``host:port`` (0: a free port), served by uvicorn from a background thread."""

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_connections: int = 256,
        idle_timeout: float = 60.0,
        shutdown_timeout: float = 30.0,
        tls: TlsFiles | None = None,
    ) -> None:
        protocol = type(
            "Protocol", (_GuardedProtocol,), {"max_connections": max_connections, "idle_timeout": idle_timeout}
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=2048)
        self.host, self.port = self._socket.getsockname()[:2]
        self.tls = tls
        config = uvicorn.Config(
            app,
            http=protocol,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            headers=[("server", "offsite-serve")],
            timeout_keep_alive=max(1, round(idle_timeout)),
            timeout_graceful_shutdown=max(1, round(shutdown_timeout)),
            ssl_certfile=str(tls.certfile) if tls else None,
            ssl_keyfile=str(tls.keyfile) if tls else None,
        )
        if tls:
            try:
                config.load()  # reads the certificate now, so a bad one is an error here, not in the thread
            except (ssl.SSLError, OSError) as error:
                self._socket.close()
                raise ValueError(f"TLS: cannot use {tls.certfile} / {tls.keyfile}: {error}") from None
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"offsite-serve-http-{self.port}", daemon=True)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def connections(self) -> int:
        """Connections open now (refused ones are never counted)."""
        return len(self._server.server_state.connections)

    def _run(self) -> None:
        self._server.run(sockets=[self._socket])

    def start(self, timeout: float = 60.0) -> HttpServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP: the server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Graceful: stop accepting, let running requests finish (within the shutdown timeout)."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self._server.config.timeout_graceful_shutdown + 10)
        self._socket.close()
