"""Frozen config dataclasses <-> Flower ``ConfigRecord``: the symmetric pair
:func:`config_to_record` / :func:`config_from_record`, and :func:`config_from_dict` for the same
dataclasses read from JSON (``job.json``).

A nested config is flattened under its field's name (``tuning.lora.rank``); a tuple travels as a
list; None travels as a missing key, so a field that may be None must default to None. Reading
checks every value against its field's type (a bool is not an int, an int is a float, a
``Literal``'s value is one of its choices), takes a missing key from the field's default (inside a
nested config, from the default instance of that config), refuses unknown keys, and builds the
dataclass, whose ``__post_init__`` checks the rest. A field typed by a ``TypeVar`` (a config the
protocol carries without knowing its class) is read as the class given in ``nested``.

Torch-free: the ClientApp processes that answer bundle parts import this module.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

from flwr.app import ConfigRecord

ConfigT = TypeVar("ConfigT")
NONE = type(None)
SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}


class ConfigRecordError(ValueError):
    """A config record or dict does not decode into its dataclass; the message names the key."""


def config_to_record(config: Any) -> ConfigRecord:
    """``config`` (a dataclass instance, nested ones flattened) as a ConfigRecord."""
    return ConfigRecord(config_to_flat(config))


def config_to_flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"field": value, "nested.field": value, ...}``: tuples as lists, None left out."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        key, value = prefix + field.name, getattr(config, field.name)
        if value is None:
            if field.default is not None:
                raise ConfigRecordError(f"{key!r} is None but defaults to {field.default!r} (None travels as no key)")
            continue
        if dataclasses.is_dataclass(value):
            values |= config_to_flat(value, key + ".")
        else:
            values[key] = list(value) if isinstance(value, tuple) else value
    return values


def config_from_record(
    cls: type[ConfigT], record: Mapping[str, Any], nested: Mapping[str, type] | None = None
) -> ConfigT:
    """The ``cls`` that :func:`config_to_record` wrote (checked as the module docstring says)."""
    tree: dict[str, Any] = {}
    for key, value in record.items():
        *parents, name = str(key).split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ConfigRecordError(f"{key!r}: {parent!r} is both a value and a nested config")
        if isinstance(node.get(name), dict):
            raise ConfigRecordError(f"{key!r} is both a value and a nested config")
        node[name] = value
    return config_from_dict(cls, tree, nested=nested)


def config_from_dict(
    cls: type[ConfigT],
    data: Mapping[str, Any],
    base: Any = None,
    path: str = "",
    nested: Mapping[str, type] | None = None,
) -> ConfigT:
    """``cls`` from nested dicts (JSON): ``base`` (an instance of ``cls``) fills the missing keys
    before the fields' defaults do; ``path`` names where ``data`` sits, for the messages."""
    if not isinstance(data, Mapping):
        raise ConfigRecordError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigRecordError(f"unknown {path + ' ' if path else ''}settings {unknown}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        key = f"{path}.{name}" if path else name
        default = getattr(base, name) if base is not None else _default(field)
        hint = hints[name]
        if isinstance(hint, TypeVar):
            if nested is None or name not in nested:
                raise ConfigRecordError(f"{key!r}: no config class given for its type {hint}")
            hint = nested[name]
        if name in data:
            values[name] = _decode(data[name], hint, key, default)
        elif default is not dataclasses.MISSING:
            values[name] = default
        elif _may_be_none(hint):
            values[name] = None
        else:
            raise ConfigRecordError(f"{key!r} is missing")
    try:
        return cls(**values)
    except ConfigRecordError:
        raise
    except ValueError as error:  # __post_init__'s refusal, named by where the config sits
        if not path:
            raise
        raise ConfigRecordError(f"{path}: {error}") from None


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _is_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _may_be_none(hint: Any) -> bool:
    return _is_union(hint) and NONE in typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _decode(value: Any, hint: Any, key: str, default: Any) -> Any:
    """``value`` checked against ``hint`` (a nested config read on top of ``default``)."""
    if _is_union(hint):
        options = [option for option in typing.get_args(hint) if option is not NONE]
        if value is None:
            if NONE in typing.get_args(hint):
                return None
            raise ConfigRecordError(f"{key!r}: expected {hint}, got None")
        if len(options) != 1:
            raise ConfigRecordError(f"{key!r}: cannot read a value of type {hint}")
        return _decode(value, options[0], key, default)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if not any(type(value) is type(choice) and value == choice for choice in choices):
            raise ConfigRecordError(f"{key!r}: expected one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigRecordError(f"{key!r}: expected a list, got {type(value).__name__}")
        return tuple(_decode(element, item, f"{key}[{index}]", None) for index, element in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, base=default if _is_config(default) else None, path=key)
    if hint in SCALARS:
        return _scalar(value, hint, key)
    raise ConfigRecordError(f"{key!r}: cannot read a value of type {hint}")


def _scalar(value: Any, hint: type, key: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigRecordError(f"{key!r}: expected {SCALARS[hint]}, got {type(value).__name__}")
    return value
