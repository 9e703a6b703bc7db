"""The rooms of ARCHITECTURE.md, enforced: which package may import which, and no cycles between them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {
    "emulator": "emulator",
    "protocol": "protocol",
    "client": "client",
    "cloud": "cloud",
    "harness": "harness",
    "offsite": "offsite",
    "data": "data",
}


def package_imports(folder: str) -> dict[str, set[str]]:
    """For each module of ``folder``: the other ``offsite`` packages it imports (absolute or relative)."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        if "_generated" in path.parts:
            continue
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0 and node.module:
                    names = [node.module]
                elif node.level > 0:  # relative: within the package unless it climbs out of it
                    depth = len(path.relative_to(ROOT / folder).parts) - 1
                    names = [] if node.level <= depth + 1 else ["offsite"]
            for name in names:
                parts = name.split(".")
                if parts[0] == "offsite":
                    package = parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "offsite"
                    if package != PACKAGES[folder]:
                        targets.add(package)
        found[str(path.relative_to(ROOT))] = targets
    return found


def edges() -> dict[str, set[str]]:
    graph = {}
    for folder, package in PACKAGES.items():
        graph[package] = set().union(*package_imports(folder).values())
    return graph


@pytest.mark.parametrize(
    "importer, imported",
    [("client", "cloud"), ("cloud", "client")] + [(p, "harness") for p in ("emulator", "protocol", "client", "cloud")],
)
def test_a_room_does_not_import_what_the_architecture_forbids(importer, imported):
    offenders = [module for module, targets in package_imports(importer).items() if imported in targets]
    assert not offenders, f"{importer} must not import {imported}: {offenders}"


def test_no_import_cycle_between_packages():
    graph = edges()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(p for p in graph if p in reach(p))
    assert not cycles, (
        f"packages on an import cycle: {cycles}; edges: { {p: sorted(t) for p, t in graph.items() if t} }"
    )


def test_the_checks_see_imports(tmp_path):
    """The scan finds what is there: harness imports both roles, the command line imports harness."""
    graph = edges()
    assert {"client", "cloud"} <= graph["harness"] and "harness" in graph["offsite"]
