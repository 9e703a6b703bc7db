"""A whole Flower federation on one host, for tests, demos and single-host jobs.

:class:`LocalFederation` starts a SuperLink and K SuperNodes as subprocesses on free 127.0.0.1
ports and stops every process by its PID; it drives the SuperLink with
:class:`offsite.cloud.superlink.SuperLinkControl`, as the operator does.

Two modes:

- insecure (``certs=None``): plain HTTP on loopback, SuperNodes register themselves;
- secure (``certs=`` :func:`offsite.cloud.certs.write_deployment_certs`'s result): the SuperLink
  serves TLS (``--ssl-ca-certfile --ssl-certfile --ssl-keyfile``) with ``--enable-supernode-auth``;
  each SuperNode's public key is registered with ``flwr supernode register KEY.pub`` before it
  starts with ``--root-certificates ca.crt --auth-supernode-private-key KEY``. A SuperNode whose
  key was not registered is refused at activation and never gets a node id.

Each federation gets its own ``FLWR_HOME`` (the CLI's connection file ``config.toml`` and the
installed FABs live there) and runs with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, so
the SuperLink never tries ``uv sync``: the components come from this Python environment.

``deploy/one_host.sh`` brings up the same secure federation with the CLI commands a many-host
deployment uses (``offsite deploy certs``, ``offsite deploy register``, ``offsite client start``,
``offsite cloud run``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from offsite.cloud.certs import DeploymentCerts, public_key_path
from offsite.cloud.superlink import (
    APP_DIR,
    STATUS_POLL,
    FederationError,
    SuperLinkConnection,
    SuperLinkControl,
    free_port,
)
from offsite.protocol.flower_process import flower_env, flower_tool, supernode_command


@dataclass
class FlowerProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    port: int
    node_id: int | None = None  # the id `flwr supernode register` gave its key (secure mode)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc; empty where /proc is absent)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    result, frontier = [], [pid]
    while frontier:
        children = _children(frontier.pop())
        result.extend(children)
        frontier.extend(children)
    return result


def _wait_gone(pids: list[int], deadline: float) -> list[int]:
    """Wait until every pid has exited or ``deadline`` (monotonic) passes; return those still alive."""
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        still = []
        for pid in alive:
            try:
                os.kill(pid, 0)
                still.append(pid)
            except ProcessLookupError:
                continue
        alive = still
        if alive:
            time.sleep(0.1)
    return alive


def stop_processes(procs: list[FlowerProcess], grace: float = 10.0) -> None:
    """SIGTERM every process at once and wait for them together (a federation's SuperNodes shut
    down in parallel, not one after another), then their descendants that outlive them (Flower's
    SuperExec runs in its own session and exits by itself once its parent is gone; we do not rely
    on that); whatever is left after ``grace`` seconds gets SIGKILL."""
    descendants = [pid for proc in procs for pid in _descendants(proc.process.pid)]
    running = [proc for proc in procs if proc.alive()]
    for proc in running:
        proc.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.process.kill()
            proc.process.wait(timeout=grace)
    for pid in descendants:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for pid in _wait_gone(descendants, time.monotonic() + grace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every descendant of it, at once: a crash, not a shutdown (no process
    gets to clean up, deregister or flush). For fault tests; returns the PIDs signalled."""
    victims = [pid, *_descendants(pid)]  # listed first: once the parent dies, its children are re-parented
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            continue
    return victims


def _spawn(name: str, command: list[str], workdir: Path, env: dict, port: int) -> FlowerProcess:
    log_path = workdir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    return FlowerProcess(name, process, log_path, port)


