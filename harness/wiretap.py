"""A TCP relay on 127.0.0.1 in front of a SuperLink: the SuperNodes connect to it, it forwards
both ways and keeps what the nodes send (for tests that look for plaintext on the wire) and a
timestamped count of the bytes in each direction (for benchmarks that measure a round's traffic
on the wire rather than compute it). Plain HTTP on loopback: what a TLS-terminating SuperLink sees."""

from __future__ import annotations

import socket
import threading
import time


class WireTap:
    def __init__(self, target_port: int, keep: bool = True) -> None:
        self.target_port = target_port
        self.keep = keep  # keep the bytes the nodes send (tests); counts are always kept
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sent = bytearray()
        self.counts: list[tuple[float, str, int]] = []  # (monotonic time, "up" | "down", bytes)
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, direction: str) -> None:
        try:
            while chunk := source.recv(1 << 16):
                with self.lock:
                    self.counts.append((time.monotonic(), direction, len(chunk)))
                    if direction == "up" and self.keep:
                        self.sent += chunk
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> bytes:
        """What the nodes sent since the last call."""
        with self.lock:
            data = bytes(self.sent)
            self.sent.clear()
        return data

    def bytes_between(self, start: float, end: float) -> dict[str, int]:
        """Bytes up (nodes to SuperLink) and down in the monotonic-time window [start, end)."""
        totals = {"up": 0, "down": 0}
        with self.lock:
            for moment, direction, size in self.counts:
                if start <= moment < end:
                    totals[direction] += size
        return totals

    def close(self) -> None:
        self.server.close()
        for end in self.sockets:
            try:
                end.close()
            except OSError:
                pass
