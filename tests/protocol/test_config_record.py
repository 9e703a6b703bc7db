"""The generic config <-> ConfigRecord pair: a round trip is the identity for nested, optional and
tuple fields, a missing key takes the default (a nested one, its default instance's), and every
wrong key or value is refused by name, before or by the config's own ``__post_init__``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
from flwr.app import ConfigRecord

from offsite.protocol.config_record import ConfigRecordError, config_from_dict, config_from_record, config_to_record


@dataclass(frozen=True)
class Inner:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


@dataclass(frozen=True)
class Outer:
    steps: int = 10
    lr: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    name: str = "x"
    on: bool = False
    inner: Inner = field(default_factory=Inner)
    extra: Inner | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Job:
    rounds: int = 3
    outer: Outer = Outer(steps=2, lr=1e-2, inner=Inner(rank=2))


def test_round_trips_are_the_identity():
    for config in (
        Outer(),
        Outer(
            steps=3,
            lr=0.5,
            schedule="constant",
            name="y",
            on=True,
            inner=Inner(4, 2.0, ("q", "v")),
            extra=Inner(1),
            limit=7,
        ),
        Outer(inner=Inner(targets=())),
    ):
        record = config_to_record(config)
        assert isinstance(record, ConfigRecord)
        assert config_from_record(Outer, record) == config
    record = config_to_record(Outer(extra=Inner(rank=3)))
    assert record["inner.rank"] == 8 and record["extra.rank"] == 3
    assert "limit" not in record and "inner.targets" not in record  # None travels as no key


def test_missing_keys_take_defaults_and_a_nested_config_its_default_instance():
    assert config_from_record(Outer, ConfigRecord({"steps": 5})) == Outer(steps=5)
    # a nested config given in part starts from the parent field's default instance, not its class defaults
    job = config_from_dict(Job, {"outer": {"lr": 0.5, "inner": {"alpha": 1.0}}})
    assert job.outer == dataclasses.replace(Job().outer, lr=0.5, inner=Inner(rank=2, alpha=1.0))
    assert config_from_dict(Job, {}) == Job()


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("steps", "3", "'steps': expected int, got str"),
        ("steps", True, "'steps': expected int, got bool"),
        ("steps", 3.0, "'steps': expected int, got float"),
        ("lr", True, "'lr': expected float, got bool"),
        ("on", 1, "'on': expected bool, got int"),
        ("schedule", "linear", r"'schedule': expected one of \('cosine', 'constant'\)"),
        ("inner.targets", "q", "'inner.targets': expected a list"),
        ("inner.targets", [1], r"'inner.targets\[0\]': expected str"),
        ("inner.rank", 0, "inner: rank must be >= 1"),  # the nested config's own check, named by where it sits
        ("inner.depth", 1, r"unknown inner settings \['depth'\]"),
        ("stepz", 1, r"unknown settings \['stepz'\]"),
        ("inner", 1, "'inner': expected a mapping|both a value and a nested config"),
    ],
)
def test_a_bad_key_or_value_is_refused_by_name(key, value, match):
    record = config_to_record(Outer())
    record[key] = value
    with pytest.raises(ConfigRecordError, match=match):
        config_from_record(Outer, record)


def test_an_int_is_read_as_a_float_and_none_only_where_the_type_allows_it():
    assert config_from_record(Outer, ConfigRecord({"lr": 1})).lr == 1.0
    assert isinstance(config_from_record(Outer, ConfigRecord({"lr": 1})).lr, float)
    assert config_from_dict(Outer, {"limit": None, "extra": None}) == Outer()
    with pytest.raises(ConfigRecordError, match="'steps': expected"):
        config_from_dict(Outer, {"steps": None})
    with pytest.raises(ConfigRecordError, match="None travels as no key"):
        config_to_record(Job(rounds=None))  # a None that would read back as 3