def _wait_listening(proc: FlowerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise FederationError(
                f"{proc.name} exited with {proc.process.returncode}; log {proc.log_path}:\n{proc.log_tail()}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", proc.port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(
        f"{proc.name} not listening on 127.0.0.1:{proc.port} after {timeout:.0f}s; log {proc.log_path}"
    )


@dataclass
class LocalFederation:
    """A SuperLink and its SuperNodes on loopback; a context manager that stops them all.

    With ``certs`` (from :func:`offsite.cloud.certs.write_deployment_certs`) the federation runs
    with TLS and SuperNode authentication; SuperNode I uses ``certs.node_keys[I]`` unless given a key.
    """

    workdir: Path
    certs: DeploymentCerts | None = None
    superlink: FlowerProcess | None = None
    supernodes: list[FlowerProcess] = field(default_factory=list)
    control: SuperLinkControl | None = None
    _keys_used: set[Path] = field(default_factory=set)

    @property
    def secure(self) -> bool:
        return self.certs is not None

    @property
    def home(self) -> Path:
        return self.workdir / "flwr_home"

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    @property
    def address(self) -> str:
        assert self.superlink is not None, "start_superlink first"
        return f"127.0.0.1:{self.superlink.port}"

    def superlink_command(self, port: int, database: Path) -> list[str]:
        """One HTTP port serves Fleet, Control and ServerApp runtime APIs (flwr 1.41)."""
        command = [
            flower_tool("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(database),
        ]
        if self.certs is None:
            return command + ["--insecure"]
        return command + [
            "--ssl-ca-certfile",
            str(self.certs.ca_cert.resolve()),
            "--ssl-certfile",
            str(self.certs.server_cert.resolve()),
            "--ssl-keyfile",
            str(self.certs.server_key.resolve()),
            "--enable-supernode-auth",
        ]

    def start_superlink(
        self, database: Path | None = None, timeout: float = 60.0, port: int | None = None
    ) -> FlowerProcess:
        """Start (or, after a crash, restart) the SuperLink. A restart on the same ``port`` with the
        same ``database`` keeps the SuperNodes' ids; they retry and reconnect by themselves. Seen with
        flwr 1.41: a SuperNode that was downloading a message when the SuperLink died may pull
        nothing more after the restart (not covered by a test; a ServerApp crash is)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        command = self.superlink_command(port, database or self.workdir / "superlink.db")
        restarts = sum(1 for _ in (self.workdir / "logs").glob("superlink*.log")) if self.superlink is not None else 0
        self.superlink = _spawn(
            f"superlink-{restarts}" if restarts else "superlink", command, self.workdir, self.env, port
        )
        _wait_listening(self.superlink, timeout)
        connection = SuperLinkConnection(
            self.address, root_certificates=self.certs.ca_cert if self.certs else None, insecure=self.certs is None
        )
        self.control = SuperLinkControl(self.home, connection)
        return self.superlink

    def _control(self) -> SuperLinkControl:
        if self.control is None:
            raise FederationError("start_superlink first")
        return self.control

    def _next_key(self) -> Path:
        assert self.certs is not None
        for key in self.certs.node_keys:
            if key not in self._keys_used:
                return key
        raise FederationError(
            f"all {len(self.certs.node_keys)} SuperNode keys in {self.certs.root} are in use; make more with --nodes"
        )

    def start_supernode(
        self,
        node_config: dict,
        timeout: float = 60.0,
        *,
        auth_key: Path | None = None,
        register: bool = True,
        wait: bool = True,
        name: str | None = None,
        max_retries: int | None = None,
        superlink: str | None = None,
    ) -> FlowerProcess:
        """A SuperNode connected to the SuperLink; ``node_config`` reaches its ClientApps as
        ``context.node_config`` (e.g. ``{"data-path": ..., "cache-dir": ...}``).

        Secure mode: the SuperNode authenticates with ``auth_key`` (default: the next unused key
        of ``certs``), whose public half is registered first unless ``register`` is False (how a
        test shows that an unknown key is refused). ``wait``: block until its runtime API listens.
        ``superlink``: connect to this ``HOST:PORT`` instead of the SuperLink's own address (e.g. a
        test's recording relay in front of it).
        """
        index = len(self.supernodes)
        port = free_port()  # its own runtime API (ClientAppIo), where its SuperExec connects
        node_id = None
        if self.certs is not None:
            auth_key = Path(auth_key) if auth_key is not None else self._next_key()
            self._keys_used.add(auth_key)
            if register:
                node_id = self._control().register_supernode(public_key_path(auth_key), name=name)
        elif auth_key is not None:
            raise FederationError("auth_key needs a secure federation (LocalFederation(certs=...))")
        command = supernode_command(
            superlink or self.address,
            node_config,
            root_certificates=self.certs.ca_cert if self.certs else None,
            auth_key=auth_key,
            insecure=self.certs is None,
            port=port,
            max_retries=max_retries,
        )
        node = _spawn(name or f"supernode-{index}", command, self.workdir, self.env, port)
        node.node_id = node_id
        self.supernodes.append(node)
        if wait:
            _wait_listening(node, timeout)
        return node

    def wait_listening(self, nodes: list[FlowerProcess] | None = None, timeout: float = 60.0) -> None:
        """Block until each of ``nodes`` (default: every SuperNode) listens on its runtime API; for
        SuperNodes started with ``wait=False``, so that they start up side by side."""
        for node in self.supernodes if nodes is None else nodes:
            _wait_listening(node, timeout)

    # the flwr CLI, bound to this federation's SuperLink

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return self._control().flwr(*args, timeout=timeout)

    def submit(self, run_config: dict, app_dir: Path = APP_DIR) -> int:
        return self._control().submit(run_config, app_dir)

    def run_status(self, run_id: int) -> str:
        return self._control().run_status(run_id)

    def wait(self, run_id: int, timeout: float, poll: float = STATUS_POLL) -> str:
        try:
            return self._control().wait(run_id, timeout, poll)
        except FederationError as error:
            raise FederationError(f"{error}; logs in {self.workdir / 'logs'}") from None

    def logs(self, run_id: int) -> str:
        return self._control().logs(run_id)

    def follow(self, run_id: int, on_line: Callable[[str], None], timeout: float) -> str:
        """Stream the run's ServerApp log lines to ``on_line`` until it finishes; return its status."""
        return self._control().follow(run_id, on_line, timeout)

    def list_supernodes(self) -> list[dict]:
        return self._control().list_supernodes()

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink, each by its PID."""
        stop_processes(self.supernodes)  # together, so a federation's shutdown takes one grace period, not one per node
        if self.superlink is not None:
            stop_processes([self.superlink])

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
