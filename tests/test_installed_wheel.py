"""The wheel works on its own: nothing it needs lives outside the installed package.

The wheel is built from this source tree (``pip wheel --no-deps --no-build-isolation``, from a copy
of the files the build reads, so no ``build/`` or egg-info appears in the checkout) and installed
into a fresh virtual environment. The heavy dependencies (torch, transformers, flwr, ...) are not
downloaded: a ``.pth`` file in the fresh environment puts this environment's site-packages on its
path (a directory named in a ``.pth`` file is not a site directory, so the editable install's
own ``.pth`` hook is not run), and flwr's console scripts are written into its ``bin/``. Every
command runs from a directory outside the repository, with this environment's ``bin/`` off
``PATH``, and checks that ``offsite`` is imported from the fresh environment's site-packages.

Run there: ``offsite --help``, ``offsite presets``, ``offsite cloud prepare`` on a tiny random
llama saved as a local HF directory, and one round of a federated job on a SuperLink and a
SuperNode on 127.0.0.1 (:class:`offsite.harness.federation.LocalFederation`, from a small script
the fresh environment's Python runs), which must end with a checkpoint. The Flower app that
``flwr run`` submits (``offsite.cloud.superlink.APP_DIR``) and the bundled tasks
(``offsite.harness.pipeline.task_files``) must resolve inside the installed package.

About a minute on 2 busy cores, most of it Flower's processes starting; not marked ``slow`` (that
marker means the real default model), so it runs in the default suite.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_tokenizer, tiny_model, write_jsonl

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
FLOWER_TOOLS = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp")


def package_dirs() -> dict[str, str]:
    """``[tool.setuptools.package-dir]``: top-level package name -> source folder (``offsite.cloud`` -> ``cloud``)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-dir"]


def wheel_path_of(source: str, dirs: dict[str, str]) -> str | None:
    """Where the source file ``cloud/x.py`` lands in the wheel (``offsite/cloud/x.py``), or None."""
    folder, _, rest = source.partition("/")
    for package, directory in dirs.items():
        if directory == folder:
            return package.replace(".", "/") + "/" + rest
    return None


