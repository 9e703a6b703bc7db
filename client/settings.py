"""What a data owner configures on its SuperNode (``--node-config``); the server never says where
things are on this machine:

- ``data-path`` (required): the local JSONL training file;
- ``cache-dir``: the bundle cache (default ``$OFFSITE_CACHE/client``, else ``~/.cache/offsite/client``);
- ``device``: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:1``, ...;
- ``threads``: torch CPU threads (default: torch's choice);
- ``activation-checkpointing``: ``true`` trades time for memory while tuning (activations and the
  head's logits recomputed in the backward pass; the same update);
- ``max-examples``: read at most this many rows of the data file;
- ``identity-dir``: this data owner's signing identity (``offsite client enroll --out DIR``),
  needed when the job seals updates in envelopes;
- ``coordinator-key``: the coordinator's public keys (``coordinator.pub.json``, or its directory),
  pinned by the data owner out of band, never taken from a message: updates are sealed to it,
  and every bundle must carry its signature (``manifest.sig``) before it is installed or used;
- ``audit-dir``: keep a copy of every update this node sent (as it left the node, before
  sealing or masking), ``<job>-round-NNNN.safetensors``, mode 0600.

A virtual SuperNode of Flower's simulation engine has no ``--node-config``, only ``partition-id``
and ``num-partitions``: its settings come from the ``$OFFSITE_SIMULATION`` that ``offsite cloud
simulate`` sets on its own host (see :mod:`offsite.protocol.simulation`), never from the coordinator.

Torch-free: every ClientApp process reads these.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY

from offsite.protocol.keys import ClientIdentity, CoordinatorPublicKeys, KeyFileError
from offsite.protocol.simulation import SIMULATION_ENV, SimulatedOwners

from .bundle_cache import BundleCache


class NodeConfigError(ValueError):
    """The SuperNode's node config lacks or mangles a setting; the message names the key."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("OFFSITE_CACHE") or Path.home() / ".cache" / "offsite") / "client"


@dataclass(frozen=True)
class NodeSettings:
    """What a data owner configures on its SuperNode (``--node-config``)."""

    data_path: Path
    cache_dir: Path
    device: str = "auto"
    threads: int | None = None
    activation_checkpointing: bool = False
    max_examples: int | None = None
    identity_dir: Path | None = None
    coordinator_key: Path | None = None
    audit_dir: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping, environ: Mapping[str, str] | None = None) -> NodeSettings:
        """From a SuperNode's node config; a virtual node's (``partition-id``, no ``data-path``)
        is first mapped through ``$OFFSITE_SIMULATION`` in ``environ`` (default ``os.environ``)."""
        if "data-path" not in node_config and PARTITION_ID_KEY in node_config:
            node_config = simulated_node_config(node_config, os.environ if environ is None else environ)
        data = _text(node_config, "data-path")
        if data is None:
            raise NodeConfigError(
                "node config lacks 'data-path' (start the SuperNode with --node-config \"data-path='...'\")"
            )
        cache = _text(node_config, "cache-dir")
        return cls(
            data_path=Path(data).expanduser(),
            cache_dir=Path(cache).expanduser() if cache else default_cache_dir(),
            device=_text(node_config, "device", "auto"),
            threads=_count(node_config, "threads"),
            activation_checkpointing=_flag(node_config, "activation-checkpointing"),
            max_examples=_count(node_config, "max-examples"),
            identity_dir=_path(node_config, "identity-dir"),
            coordinator_key=_path(node_config, "coordinator-key"),
            audit_dir=_path(node_config, "audit-dir"),
        )

    def coordinator(self) -> CoordinatorPublicKeys | None:
        """The pinned coordinator public keys (None when ``coordinator-key`` is not set)."""
        if self.coordinator_key is None:
            return None
        try:
            return CoordinatorPublicKeys.load(self.coordinator_key)
        except KeyFileError as error:
            raise NodeConfigError(f"node config 'coordinator-key': {error}") from None

    def identity(self) -> ClientIdentity:
        """This data owner's signing identity; NodeConfigError if not configured or unreadable."""
        if self.identity_dir is None:
            raise NodeConfigError(
                "the job seals updates in envelopes but node config lacks 'identity-dir' "
                "(offsite client enroll --out DIR)"
            )
        try:
            return ClientIdentity.load(self.identity_dir)
        except KeyFileError as error:
            raise NodeConfigError(f"node config 'identity-dir': {error}") from None

    def bundle_cache(self) -> BundleCache:
        """The bundle cache, verifying signatures with the pinned coordinator key (if any)."""
        return BundleCache(self.cache_dir, self.coordinator())


def _text(node_config: Mapping, key: str, default: str | None = None) -> str | None:
    value = node_config.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise NodeConfigError(f"node config {key!r} must be a non-empty string, got {value!r}")
    return value


def _count(node_config: Mapping, key: str) -> int | None:
    value = node_config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise NodeConfigError(f"node config {key!r} must be an integer >= 1, got {value!r}")
    return value


def _flag(node_config: Mapping, key: str) -> bool:
    """A true/false setting: a bool, or the text true/false (Flower's --node-config parses TOML)."""
    value = node_config.get(key, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise NodeConfigError(f"node config {key!r} must be true or false, got {value!r}")
    return value


def _path(node_config: Mapping, key: str) -> Path | None:
    value = _text(node_config, key)
    return Path(value).expanduser() if value else None


def simulated_node_config(node_config: Mapping, environ: Mapping[str, str]) -> dict:
    """The node config of virtual node ``partition-id``, as ``offsite cloud simulate`` describes it."""
    partition, count = node_config.get(PARTITION_ID_KEY), node_config.get(NUM_PARTITIONS_KEY)
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise NodeConfigError(f"node config {PARTITION_ID_KEY!r} must be an integer >= 0, got {partition!r}")
    if SIMULATION_ENV not in environ:
        raise NodeConfigError(
            f"simulated node (partition-id {partition}) without ${SIMULATION_ENV}: "
            "run simulations with `offsite cloud simulate`"
        )
    try:
        owners = SimulatedOwners.from_env(environ[SIMULATION_ENV])
    except ValueError as error:
        raise NodeConfigError(str(error)) from None
    if count is not None and count != owners.num_partitions:
        raise NodeConfigError(
            f"the simulation runs {count} virtual nodes, ${SIMULATION_ENV} describes {owners.num_partitions} partitions"
        )
    if partition >= owners.num_partitions:
        raise NodeConfigError(
            f"partition-id {partition} is out of range: ${SIMULATION_ENV} describes {owners.num_partitions} partitions"
        )
    return owners.node_config(partition)
