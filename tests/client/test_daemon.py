"""The SuperNode supervisor, on trivial child commands: crash -> restart with backoff, SIGTERM -> stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from offsite.client.daemon import DaemonConfig, RestartPolicy, Supervisor

FAST = RestartPolicy(initial_delay=0.05, factor=2.0, max_delay=0.1, reset_after=60.0, stop_grace=5.0)


def test_backoff_grows_and_is_capped():
    policy = RestartPolicy(initial_delay=1.0, factor=2.0, max_delay=5.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_crashing_child_is_restarted_until_the_budget_is_spent(tmp_path, caplog):
    counter = tmp_path / "starts"
    child = [sys.executable, "-c", f"import sys; open({str(counter)!r}, 'a').write('x'); sys.exit(3)"]
    supervisor = Supervisor(child, RestartPolicy(**{**FAST.__dict__, "max_restarts": 2}))
    with caplog.at_level("WARNING", logger="offsite.client.daemon"):
        code = supervisor.run()
    assert code == 3
    assert counter.read_text() == "xxx"  # first start + 2 restarts
    assert [e.returncode for e in supervisor.exits] == [3, 3, 3]
    assert len({e.pid for e in supervisor.exits}) == 3
    restarts = [r.getMessage() for r in caplog.records if "; restart " in r.getMessage()]
    assert len(restarts) == 2 and "exited with 3" in restarts[0]
    assert "giving up" in caplog.records[-1].getMessage()


def test_a_child_that_exits_cleanly_is_not_restarted(tmp_path):
    supervisor = Supervisor([sys.executable, "-c", "pass"], FAST)
    assert supervisor.run() == 0
    assert [e.returncode for e in supervisor.exits] == [0]


def test_crash_then_recovery(tmp_path):
    marker = tmp_path / "crashed-once"
    script = (
        f"import os, sys\nif not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close(); sys.exit(1)\n"
    )
    supervisor = Supervisor([sys.executable, "-c", script], FAST)
    assert supervisor.run() == 0
    assert [e.returncode for e in supervisor.exits] == [1, 0]


def test_sigterm_stops_the_supervisor_and_its_child(tmp_path):
    """The supervisor runs in its own process (signal handlers need a main thread); its child
    sleeps forever and writes its PID; SIGTERM to the supervisor must end both."""
    child_pid_file = tmp_path / "child.pid"
    child = [
        sys.executable,
        "-c",
        f"import os, time; open({str(child_pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)",
    ]
    program = textwrap.dedent(
        f"""
        import logging, sys
        from offsite.client.daemon import RestartPolicy, Supervisor
        logging.basicConfig(level=logging.INFO)
        supervisor = Supervisor({child!r}, RestartPolicy(initial_delay=0.05, max_delay=0.1, stop_grace=5.0))
        supervisor.install_signal_handlers()
        sys.exit(supervisor.run())
        """
    )
    supervisor = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (child_pid_file.exists() and child_pid_file.read_text()):
            assert time.monotonic() < deadline, "the child never started"
            assert supervisor.poll() is None, supervisor.stdout.read()
            time.sleep(0.1)
        child_pid = int(child_pid_file.read_text())
        supervisor.send_signal(signal.SIGTERM)
        output, _ = supervisor.communicate(timeout=30)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    assert supervisor.returncode == 0, output
    assert "received SIGTERM" in output and "terminating child" in output
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the child may take a moment to be reaped
            os.kill(child_pid, 0)
            time.sleep(0.1)


def test_daemon_config_builds_a_secure_supernode_command(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    ca, key = tmp_path / "ca.crt", tmp_path / "node-0"
    ca.write_text("x")
    key.write_text("x")
    command = DaemonConfig(
        "link.example.org:9092", data, cache_dir=tmp_path / "cache", root_certificates=ca, auth_key=key
    ).command()
    assert command[command.index("--superlink") + 1] == "link.example.org:9092"
    assert command[command.index("--root-certificates") + 1] == str(ca.resolve())
    assert command[command.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert "--insecure" not in command
    node_config = command[command.index("--node-config") + 1]
    assert f"data-path='{data.resolve()}'" in node_config and "device='auto'" in node_config
    with pytest.raises(ValueError, match="insecure"):
        DaemonConfig("127.0.0.1:9092", data, insecure=True, auth_key=key)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        DaemonConfig("127.0.0.1:9092", tmp_path / "missing.jsonl", insecure=True)
