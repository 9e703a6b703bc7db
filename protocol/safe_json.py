"""The one JSON parser for bytes that came from elsewhere: envelope headers, safetensors headers
and metadata, secure-aggregation messages, bundle manifests and signatures, key files,
registries, a data owner's JSONL rows.

Python's :func:`json.loads` raises more than :class:`json.JSONDecodeError` on hostile input: a
:class:`RecursionError` for deep nesting (1,000 ``[`` are enough, well inside a 4 KiB header),
a plain :class:`ValueError` for an integer literal over ``sys.get_int_max_str_digits()`` digits,
:class:`UnicodeDecodeError` for bytes that are not UTF-8, and it turns ``1e999`` into infinity.
:func:`parse_json` turns every one of these into :class:`JSONRefused` (a ``ValueError``: callers
map it to their own refusal and reason), and refuses what no sender of ours writes:

- nesting deeper than ``max_depth`` (checked after parsing too, so a value that parsed near the
  recursion limit cannot make a later ``json.dumps`` or ``repr`` of it raise);
- an integer of more than :data:`MAX_INT_DIGITS` digits (whatever the interpreter's own limit);
- NaN, Infinity, a float that overflows to infinity (unless ``finite=False``), and with
  ``integers_only`` any fraction or exponent;
- duplicate keys in an object (two parsers could disagree on which one counts).
"""

from __future__ import annotations

import json
import math

MAX_DEPTH = 64
MAX_INT_DIGITS = 64


class JSONRefused(ValueError):
    """Bytes that are not acceptable JSON; the message says why (the caller says where)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        keys = [key for key, _ in pairs]
        raise JSONRefused(f"duplicate keys {sorted({k[:40] for k in keys if keys.count(k) > 1})[:5]}")
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONRefused(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRefused(f"number {text[:40]} is not finite as a float")
    return value


def _no_float(text: str) -> float:
    raise JSONRefused(f"non-integer number {text[:40]}")


def _no_constant(name: str) -> None:
    raise JSONRefused(f"non-finite number {name}")


def check_depth(value: object, max_depth: int = MAX_DEPTH) -> None:
    """:class:`JSONRefused` if ``value`` nests lists and objects deeper than ``max_depth`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > max_depth:
            raise JSONRefused(f"nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def parse_json(
    data: bytes | bytearray | memoryview | str,
    *,
    integers_only: bool = False,
    finite: bool = True,
    max_depth: int = MAX_DEPTH,
) -> object:
    """The value ``data`` (UTF-8 JSON) holds, or :class:`JSONRefused` saying why not; never another exception.

    ``finite=False`` lets NaN, Infinity and overflowing floats through (a file of our own, e.g. an
    update's metadata, may record a diverged loss); ``integers_only`` refuses every float."""
    floats = _no_float if integers_only else _finite_float if finite else float
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_int=_integer,
            parse_float=floats,
            parse_constant=_no_constant if finite or integers_only else None,
        )
        if isinstance(value, (dict, list)):
            check_depth(value, max_depth)
        return value
    except JSONRefused:
        raise
    except RecursionError:
        raise JSONRefused(f"nested deeper than the parser can follow (at most {max_depth} levels)") from None
    except UnicodeDecodeError as error:
        raise JSONRefused(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    except (ValueError, TypeError) as error:  # JSONDecodeError, int() limits, a non-bytes argument
        raise JSONRefused(str(error)[:200]) from None
