"""Stopping a local federation's processes: every one ends, by its PID, together with what it started."""

import os
import signal
import subprocess
import sys
import time

from offsite.harness.federation import FlowerProcess, _descendants, stop_processes

# a parent that starts a child in its own session (as Flower's SuperExec is) and then waits
PARENT = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
    "time.sleep(600)"
)
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
)


def spawn(tmp_path, name, code) -> FlowerProcess:
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT)
    return FlowerProcess(name, process, log, 0)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_processes_ends_each_process_its_descendants_and_one_that_ignores_sigterm(tmp_path):
    parents = [spawn(tmp_path, f"parent-{i}", PARENT) for i in range(2)]
    stubborn = spawn(tmp_path, "stubborn", STUBBORN)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        all(_descendants(p.process.pid) for p in parents) and b"ready" in stubborn.log_path.read_bytes()
    ):
        time.sleep(0.1)
    children = [pid for p in parents for pid in _descendants(p.process.pid)]
    assert len(children) == 2
    stop_processes([*parents, stubborn], grace=2.0)
    for proc in (*parents, stubborn):
        assert proc.process.poll() is not None, proc.name
    assert parents[0].process.returncode == -signal.SIGTERM
    assert stubborn.process.returncode == -signal.SIGKILL  # ignored SIGTERM: killed after the grace period
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children), children
