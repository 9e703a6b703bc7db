"""The data owner's daemon: a Flower SuperNode running our ClientApp, kept alive by a supervisor.

:class:`Supervisor` is plain Python and knows nothing of Flower: it runs one child command,
restarts it when it exits non-zero (exponential backoff, reset once a child has run for a while),
logs every restart, and on SIGTERM/SIGINT terminates the child by its PID and returns.
:class:`DaemonConfig` says what the SuperNode needs (``offsite client start`` builds it), and
:func:`run_daemon` puts the two together.

The SuperNode only ever connects out to the SuperLink; nothing listens on this host except the
SuperNode's runtime API on 127.0.0.1 (where its own SuperExec connects).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from offsite.protocol.flower_process import flower_env, supernode_command

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """Delay before restart ``n`` (1-based, counting consecutive crashes):
    ``min(max_delay, initial * factor**(n-1))``."""

    initial_delay: float = field(default=1.0, metadata={"help": "seconds before the first restart"})
    factor: float = field(default=2.0, metadata={"help": "each further crash multiplies the delay by this"})
    max_delay: float = field(default=300.0, metadata={"help": "the delay never exceeds this"})
    reset_after: float = field(default=600.0, metadata={"help": "a child that ran this long resets the delay"})
    max_restarts: int | None = field(default=None, metadata={"help": "give up after this many restarts (None: never)"})
    stop_grace: float = field(default=15.0, metadata={"help": "seconds between SIGTERM and SIGKILL of the child"})

    def __post_init__(self) -> None:
        if self.initial_delay < 0 or self.max_delay < self.initial_delay or self.factor < 1:
            raise ValueError(f"restart policy: need 0 <= initial_delay <= max_delay and factor >= 1, got {self}")
        if self.max_restarts is not None and self.max_restarts < 0:
            raise ValueError(f"restart policy: max_restarts must be >= 0, got {self.max_restarts}")

    def delay(self, consecutive_crashes: int) -> float:
        return min(self.max_delay, self.initial_delay * self.factor ** max(consecutive_crashes - 1, 0))


@dataclass(frozen=True)
class ChildExit:
    pid: int
    returncode: int
    seconds: float


class Supervisor:
    """Run ``command``; restart it when it crashes; stop it on :meth:`stop` (or SIGTERM/SIGINT
    once :meth:`install_signal_handlers` ran). :meth:`run` returns 0 after a stop or a clean
    exit of the child, else the last child's exit code once ``max_restarts`` is spent."""

    def __init__(
        self,
        command: list[str],
        policy: RestartPolicy = RestartPolicy(),
        env: dict | None = None,
        log_path: Path | None = None,
    ):
        if not command:
            raise ValueError("supervisor: empty command")
        self.command = list(command)
        self.policy = policy
        self.env = env
        self.log_path = log_path
        self.exits: list[ChildExit] = []
        self.child: subprocess.Popen | None = None
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Ask :meth:`run` to terminate the child and return; safe from a signal handler."""
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame) -> None:
            log.info("received %s: stopping", signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _start(self) -> subprocess.Popen:
        if self.log_path is None:
            return subprocess.Popen(self.command, env=self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as sink:
            return subprocess.Popen(self.command, env=self.env, stdout=sink, stderr=subprocess.STDOUT)

    def _terminate(self, child: subprocess.Popen) -> None:
        if child.poll() is not None:
            return
        log.info("terminating child %d", child.pid)
        child.terminate()
        try:
            child.wait(timeout=self.policy.stop_grace)
        except subprocess.TimeoutExpired:
            log.warning("child %d ignored SIGTERM for %.0fs: killing it", child.pid, self.policy.stop_grace)
            child.kill()
            child.wait()

    def run(self) -> int:
        crashes = restarts = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            self.child = child = self._start()
            log.info("started %s (pid %d)", Path(self.command[0]).name, child.pid)
            while child.poll() is None and not self._stopping.is_set():
                self._stopping.wait(0.2)
            if self._stopping.is_set():
                self._terminate(child)
                return 0
            ran = time.monotonic() - started
            self.exits.append(ChildExit(child.pid, child.returncode, ran))
            if child.returncode == 0:
                log.info("child %d exited cleanly after %.1fs", child.pid, ran)
                return 0
            crashes = 1 if ran >= self.policy.reset_after else crashes + 1
            if self.policy.max_restarts is not None and restarts >= self.policy.max_restarts:
                log.error(
                    "child %d exited with %d after %.1fs; %d restart(s) spent, giving up",
                    child.pid,
                    child.returncode,
                    ran,
                    restarts,
                )
                return child.returncode
            delay = self.policy.delay(crashes)
            restarts += 1
            log.warning(
                "child %d exited with %d after %.1fs; restart %d in %.1fs",
                child.pid,
                child.returncode,
                ran,
                restarts,
                delay,
            )
            self._stopping.wait(delay)
        return 0


# ---------------------------------------------------------------- the SuperNode daemon


@dataclass(frozen=True)
class DaemonConfig:
    """What a data owner's SuperNode needs; ``offsite client start`` builds it from flags."""

    superlink: str = field(metadata={"help": "the SuperLink's Fleet address, HOST:PORT"})
    data_path: Path = field(metadata={"help": "local JSONL training file (never leaves this host)"})
    cache_dir: Path | None = field(default=None, metadata={"help": "bundle cache (default $OFFSITE_CACHE/client)"})
    device: str = "auto"
    root_certificates: Path | None = field(
        default=None, metadata={"help": "CA certificate that signed the SuperLink's"}
    )
    auth_key: Path | None = field(default=None, metadata={"help": "SuperNode private key (OpenSSH, EC P-384)"})
    insecure: bool = field(default=False, metadata={"help": "plain HTTP, no TLS (loopback tests only)"})
    runtime_port: int = field(default=9094, metadata={"help": "the SuperNode's local runtime API port (127.0.0.1)"})
    threads: int | None = None
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward pass: less memory, more time"}
    )
    identity_dir: Path | None = field(
        default=None, metadata={"help": "this data owner's identity (offsite client enroll --out DIR)"}
    )
    coordinator_key: Path | None = field(
        default=None, metadata={"help": "the coordinator's public keys, pinned (coordinator.pub.json)"}
    )
    audit_dir: Path | None = field(default=None, metadata={"help": "keep a copy of every update this node sends"})

    def __post_init__(self) -> None:
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--superlink {self.superlink!r}: expected HOST:PORT")
        if self.insecure and (self.root_certificates or self.auth_key):
            raise ValueError(
                "--insecure cannot be combined with --root-certificates or --auth-key (node authentication needs TLS)"
            )
        if not Path(self.data_path).is_file():
            raise FileNotFoundError(f"{self.data_path}: data file not found")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.identity_dir is not None and not Path(self.identity_dir).is_dir():
            raise FileNotFoundError(
                f"--identity {self.identity_dir}: no such directory (make it with offsite client enroll --out DIR)"
            )
        if self.coordinator_key is not None and not Path(self.coordinator_key).exists():
            raise FileNotFoundError(
                f"--coordinator-key {self.coordinator_key}: no such file "
                "(the coordinator.pub.json the operator gave you)"
            )

    def node_config(self) -> dict:
        """What reaches the ClientApp as ``context.node_config`` (absolute paths: the ClientApp
        runs in another process with another working directory)."""
        config: dict = {"data-path": Path(self.data_path).resolve(), "device": self.device}
        if self.cache_dir is not None:
            config["cache-dir"] = Path(self.cache_dir).expanduser().resolve()
        if self.threads is not None:
            config["threads"] = self.threads
        if self.activation_checkpointing:
            config["activation-checkpointing"] = True
        for key, path in (
            ("identity-dir", self.identity_dir),
            ("coordinator-key", self.coordinator_key),
            ("audit-dir", self.audit_dir),
        ):
            if path is not None:
                config[key] = Path(path).expanduser().resolve()
        return config

    def command(self) -> list[str]:
        return supernode_command(
            self.superlink,
            self.node_config(),
            root_certificates=self.root_certificates,
            auth_key=self.auth_key,
            insecure=self.insecure,
            port=self.runtime_port,
        )


def run_daemon(config: DaemonConfig, policy: RestartPolicy = RestartPolicy(), log_path: Path | None = None) -> int:
    """Run the SuperNode under a :class:`Supervisor` until SIGTERM/SIGINT; returns the exit code."""
    supervisor = Supervisor(config.command(), policy, env=flower_env(), log_path=log_path)
    supervisor.install_signal_handlers()
    log.info("SuperNode for %s (data %s); Ctrl-C or SIGTERM stops it", config.superlink, config.data_path)
    return supervisor.run()
