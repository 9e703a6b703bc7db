"""The one parser for JSON from elsewhere: every hostile input the standard parser chokes on (it
raises RecursionError, a bare ValueError, UnicodeDecodeError, or returns infinity) is a
:class:`JSONRefused` here, and well-formed JSON parses as before."""

from __future__ import annotations

import json
import math

import pytest

from offsite.protocol.safe_json import MAX_DEPTH, MAX_INT_DIGITS, JSONRefused, check_depth, parse_json

# (input, what the refusal says): each is something a hostile sender can write in a few KiB
BOMBS = [
    (b"[" * 1500, "nested deeper"),
    (b"[" * 100_000, "nested deeper"),
    (b'{"a":' * 5000, "nested deeper"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested deeper than 64"),  # parses in json, too deep to keep
    (b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "nested deeper than 64"),
    (b"1" * 5000, "digits"),
    (b'{"n": -' + b"9" * 5000 + b"}", "digits"),
    (b"[" + b"7" * (MAX_INT_DIGITS + 1) + b"]", "digits"),
    (b'{"x": 1e999}', "not finite"),
    (b'{"x": -1e400}', "not finite"),
    (b"[NaN]", "non-finite"),
    (b'{"x": Infinity}', "non-finite"),
    (b'{"a": 1, "a": 2}', "duplicate keys"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"a": "\xc3"}', "not UTF-8"),
    (b"", "Expecting value"),
    (b'{"a": ', "Expecting value"),
]


@pytest.mark.parametrize(("data", "says"), BOMBS)
def test_every_hostile_input_is_a_refusal_never_another_exception(data, says):
    with pytest.raises(JSONRefused, match=says):
        parse_json(data)
    with pytest.raises(JSONRefused, match=says):  # a memoryview of a bytearray too
        parse_json(memoryview(bytearray(data)))


def test_the_standard_parser_really_chokes_on_them():
    """Why the helper exists: json.loads raises what callers catching JSONDecodeError miss."""
    with pytest.raises(RecursionError):
        json.loads(b"[" * 1500)
    with pytest.raises(ValueError, match="4300") as caught:
        json.loads(b"1" * 5000)
    assert not isinstance(caught.value, json.JSONDecodeError)
    assert math.isinf(json.loads(b"1e999"))


def test_well_formed_json_parses_as_before():
    values = [{"a": [1, 2.5, None, True, "x"], "b": {"c": []}}, [], {}, 0, -3, "s", 1.0e300, 10**63]
    for value in values:
        assert parse_json(json.dumps(value).encode()) == value
    nested = [[[[[]]]]]
    assert parse_json(json.dumps(nested)) == nested
    assert parse_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) == json.loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)


def test_integers_only_and_non_finite_options():
    with pytest.raises(JSONRefused, match="non-integer number 1.5"):
        parse_json(b'{"a": 1.5}', integers_only=True)
    with pytest.raises(JSONRefused, match="non-integer"):
        parse_json(b"[1e3]", integers_only=True)
    assert parse_json(b'{"a": 12}', integers_only=True) == {"a": 12}
    loss = parse_json(b'{"loss": NaN, "big": 1e999}', finite=False)
    assert math.isnan(loss["loss"]) and math.isinf(loss["big"])
    with pytest.raises(JSONRefused, match="digits"):  # even then, no huge integers
        parse_json(b"9" * 5000, finite=False)


def test_depth_is_checked_without_recursion():
    deep: list = []
    for _ in range(100_000):  # built by hand: no parser could have produced it
        deep = [deep]
    with pytest.raises(JSONRefused, match="nested deeper than 64"):
        check_depth(deep)
    check_depth({"a": [{"b": [1]}]}, max_depth=4)
    with pytest.raises(JSONRefused):
        check_depth({"a": [{"b": [1]}]}, max_depth=3)
