"""A virtual SuperNode's settings: partition-id mapped through $OFFSITE_SIMULATION, never through the
coordinator; a deployed SuperNode's node config is read as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from offsite.client.settings import NodeConfigError, NodeSettings
from offsite.protocol.simulation import SIMULATION_ENV, SimulatedOwners


def simulation_env(tmp_path, partitions: int = 4, threads: int | None = 1) -> dict[str, str]:
    owners = SimulatedOwners(tmp_path / "partitions", partitions, tmp_path / "job" / "sim" / "cache", "cpu", threads)
    return {SIMULATION_ENV: owners.to_env()}


def test_a_virtual_node_reads_its_partition_and_the_job_cache(tmp_path):
    settings = NodeSettings.from_node_config({"partition-id": 2, "num-partitions": 4}, simulation_env(tmp_path))
    assert settings.data_path == (tmp_path / "partitions" / "owner-2.jsonl").resolve()
    assert settings.cache_dir == (tmp_path / "job" / "sim" / "cache").resolve()
    assert settings.device == "cpu" and settings.threads == 1 and settings.max_examples is None


def test_a_deployed_node_config_is_read_as_before(tmp_path):
    environ = simulation_env(tmp_path)
    config = {"data-path": "/data/mine.jsonl", "cache-dir": "/var/cache/offsite", "device": "cuda", "threads": 3}
    settings = NodeSettings.from_node_config(config, environ)
    assert settings == NodeSettings(Path("/data/mine.jsonl"), Path("/var/cache/offsite"), "cuda", 3)
    # a partition-id beside a data-path changes nothing: the node's own data path wins
    assert NodeSettings.from_node_config({**config, "partition-id": 1}, environ).data_path == Path("/data/mine.jsonl")
    with pytest.raises(NodeConfigError, match="lacks 'data-path'"):
        NodeSettings.from_node_config({"cache-dir": "/c"}, environ)


@pytest.mark.parametrize(
    ("node_config", "environ", "message"),
    [
        (
            {"partition-id": 0, "num-partitions": 4},
            {},
            r"without \$OFFSITE_SIMULATION: run simulations with `offsite cloud simulate`",
        ),
        ({"partition-id": 0, "num-partitions": 4}, {SIMULATION_ENV: "{not json"}, "not valid JSON"),
        (
            {"partition-id": 0, "num-partitions": 4},
            {SIMULATION_ENV: '{"partitions": "/p"}'},
            "'cache-dir' must be a non-empty string",
        ),
        ({"partition-id": 0, "num-partitions": 5}, None, "runs 5 virtual nodes, .* describes 4 partitions"),
        ({"partition-id": 4, "num-partitions": 4}, None, "partition-id 4 is out of range"),
        ({"partition-id": "0", "num-partitions": 4}, None, "'partition-id' must be an integer"),
    ],
)
def test_a_virtual_node_without_a_usable_simulation_description_is_refused(tmp_path, node_config, environ, message):
    with pytest.raises(NodeConfigError, match=message):
        NodeSettings.from_node_config(node_config, simulation_env(tmp_path) if environ is None else environ)


def test_the_description_round_trips_and_checks_its_values(tmp_path):
    owners = SimulatedOwners(tmp_path / "p", 3, tmp_path / "c", "auto", None)
    expected = SimulatedOwners((tmp_path / "p").resolve(), 3, (tmp_path / "c").resolve(), "auto", None)
    assert SimulatedOwners.from_env(owners.to_env()) == expected
    with pytest.raises(ValueError, match="'num-partitions' must be an integer >= 1"):
        SimulatedOwners.from_env('{"partitions": "/p", "cache-dir": "/c", "device": "cpu", "num-partitions": 0}')
