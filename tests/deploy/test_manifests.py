"""The deployment files in deploy/ parse, have the fields their tools need, and every command they
run exists: our `offsite` subcommands (through the real argparse parser) and every flag given to
`flower-superlink`/`flower-supernode` (through their `--help`). Nothing here starts a container."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from offsite.cli import build_parser
from offsite.protocol.flower_process import flower_env, flower_tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
SYSTEMD = sorted((DEPLOY / "systemd").glob("*.service"))
FLOWER_TOOLS = ("flower-superlink", "flower-supernode")
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# ---------------------------------------------------------------- readers


def k8s_objects(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def pod_spec(obj: dict) -> dict | None:
    if obj.get("kind") not in POD_OWNERS:
        return None
    return obj["spec"]["template"]["spec"]


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's ini dialect: sections, repeatable keys, backslash continuations, # comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    logical, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: the last line ends with a continuation"
    for line in logical:
        if match := re.fullmatch(r"\[(\w+)\]", line.strip()):
            current = sections.setdefault(match.group(1), {})
            continue
        assert current is not None, f"{path}: {line!r} before any [Section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def all_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command a deployment file runs."""
    found = []
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        command = service["command"]
        found.append(
            (f"compose.yaml:{name}", shlex.split(command) if isinstance(command, str) else [str(a) for a in command])
        )
    for path in K8S:
        for obj in k8s_objects(path):
            spec = pod_spec(obj)
            for container in (spec or {}).get("containers", []):
                argv = [str(a) for a in container.get("command", []) + container.get("args", [])]
                found.append((f"k8s/{path.name}:{obj['metadata']['name']}/{container['name']}", argv))
    for path in SYSTEMD:
        for exec_start in read_unit(path)["Service"]["ExecStart"]:
            found.append((f"systemd/{path.name}", shlex.split(exec_start.lstrip("-@:+!"))))
    return found


@functools.lru_cache(maxsize=None)
def flower_flags(tool: str) -> frozenset[str]:
    done = subprocess.run([flower_tool(tool), "--help"], capture_output=True, text=True, timeout=120, env=flower_env())
    assert done.returncode == 0, done.stderr
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", done.stdout))


# ---------------------------------------------------------------- schema


def test_compose_services_have_image_and_command():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"superlink", "coordinator"} <= set(services)
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert service.get("image"), f"service {name}: no image"
        assert service.get("command"), f"service {name}: no command"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"service {name}: depends on unknown service {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"service {name}: named volume {source!r} is not declared"


@pytest.mark.parametrize("path", K8S, ids=[p.name for p in K8S])
def test_k8s_objects_are_well_formed(path):
    objects = k8s_objects(path)
    assert objects, f"{path}: empty"
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), f"{path}: object without apiVersion/kind"
        assert obj.get("metadata", {}).get("name"), f"{path}: {obj['kind']} without metadata.name"
        spec = pod_spec(obj)
        if spec is None:
            continue
        declared = {volume["name"] for volume in spec.get("volumes", [])}
        for container in spec["containers"]:
            assert container.get("image") and container.get("command"), f"{path}: container {container.get('name')}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared, (
                    f"{path}: {obj['metadata']['name']} mounts undeclared volume {mount['name']}"
                )
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}:
            selector = obj["spec"]["selector"]["matchLabels"]
            assert selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_services_select_a_deployed_pod():
    objects = [obj for path in K8S for obj in k8s_objects(path)]
    pod_labels = [
        obj["spec"]["template"]["metadata"].get("labels", {}) for obj in objects if obj["kind"] == "Deployment"
    ]
    for service in (obj for obj in objects if obj["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), (
            f"Service {service['metadata']['name']} selects nothing"
        )


@pytest.mark.parametrize("path", SYSTEMD, ids=[p.name for p in SYSTEMD])
def test_systemd_units_have_unit_service_and_execstart(path):
    unit = read_unit(path)
    assert "Unit" in unit and "Service" in unit, f"{path}: needs [Unit] and [Service]"
    assert unit["Unit"].get("Description"), f"{path}: no Description"
    assert len(unit["Service"].get("ExecStart", [])) == 1, f"{path}: needs exactly one ExecStart"
    assert Path(shlex.split(unit["Service"]["ExecStart"][0])[0]).is_absolute(), (
        f"{path}: ExecStart needs an absolute path"
    )
    assert unit.get("Install", {}).get("WantedBy"), f"{path}: no [Install] WantedBy"


# ---------------------------------------------------------------- the commands exist


COMMANDS = all_commands()


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_command_exists(where, argv):
    program = Path(argv[0]).name
    if program == "offsite":
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit as error:
            pytest.fail(f"{where}: `{shlex.join(argv)}` is not a valid offsite command (exit {error.code})")
        assert callable(args.func)
    elif program in FLOWER_TOOLS:
        used = {token.split("=")[0] for token in argv[1:] if token.startswith("--")}
        unknown = used - flower_flags(program)
        assert not unknown, f"{where}: {program} has no flag(s) {sorted(unknown)}"
    else:
        pytest.fail(f"{where}: runs {program!r}; deployment files may run only offsite and {FLOWER_TOOLS} (exec form)")


def test_every_deployment_is_secure():
    """TLS and node authentication everywhere: no --insecure, and every SuperLink enforces auth."""
    for where, argv in COMMANDS:
        assert "--insecure" not in argv, where
        program = Path(argv[0]).name
        if program == "flower-superlink":
            assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"} <= set(argv), (
                where
            )
        if program == "offsite" and argv[1:3] == ["client", "start"]:
            assert "--root-certificates" in argv and "--auth-key" in argv, where


def test_one_host_script_parses():
    done = subprocess.run(["bash", "-n", str(DEPLOY / "one_host.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_deploy_tree_holds_no_private_key():
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY-----" not in path.read_text(errors="replace"), path
