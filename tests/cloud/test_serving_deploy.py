"""The serving deployment files (deploy/k8s/serving.yaml, deploy/compose.serving.yaml,
deploy/systemd/offsite-serve.service): their commands are valid ``offsite`` commands with TLS,
the probes they name answer on a real server over HTTPS, and each gives running requests longer
to finish than the server's own ``--shutdown-timeout``. (deploy/k8s and deploy/systemd are also
checked by tests/deploy/test_manifests.py; the compose file is new and checked here.)"""

from __future__ import annotations

import shlex
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from offsite.cli import build_parser
from offsite.cloud.certs import write_deployment_certs
from offsite.cloud.serving import server
from offsite.cloud.serving.http_server import TlsFiles
from offsite.cloud.serving.service import ServeConfig, ServingService
from tests.cloud.serving_setup import chat_tokenizer, tiny_base
from tests.deploy.test_manifests import read_unit

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _serve_commands() -> dict[str, list[str]]:
    """``where -> argv`` of every ``offsite cloud serve`` in the three files."""
    found = {}
    for obj in yaml.safe_load_all((DEPLOY / "k8s" / "serving.yaml").read_text()):
        if obj and obj["kind"] == "Deployment":
            found["k8s"] = [str(a) for a in obj["spec"]["template"]["spec"]["containers"][0]["command"]]
    found["compose"] = yaml.safe_load((DEPLOY / "compose.serving.yaml").read_text())["services"]["serving"]["command"]
    found["systemd"] = shlex.split(read_unit(DEPLOY / "systemd" / "offsite-serve.service")["Service"]["ExecStart"][0])
    return found


def _parse(argv: list[str]):
    assert Path(argv[0]).name == "offsite", argv
    return build_parser().parse_args(argv[1:])


def test_every_command_is_a_valid_offsite_command_with_tls():
    compose = yaml.safe_load((DEPLOY / "compose.serving.yaml").read_text())
    for name, service in compose["services"].items():
        assert service.get("image"), name
        _parse([str(a) for a in service["command"]])
    for where, argv in _serve_commands().items():
        args = _parse(argv)
        assert args.func.__name__ == "_serve" and args.certfile and args.keyfile, where
        assert args.api_keys_file and args.admin_token_file and args.host == "0.0.0.0", where


def test_running_requests_get_longer_than_the_servers_shutdown_timeout():
    commands = _serve_commands()
    timeouts = {where: _parse(argv).shutdown_timeout for where, argv in commands.items()}
    [deployment] = [
        o for o in yaml.safe_load_all((DEPLOY / "k8s" / "serving.yaml").read_text()) if o and o["kind"] == "Deployment"
    ]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > timeouts["k8s"]
    grace = yaml.safe_load((DEPLOY / "compose.serving.yaml").read_text())["services"]["serving"]["stop_grace_period"]
    assert float(grace.rstrip("s")) > timeouts["compose"]
    assert (
        float(read_unit(DEPLOY / "systemd" / "offsite-serve.service")["Service"]["TimeoutStopSec"][0])
        > timeouts["systemd"]
    )


def _probes() -> list[str]:
    """The HTTPS paths the deployment's probes and the compose healthcheck ask for."""
    [deployment] = [
        o for o in yaml.safe_load_all((DEPLOY / "k8s" / "serving.yaml").read_text()) if o and o["kind"] == "Deployment"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    paths = []
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["scheme"] == "HTTPS" and get["port"] == 8000
        paths.append(get["path"])
    healthcheck = " ".join(
        yaml.safe_load((DEPLOY / "compose.serving.yaml").read_text())["services"]["serving"]["healthcheck"]["test"]
    )
    paths.append(healthcheck.split("https://localhost:8000")[1].split("'")[0])
    return paths


def test_the_probes_answer_over_https(tmp_path):
    certs = write_deployment_certs(tmp_path / "tls", nodes=0)
    config = ServeConfig(
        registry=tmp_path / "reg", max_batch=2, max_context=64, api_keys=frozenset({"k"}), admin_token="a"
    )
    servers = server.start(
        ServingService(tiny_base(dtype=torch.float32), chat_tokenizer(), config),
        "127.0.0.1",
        0,
        None,
        tls=TlsFiles(certs.server_cert, certs.server_key),
    )
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    try:
        paths = _probes()
        assert set(paths) == {"/health", "/ready"}
        for path in paths:  # no API key: probes carry none
            with urllib.request.urlopen(
                f"https://127.0.0.1:{servers.http.port}{path}", context=context, timeout=30
            ) as response:
                assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as caught:  # while /v1 asks for a key
            urllib.request.urlopen(f"https://127.0.0.1:{servers.http.port}/v1/models", context=context, timeout=30)
        assert caught.value.code == 401
    finally:
        servers.stop()
