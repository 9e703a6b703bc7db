"""The operator's side of a Flower deployment: the ``flwr`` CLI bound to one SuperLink (any host).

:class:`SuperLinkControl` submits a run, follows its logs, waits for it and registers SuperNode
keys; :func:`run_job_on_superlink` is ``offsite cloud run``. Each control gets its own
``FLWR_HOME`` (the CLI's connection file ``config.toml`` and the installed FABs live there) and runs
with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, so the SuperLink never tries ``uv sync``:
the components come from this Python environment. The Flower app ``flwr run`` submits
(:data:`APP_DIR`) ships inside this package and carries no code and no weights.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from offsite.protocol.flower_process import config_arg, flower_env, flower_tool

from .fed_job import JobError, load_state, read_job

APP_DIR = Path(__file__).resolve().parent / "flower_app"
CONNECTION = "offsite-local"
# Seconds between status polls while a run's log stream is open. Each poll is a `flwr ls` process,
# about 1.5 CPU-seconds here: every 5 s that was a third of one core taken from the training it waits on.
STATUS_POLL = 30.0


class FederationError(RuntimeError):
    """A Flower process did not start, or a run did not finish; the message points at the log."""


class KeyAlreadyRegistered(FederationError):
    """``flwr supernode register``: the SuperLink already holds this public key (Flower error code 23)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(address: str, timeout: float) -> None:
    """Block until ``HOST:PORT`` accepts TCP connections, or raise FederationError after ``timeout`` s."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise FederationError(f"{address}: not reachable after {timeout:.0f}s ({error})") from None
        time.sleep(0.5)


def _json_output(done: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON object ``flwr ... --format json`` printed (after any log lines), or FederationError."""
    try:
        return json.loads(done.stdout[done.stdout.index("{") :])
    except ValueError:
        raise FederationError(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}") from None


# ---------------------------------------------------------------- the flwr CLI against one SuperLink


@dataclass(frozen=True)
class SuperLinkConnection:
    """How the ``flwr`` CLI reaches a SuperLink: ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``.

    TLS verified against ``root_certificates`` (key ``root-certificates``, an absolute path), TLS
    against the system's CAs (neither set), or plain HTTP (``insecure = true``).
    """

    address: str
    root_certificates: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"SuperLink address {self.address!r}: expected HOST:PORT")
        if self.root_certificates is not None and not Path(self.root_certificates).is_file():
            raise FileNotFoundError(f"{self.root_certificates}: root certificates file not found")
        if self.insecure and self.root_certificates is not None:
            raise ValueError("a SuperLink connection is either insecure or verified with root certificates, not both")

    def toml(self, name: str) -> str:
        lines = [f"[superlink.{name}]", f'address = "{self.address}"']
        if self.insecure:
            lines.append("insecure = true")
        if self.root_certificates is not None:
            lines.append(f'root-certificates = "{Path(self.root_certificates).resolve().as_posix()}"')
        return "\n".join(lines) + "\n"


def _stop_log_stream(
    stream: subprocess.Popen, reader: threading.Thread, lines: queue.Queue, on_line: Callable[[str], None]
) -> None:
    """Stop ``flwr log --stream`` by its PID if it still runs, then pass on the lines it left in ``lines``."""
    if stream.poll() is None:
        stream.terminate()
        try:
            stream.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stream.kill()
            stream.wait()
    reader.join(timeout=5)
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            break
        if line:
            on_line(line)


