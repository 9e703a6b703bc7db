"""What ``offsite cloud simulate`` tells the ClientApps of its virtual data owners.

Flower's simulation engine (``flwr.simulation``, Ray backend) gives a virtual SuperNode no
``--node-config`` of its own: its node config holds only ``partition-id`` (0..N-1) and
``num-partitions`` (N). The simulate command runs every virtual owner on its own host, so it
describes them in the environment variable :data:`SIMULATION_ENV` (JSON, see
:class:`SimulatedOwners`) before Ray starts; Ray's worker processes inherit it. A ClientApp whose
node config has a ``partition-id`` and no ``data-path`` reads partition K from
``PARTITIONS/owner-K.jsonl`` and keeps its bundle cache where the variable says (under the job).

Why not the run config: the run config comes from the coordinator and reaches deployed SuperNodes
too, and a data path must never come from the coordinator. A deployed SuperNode keeps taking its
data path from its own ``--node-config`` only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .safe_json import JSONRefused, parse_json

SIMULATION_ENV = "OFFSITE_SIMULATION"


def partition_file_name(index: int) -> str:
    """The file of data owner ``index``: ``owner-{index}.jsonl``."""
    return f"owner-{index}.jsonl"


@dataclass(frozen=True)
class SimulatedOwners:
    """The virtual data owners of one simulation: where their data and bundle cache live, how they train."""

    partitions: Path  # holds owner-0.jsonl ... owner-{N-1}.jsonl
    num_partitions: int
    cache_dir: Path  # one bundle cache for every virtual owner (keyed by digest, safe across processes)
    device: str = "cpu"
    threads: int | None = None

    def to_env(self) -> str:
        return json.dumps(
            {
                "partitions": str(Path(self.partitions).resolve()),
                "num-partitions": self.num_partitions,
                "cache-dir": str(Path(self.cache_dir).resolve()),
                "device": self.device,
                "threads": self.threads,
            }
        )

    @classmethod
    def from_env(cls, text: str) -> SimulatedOwners:
        """Parse :data:`SIMULATION_ENV`'s value; ValueError naming the variable and the bad key."""
        try:
            data = parse_json(text)
        except JSONRefused as error:
            raise ValueError(f"${SIMULATION_ENV} is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"${SIMULATION_ENV} must be a JSON object")  # noqa: TRY004 - a bad value, reported as such
        for key in ("partitions", "cache-dir", "device"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"${SIMULATION_ENV}: {key!r} must be a non-empty string")
        for key in ("num-partitions", "threads"):
            value = data.get(key)
            if (value is not None or key == "num-partitions") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"${SIMULATION_ENV}: {key!r} must be an integer >= 1, got {value!r}")
        return cls(
            Path(data["partitions"]),
            data["num-partitions"],
            Path(data["cache-dir"]),
            data["device"],
            data.get("threads"),
        )

    def node_config(self, partition_id: int) -> dict:
        """The ``--node-config`` a deployed SuperNode of owner ``partition_id`` would have."""
        config = {
            "data-path": str(Path(self.partitions) / partition_file_name(partition_id)),
            "cache-dir": str(self.cache_dir),
            "device": self.device,
        }
        if self.threads is not None:
            config["threads"] = self.threads
        return config
