"""The same federation with TLS and SuperNode authentication on: a SuperLink serving TLS with
``--enable-supernode-auth``, 3 SuperNodes whose keys were registered (the third one run by the
data owner's daemon, ``offsite client start``), 2 rounds of FedAvg submitted the way
``offsite cloud run`` does and checked against what the clients sent; and a 4th SuperNode with an
unregistered key, which is refused."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time

from offsite.cloud.certs import write_deployment_certs, write_node_key
from offsite.cloud.superlink import SuperLinkConnection, free_port, run_job_on_superlink, wait_for_port
from offsite.harness.federation import LocalFederation
from tests.e2e.flower_jobs import NUM_EXAMPLES, assert_rounds_are_weighted_means, data_file, make_job


def wait_exit(process, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    return process.poll()


def test_tls_and_node_auth_two_rounds_and_an_unknown_key_is_refused(tmp_path):
    certs = write_deployment_certs(tmp_path / "certs", nodes=3)
    for private in (certs.ca_key, certs.server_key, *certs.node_keys):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    rogue_key = write_node_key(tmp_path / "rogue" / "node-key")
    job_dir = make_job(tmp_path)

    with LocalFederation(tmp_path / "federation", certs=certs) as federation:
        federation.start_superlink()
        superlink_command = federation.superlink.process.args
        assert "--enable-supernode-auth" in superlink_command and "--insecure" not in superlink_command

        registered = []
        for index, rows in enumerate(NUM_EXAMPLES[:2]):
            node = federation.start_supernode(
                {
                    "data-path": data_file(tmp_path / f"data-{index}.jsonl", rows, index),
                    "cache-dir": tmp_path / f"cache-{index}",
                    "threads": 1,
                }
            )
            assert "--root-certificates" in node.process.args and "--insecure" not in node.process.args
            registered.append(node.node_id)
        # the third data owner runs the daemon, as in deploy/: its key registered by the operator
        registered.append(federation.control.register_supernode(certs.node_public_keys[2]))
        runtime_port = free_port()
        daemon_log = open(tmp_path / "daemon.log", "wb")
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "offsite.cli",
                "client",
                "start",
                "--superlink",
                federation.address,
                "--data",
                str(data_file(tmp_path / "data-2.jsonl", NUM_EXAMPLES[2], 2)),
                "--cache-dir",
                str(tmp_path / "cache-2"),
                "--root-certificates",
                str(certs.ca_cert),
                "--auth-key",
                str(certs.node_keys[2]),
                "--runtime-port",
                str(runtime_port),
                "--threads",
                "1",
            ],
            stdout=daemon_log,
            stderr=subprocess.STDOUT,
            env=federation.env,
        )

        # a SuperNode speaking TLS to the right SuperLink, but with a key nobody registered
        rogue = federation.start_supernode(
            {"data-path": data_file(tmp_path / "data-rogue.jsonl", 4, 9), "cache-dir": tmp_path / "cache-rogue"},
            auth_key=rogue_key,
            register=False,
            wait=False,
            name="supernode-rogue",
        )
        assert wait_exit(rogue.process, timeout=60) not in (None, 0), "an unregistered SuperNode kept running"
        assert "Failed to activate SuperNode" in rogue.log_path.read_text(errors="replace")
        assert "SuperNode ID:" not in rogue.log_path.read_text(errors="replace")

        try:
            wait_for_port(f"127.0.0.1:{runtime_port}", timeout=60)
            deadline = time.monotonic() + 60
            while True:  # the daemon's SuperNode comes online a moment after its port opens
                listed = {int(entry["node-id"]): entry["status"] for entry in federation.list_supernodes()}
                if listed == {node_id: "online" for node_id in registered} or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert listed == {node_id: "online" for node_id in registered}

            progress: list[str] = []
            connection = SuperLinkConnection(federation.address, root_certificates=certs.ca_cert)
            run_id, status = run_job_on_superlink(
                job_dir, connection, progress.append, timeout=200, home=tmp_path / "operator"
            )
            assert status == "finished:completed", federation.logs(run_id)
            assert any("round 2: aggregated 3 update(s)" in line for line in progress), progress
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0  # the supervisor stopped its SuperNode and exited cleanly
            daemon_log.close()
        assert "terminating child" in (tmp_path / "daemon.log").read_text()

    state = assert_rounds_are_weighted_means(job_dir, rounds=2)
    assert sorted(state["nodes_with_bundle"]) == sorted(registered)
    for record in state["history"]:
        assert sorted(record["connected"]) == sorted(registered)  # the rogue never got work
    assert not (tmp_path / "cache-rogue").exists()
    # every data owner's cache holds the verified bundle, installed once
    for index in range(3):
        installed = list((tmp_path / f"cache-{index}" / "bundles").iterdir())
        assert len(installed) == 1 and installed[0].name == state["bundle"]