class SuperLinkControl:
    """The ``flwr`` CLI bound to one SuperLink through a private ``FLWR_HOME`` holding one connection."""

    def __init__(self, home: Path, connection: SuperLinkConnection, name: str = CONNECTION) -> None:
        self.home = Path(home)
        self.connection = connection
        self.name = name
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "{name}"\n\n' + connection.toml(name))

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [flower_tool("flwr"), *args], env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout
        )

    def submit(self, run_config: dict, app_dir: Path = APP_DIR) -> int:
        """``flwr run`` the app; returns the run id."""
        args = ["run", str(app_dir), self.name, "--format", "json"]
        if run_config:
            args += ["--run-config", config_arg(run_config)]
        payload = _json_output(self.flwr(*args), "flwr run")
        try:
            return int(payload["run-id"])
        except (KeyError, TypeError, ValueError):
            raise FederationError(f"flwr run: no run id in {payload}") from None

    def run_status(self, run_id: int) -> str:
        payload = _json_output(self.flwr("ls", self.name, "--run-id", str(run_id), "--format", "json"), "flwr ls")
        try:
            return str(payload["runs"][0]["status"])
        except (KeyError, IndexError, TypeError):
            raise FederationError(f"flwr ls: no status for run {run_id} in {payload}") from None

    def wait(self, run_id: int, timeout: float, poll: float = STATUS_POLL) -> str:
        """Block until the run finishes; return its status (``finished:completed``, ``finished:failed``, ...).

        The end of the run's log stream says when (see :meth:`follow`); the status is polled only
        as a fallback, every ``poll`` seconds.
        """
        return self.follow(run_id, lambda line: None, timeout, poll)

    def logs(self, run_id: int) -> str:
        """The run's logs as ``flwr log`` shows them (ServerApp output)."""
        done = self.flwr("log", str(run_id), self.name, "--show")
        return done.stdout + done.stderr

    def follow(self, run_id: int, on_line: Callable[[str], None], timeout: float, poll: float = STATUS_POLL) -> str:
        """Pass every line of ``flwr log --stream`` to ``on_line`` until the run finishes; return its status.

        The stream is a child process read by a thread; it is stopped by its PID once the run is
        finished (after a short drain) or the timeout passes. The SuperLink ends the stream when
        the run finishes, so the status is asked as soon as the stream ends; besides that it is
        polled every ``poll`` seconds, a fallback for a stream that stays open.
        """
        stream = subprocess.Popen(
            [flower_tool("flwr"), "log", str(run_id), self.name, "--stream"],
            env=self.env,
            cwd=self.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert stream.stdout is not None
            for line in stream.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        next_check, finished_at, stream_done, status = 0.0, None, False, "unknown"
        try:
            while True:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    line = ""
                if line is None:  # the stream ended by itself (run over, or the CLI failed): ask now, then poll
                    stream_done, next_check = True, 0.0
                elif line:
                    on_line(line)
                now = time.monotonic()
                if finished_at is None and now >= next_check:
                    status, next_check = self.run_status(run_id), now + poll
                    if status.startswith("finished"):
                        finished_at = now
                if finished_at is not None and (stream_done or now - finished_at > 3.0):
                    return status
                if now > deadline:
                    raise FederationError(f"run {run_id} not finished after {timeout:.0f}s (status {status})")
        finally:
            _stop_log_stream(stream, reader, lines, on_line)

    def register_supernode(self, public_key: Path, name: str | None = None) -> int:
        """``flwr supernode register KEY.pub``: the SuperLink accepts this key from now on; returns the node id."""
        args = ["supernode", "register", str(Path(public_key).resolve()), self.name, "--format", "json"]
        if name:
            args += ["--name", name]
        payload = _json_output(self.flwr(*args), f"flwr supernode register {public_key}")
        if "Public key already in use" in str(payload.get("error-message", "")):
            raise KeyAlreadyRegistered(
                f"{public_key}: already registered with the SuperLink at {self.connection.address}"
            )
        if not payload.get("success") or "node-id" not in payload:
            raise FederationError(f"flwr supernode register {public_key}: {payload}")
        return int(payload["node-id"])

    def list_supernodes(self) -> list[dict]:
        """``flwr supernode list``: one dict per registered SuperNode (node id, status, ...)."""
        payload = _json_output(self.flwr("supernode", "list", self.name, "--format", "json"), "flwr supernode list")
        if not payload.get("success", True):
            raise FederationError(f"flwr supernode list: {payload}")
        return list(payload.get("nodes", []))


# ---------------------------------------------------------------- a federation on this host

# ---------------------------------------------------------------- submitting a job to any SuperLink


def round_summary(job_dir: Path) -> list[str]:
    """One line per completed round from the job's ``state.json`` (empty if not readable here)."""
    try:
        state = load_state(Path(job_dir))
    except JobError:
        return []
    if state is None:
        return []
    lines = []
    for record in state.history:
        loss = record.get("mean_train_loss")
        line = (
            f"round {record['round']}: {len(record['replied'])}/{len(record['sent'])} replied, "
            f"failed {sorted(record['failed']) or '-'}, dropped {record['dropped'] or '-'}, "
            f"weighted train loss {'-' if loss is None else f'{loss:.4f}'}, {record['seconds']:.1f}s"
        )
        if record.get("rejected"):
            line += f", rejected {dict(sorted(record['rejected'].items()))}"
        if "secagg" in record:
            line += (
                f", secure aggregate of {len(record['secagg']['survivors'])} "
                f"(error bound {record['secagg']['error_bound']:.2g})"
            )
        if "privacy" in record:
            line += f", DP epsilon {record['privacy']['epsilon']:.4g} at delta {record['privacy']['delta']:g}"
        lines.append(line)
    return lines


def run_job_on_superlink(
    job_dir: Path,
    connection: SuperLinkConnection,
    on_line: Callable[[str], None] = print,
    timeout: float = 7 * 24 * 3600.0,
    home: Path | None = None,
    app_dir: Path = APP_DIR,
) -> tuple[int, str]:
    """Submit the federated job in ``job_dir`` (``flwr run``), stream the ServerApp's log lines to
    ``on_line`` until the run finishes, and return ``(run id, final status)``.

    ``job_dir`` is handed to the ServerApp as an absolute path: it must be the job's path on the
    SuperLink's host (the same host in a single-host deployment).
    """
    job_dir = Path(job_dir).resolve()
    read_job(job_dir)  # a broken job.json fails here, not inside the ServerApp
    control = SuperLinkControl(home or job_dir / ".flwr", connection)
    run_id = control.submit({"job-dir": job_dir}, app_dir)
    on_line(f"submitted run {run_id} to {connection.address}")
    return run_id, control.follow(run_id, on_line, timeout)
