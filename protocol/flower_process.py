"""The command lines of Flower's processes, as both roles start them.

The operator (``offsite.cloud.superlink``; ``offsite.harness.federation`` on one host) and the data
owner (``offsite.client.daemon``) both start ``flower-supernode``; what its ``--node-config``
carries is the contract between the SuperNode and our ClientApp (``data-path``, ``cache-dir``,
``device``; see :mod:`offsite.client.settings`), so it is built here, once.

Flower 1.41 flags used (checked against ``flower-supernode --help``):

- ``--superlink HOST:PORT``: the SuperLink's Fleet API (one HTTP port serves every API);
- ``--insecure`` or ``--root-certificates CA.crt``: plain HTTP, or TLS verified against our CA;
- ``--auth-supernode-private-key KEY``: EC private key (OpenSSH format) whose public half the
  operator registered with ``flwr supernode register KEY.pub``;
- ``--host``/``--port``: the SuperNode's own runtime API (where its SuperExec connects);
- ``--node-config "k1=v1 k2=v2"``: values as TOML scalars.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FLWR_DISABLE_INSTALL = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"


class FlowerCommandError(ValueError):
    """A Flower command line cannot be built from these settings; the message names the setting."""


def flower_tool(name: str) -> str:
    """``name`` from this Python environment's bin directory (where pip put flwr's scripts)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (is flwr installed in this environment?)")
    return str(path)


def flower_env(home: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a Flower process runs with: this environment's bin first on PATH (so
    ``flower-superexec`` is found), runtime dependency installation off, ``FLWR_HOME`` if given."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    env[FLWR_DISABLE_INSTALL] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def toml_value(value) -> str:
    """A node-config or run-config value as Flower's ``--node-config`` parser reads it (TOML scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" in text or any(c.isspace() for c in text):
        raise FlowerCommandError(f"config value {text!r}: quotes and whitespace are not supported by --node-config")
    return f"'{text}'"  # TOML literal string: no escapes, so Windows paths survive too


def config_arg(values: dict) -> str:
    """``{"data-path": "/d.jsonl", "threads": 1}`` -> ``data-path='/d.jsonl' threads=1``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def supernode_command(
    superlink: str,
    node_config: dict,
    *,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    insecure: bool = False,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_retries: int | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line; ``insecure`` and TLS/auth settings exclude each other."""
    if insecure and (root_certificates or auth_key):
        raise FlowerCommandError(
            "insecure: cannot be combined with root certificates or an auth key (node auth needs TLS)"
        )
    for name, path in (("root certificates", root_certificates), ("auth key", auth_key)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: {name} file not found")
    command = [flower_tool("flower-supernode"), "--superlink", superlink]
    if insecure:
        command.append("--insecure")
    if root_certificates is not None:
        command += ["--root-certificates", str(Path(root_certificates).resolve())]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    command += ["--host", host]
    if port is not None:
        command += ["--port", str(port)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if node_config:
        command += ["--node-config", config_arg(node_config)]
    return command