@dataclass
class Installed:
    wheel: Path
    venv: Path
    python: Path
    bin: Path
    site: Path  # the fresh environment's site-packages, where offsite must come from
    env: dict[str, str]
    outside: Path  # a working directory outside the repository

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(args, cwd=self.outside, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (
            f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        return done


def _copy_build_sources(dest: Path) -> None:
    """What setuptools reads to build the wheel: pyproject.toml, the readme, the package folders."""
    dest.mkdir(parents=True)
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    shutil.copy2(REPO / "pyproject.toml", dest)
    readme = config["project"].get("readme")
    if readme:
        shutil.copy2(REPO / readme, dest)
    for folder in sorted(set(package_dirs().values())):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _write_console_scripts(distribution: str, bin_dir: Path, python: Path) -> None:
    """``distribution``'s console scripts, run by ``python`` (what pip would have written)."""
    for entry in importlib.metadata.distribution(distribution).entry_points:
        if entry.group != "console_scripts":
            continue
        attr = entry.attr or ""
        script = bin_dir / entry.name
        script.write_text(
            f"#!{python}\nimport sys\nfrom {entry.module} import {attr.split('.')[0]}\n"
            f"if __name__ == '__main__':\n    sys.exit({attr}())\n"
        )
        script.chmod(0o755)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("installed-wheel")
    source, wheels, venv, outside = root / "source", root / "wheels", root / "venv", root / "elsewhere"
    outside.mkdir()
    _copy_build_sources(source)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("offsite-*.whl")

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    # without the PYTHONPATH an earlier in-process tool may have set (Ray's driver does), the fresh
    # environment cannot see this one's offsite, and pip installs the wheel instead of "already installed"
    clean = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=outside,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True, env=clean
        ).strip()
    )
    assert (site / "offsite" / "__init__.py").is_file(), f"the wheel was not installed into {site}"

    # the dependencies, from this environment (after the install, so pip never sees this environment's offsite)
    ours = dict.fromkeys(
        str(Path(p).resolve()) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])
    )
    assert str(site.resolve()) not in ours, "the fresh environment is this one"
    (site / "zz-offsite-test-dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    _write_console_scripts("flwr", bin_dir, python)

    ours_bin = Path(sys.executable).parent.resolve()
    path = [str(bin_dir)] + [
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry and Path(entry).resolve() != ours_bin and not Path(entry).resolve().is_relative_to(REPO)
    ]
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env.update(
        PATH=os.pathsep.join(path),
        VIRTUAL_ENV=str(venv),
        PYTHONNOUSERSITE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OFFSITE_CACHE=str(root / "offsite-cache"),
    )
    for tool in ("offsite", *FLOWER_TOOLS):
        found = shutil.which(tool, path=env["PATH"])
        assert found and Path(found).parent == bin_dir, f"{tool}: {found} is not the fresh environment's"
    return Installed(wheel, venv, python, bin_dir, site, env, outside)


def test_the_wheel_holds_every_file_of_the_packages(installed):
    """Every tracked file under a package folder (code, the Flower app, the tasks, the .proto), and
    every new module there, is in the wheel at the path its package maps it to: a subpackage missing
    from ``packages`` or a data file from ``package-data`` is named here."""
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert "offsite/cloud/flower_app/pyproject.toml" in names
    assert {
        "offsite/data/skill/wordnet_definitions.train.jsonl",
        "offsite/data/skill/wordnet_definitions.test.jsonl",
    } <= names
    assert "offsite/protocol/serving.proto" in names
    dirs = package_dirs()
    folders = sorted(set(dirs.values()))
    listed = subprocess.run(["git", "ls-files", "-z", "--", *folders], cwd=REPO, capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode(errors='replace')}")
    new = subprocess.run(
        ["git", "ls-files", "-z", "--others", "--exclude-standard", "--", *folders],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    # tracked files that are on disk (a deletion may not be committed yet), and new modules not yet committed
    sources = [name for name in listed.stdout.decode().split("\0") if name and (REPO / name).is_file()]
    sources += [name for name in new.stdout.decode().split("\0") if name.endswith(".py")]
    assert sources
    missing = sorted(source for source in sources if wheel_path_of(source, dirs) not in names)
    assert not missing, (
        f"files the wheel does not ship (pyproject.toml's [tool.setuptools] packages or package-data): {missing}"
    )


def test_cli_runs_from_the_installed_package(installed):
    help_text = installed.run(str(installed.bin / "offsite"), "--help").stdout
    assert "usage: offsite" in help_text and "presets" in help_text
    presets = installed.run(str(installed.bin / "offsite"), "presets").stdout
    assert "smollm2-135m" in presets
    where = installed.run(
        str(installed.python),
        "-c",
        textwrap.dedent("""
        import json, offsite
        from offsite.cloud.superlink import APP_DIR
        from offsite.harness.pipeline import task_files
        tasks = [str(p) for p in task_files("wordnet_definitions")]
        print(json.dumps({"offsite": offsite.__file__, "app": str(APP_DIR), "tasks": tasks}))
    """),
    ).stdout
    found = json.loads(where.splitlines()[-1])
    site = installed.site.resolve()
    assert Path(found["offsite"]).resolve() == site / "offsite" / "__init__.py"
    assert (Path(found["app"]) / "pyproject.toml").resolve().is_relative_to(site)
    assert all(Path(task).resolve().is_relative_to(site) and Path(task).is_file() for task in found["tasks"]), found[
        "tasks"
    ]


FEDERATION_SCRIPT = '''
"""One round of a federated job on a SuperLink and one SuperNode, from the installed package."""
import json, signal, sys, time
from pathlib import Path

signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the test's timeout: stop the federation on the way out

workdir, job_dir, data, cache, result = map(Path, sys.argv[1:6])

import offsite
from offsite.cloud.fed_job import load_state
from offsite.cloud.superlink import APP_DIR
from offsite.harness.federation import LocalFederation
from offsite.harness.pipeline import task_files

with LocalFederation(workdir) as federation:
    federation.start_superlink()
    node = federation.start_supernode({"data-path": str(data), "cache-dir": str(cache), "threads": 1})
    run_id = federation.submit({"job-dir": str(job_dir)})
    # watch for the checkpoint on disk (free), asking the SuperLink (a `flwr ls` process, ~1 s of CPU)
    # only every 15 s in case the run failed, then wait for the run to end
    deadline, ask_at = time.monotonic() + 240, time.monotonic() + 15
    while getattr(load_state(job_dir), "completed_round", 0) < 1:
        if time.monotonic() > deadline:
            sys.exit(f"no checkpoint after 240 s; logs in {workdir / 'logs'}")
        if time.monotonic() > ask_at:
            if federation.run_status(run_id).startswith("finished"):
                break
            ask_at = time.monotonic() + 15
        time.sleep(0.5)
    status = federation.wait(run_id, timeout=120)
    logs = federation.logs(run_id)
    processes = [federation.superlink.process.args, node.process.args]

state = load_state(job_dir)
result.write_text(json.dumps({
    "status": status,
    "logs": logs[-6000:],
    "offsite": offsite.__file__,
    "app": str(APP_DIR),
    "tasks": [str(p) for p in task_files("wordnet_definitions")],
    "modules": sorted(
        {
            m.__name__: getattr(m, "__file__", None) or ""
            for m in list(sys.modules.values())
            if m and m.__name__.split(".")[0] == "offsite"
        }.items()
    ),
    "path": sys.path,
    "processes": processes,
    "state": None if state is None else {
        "completed_round": state.completed_round, "checkpoint": state.checkpoint,
        "checkpoint_sha256": state.checkpoint_sha256, "history": state.history,
    },
}, default=str))
'''


def _log_tails(folder: Path, lines: int = 40) -> str:
    tails = []
    for log in sorted(folder.rglob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log}\n" + "\n".join(text))
    return "\n".join(tails)


def _run_stopping_on_timeout(command: list[str], installed: Installed, log_path: Path, timeout: float) -> int:
    """Run ``command``; past ``timeout`` SIGTERM it (the script then stops its federation), and
    SIGKILL by PID whatever it started that is still alive 30 s later."""
    from offsite.harness.federation import _descendants

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=installed.outside, env=installed.env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            started = _descendants(process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for pid in started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise


def test_federated_job_from_the_installed_package(installed, tmp_path):
    """``offsite cloud prepare`` on a tiny local HF model, then one round on one SuperNode."""
    model_dir, job_dir = tmp_path / "model", tmp_path / "job"
    tiny_model("llama", n_blocks=4).save_pretrained(model_dir)
    make_tokenizer(tmp_path).save_pretrained(model_dir)
    data = tmp_path / "owner.jsonl"  # a data owner's rows, as tests/e2e's jobs have them
    write_jsonl(data, [{"prompt": f"owner0 private note {i}: ", "completion": f"a{i * 7 % 10}"} for i in range(4)])

    prepared = installed.run(
        str(installed.bin / "offsite"),
        "cloud",
        "prepare",
        "--model",
        str(model_dir),
        "--shape",
        "1-2-1",
        "--distill-steps",
        "0",
        "--out",
        str(job_dir),
        "--rounds",
        "1",
        "--min-nodes",
        "1",
        "--min-replies",
        "1",
        "--round-timeout",
        "120",
        "--local-steps",
        "1",
        "--local-batch-size",
        "2",
        "--no-plug-in",
        timeout=180,
    )
    assert (job_dir / "job.json").is_file() and (job_dir / "bundle" / "manifest.json").is_file(), prepared.stdout

    script, result, log_path = tmp_path / "federation_job.py", tmp_path / "result.json", tmp_path / "federation_job.log"
    script.write_text(FEDERATION_SCRIPT)
    workdir = tmp_path / "federation"
    command = [
        str(installed.python),
        str(script),
        str(workdir),
        str(job_dir),
        str(data),
        str(tmp_path / "node-cache"),
        str(result),
    ]
    code = _run_stopping_on_timeout(command, installed, log_path, timeout=360)
    where = f"\n{log_path.read_text(errors='replace')[-4000:]}\n{_log_tails(workdir)}"
    assert code == 0 and result.is_file(), f"the federation script exited with {code}:{where}"
    found = json.loads(result.read_text())

    site = installed.site.resolve()
    assert Path(found["offsite"]).resolve() == site / "offsite" / "__init__.py"
    outside = sorted(name for name, file in found["modules"] if not Path(file).resolve().is_relative_to(site))
    assert not outside, f"offsite modules imported from outside the installed package: {outside}"
    assert not any(Path(entry or ".").resolve() == REPO for entry in found["path"]), found["path"]
    assert (Path(found["app"]) / "pyproject.toml").resolve().is_relative_to(site)
    assert all(Path(task).resolve().is_relative_to(site) for task in found["tasks"])
    for args in found["processes"]:  # the SuperLink and the SuperNode are the fresh environment's
        assert Path(args[0]).parent == installed.bin, args

    assert found["status"] == "finished:completed", found["logs"] + where
    state = found["state"]
    assert state is not None and state["completed_round"] == 1, found["logs"] + where
    (record,) = state["history"]
    assert len(record["replied"]) == 1 and not record["failed"] and not record["dropped"], record
    checkpoint = job_dir / state["checkpoint"]
    assert checkpoint.is_file() and checkpoint.name == "round-0001.safetensors", state
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == state["checkpoint_sha256"]
