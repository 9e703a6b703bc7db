"""The JSON encoding shared by every secure-aggregation message: limits, base64 fields, node ids
and ``[node, data]`` pairs, and the strict decoder (:func:`~offsite.protocol.safe_json.parse_json`,
the only parser used on received bytes)."""

from __future__ import annotations

import base64
import json

from ..safe_json import JSONRefused, parse_json
from .errors import SecAggError

MAX_NODES = 10_000
MAX_DIMENSION = 1 << 34
MAX_NODE_ID = 2**64 - 1
MAX_HEADER_BYTES = 64 << 20


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: object, what: str, length: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise SecAggError(f"{what}: expected base64 text, got {type(value).__name__}")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise SecAggError(f"{what}: not base64") from None
    if length is not None and len(data) != length:
        raise SecAggError(f"{what}: expected {length} bytes, got {len(data)}")
    return data


def exact_fields(value: object, what: str, names: set[str] | frozenset[str]) -> dict:
    if not isinstance(value, dict) or set(value) != names:
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise SecAggError(f"{what}: expected fields {sorted(names)}, got {got}")
    return value


def node_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NODE_ID:
        raise SecAggError(f"{what}: {value!r} is not a node id")
    return value


def node_ids(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NODES:
        raise SecAggError(f"{what}: expected a list of at most {MAX_NODES} node ids")
    nodes = tuple(node_id(item, what) for item in value)
    if list(nodes) != sorted(set(nodes)):
        raise SecAggError(f"{what}: node ids must be sorted and distinct")
    return nodes


def node_pairs(value: object, what: str, length: int) -> tuple[tuple[int, bytes], ...]:
    """``[[node, base64], ...]`` sorted by distinct node -> ``((node, bytes), ...)``."""
    if not isinstance(value, list) or len(value) > MAX_NODES:
        raise SecAggError(f"{what}: expected a list of at most {MAX_NODES} [node, data] pairs")
    pairs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise SecAggError(f"{what}: expected [node, data] pairs")
        node = node_id(item[0], what)
        pairs.append((node, unb64(item[1], f"{what} of node {node}", length)))
    nodes = [node for node, _ in pairs]
    if nodes != sorted(set(nodes)):
        raise SecAggError(f"{what}: nodes must be sorted and distinct")
    return tuple(pairs)


def encode_message(kind: str, body: dict) -> bytes:
    return json.dumps({"kind": kind, **body}, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_message(data: bytes, kind: str, names: set[str]) -> dict:
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_HEADER_BYTES:
        raise SecAggError(f"{kind}: expected at most {MAX_HEADER_BYTES} bytes")
    try:
        value = parse_json(data)
    except JSONRefused as error:
        raise SecAggError(f"{kind}: not a JSON message ({error})") from None
    if not isinstance(value, dict) or value.get("kind") != kind:
        got = value.get("kind") if isinstance(value, dict) else type(value).__name__
        raise SecAggError(f"expected a {kind!r} message, got {got!r}")
    del value["kind"]
    return exact_fields(value, kind, names)
