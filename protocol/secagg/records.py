"""Secure-aggregation messages in Flower records (:func:`to_content` / :func:`from_content`) and a
masked input as a tensor, the form an update envelope seals (:func:`masked_input_tensors`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from .config import SecAggConfig
from .errors import SecAggError
from .messages import MESSAGES, M, MaskedInput
from .ring import ring_dtype

if TYPE_CHECKING:  # torch is imported where tensors are handled: the key-exchange stages never need it
    import torch

SECAGG = "secagg"  # ConfigRecord {"kind": str, "body": bytes}
SECAGG_VECTOR = "secagg-vector"  # ArrayRecord {"masked": Array} (MaskedInput only)
MASKED_TENSOR = "masked"  # a MaskedInput's vector as a tensor (to seal it in an update envelope)


def masked_input_tensors(masked: MaskedInput) -> dict[str, torch.Tensor]:
    """``{"masked": int64 (or int32) tensor}``: the ring elements reinterpreted as signed
    integers (same bits), the form an update envelope carries (safetensors has no uint64)."""
    import torch

    signed = np.int64 if masked.vector.dtype.itemsize == 8 else np.int32
    return {MASKED_TENSOR: torch.from_numpy(np.ascontiguousarray(masked.vector).view(signed).copy())}


def masked_input_reference(config: SecAggConfig) -> dict[str, torch.Tensor]:
    """What :func:`masked_input_tensors` must look like for ``config`` (keys, shape, dtype): the
    reference an envelope opener checks a sealed masked input against."""
    import torch

    return {MASKED_TENSOR: torch.zeros(config.dimension + 1, dtype=torch.int64 if config.bits == 64 else torch.int32)}


def masked_input_from_tensors(session: bytes, node: int, tensors: Mapping[str, torch.Tensor], bits: int) -> MaskedInput:
    """Inverse of :func:`masked_input_tensors` (the tensors already checked against
    :func:`masked_input_reference`)."""
    if set(tensors) != {MASKED_TENSOR}:
        raise SecAggError(
            f"masked input of node {node}: expected the one tensor {MASKED_TENSOR!r}, got {sorted(tensors)[:3]}"
        )
    values = tensors[MASKED_TENSOR].detach().to("cpu").numpy()
    dtype = ring_dtype(bits)
    if values.ndim != 1 or values.dtype.itemsize != dtype.itemsize or values.dtype.kind != "i":
        raise SecAggError(
            f"masked input of node {node}: {values.dtype}{values.shape} is not a vector of {bits}-bit integers"
        )
    return MaskedInput(session, node, np.ascontiguousarray(values).view(dtype).copy())


def to_content(message: object):
    """A stage message as a Flower ``RecordDict``: ``{"secagg": ConfigRecord{"kind", "body"}}``,
    plus ``{"secagg-vector": ArrayRecord{"masked": uint array}}`` for a :class:`MaskedInput`
    (whose ``body`` is then only its JSON header)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    if type(message) not in MESSAGES.values():
        raise SecAggError(f"not a secure-aggregation message: {type(message).__name__}")
    if isinstance(message, MaskedInput):
        vector = ArrayRecord({"masked": Array.from_numpy_ndarray(np.ascontiguousarray(message.vector))})
        header = ConfigRecord({"kind": message.KIND, "body": message.header()})
        return RecordDict({SECAGG: header, SECAGG_VECTOR: vector})
    return RecordDict({SECAGG: ConfigRecord({"kind": message.KIND, "body": message.to_bytes()})})


def from_content(content, expected: type[M]) -> M:
    """Inverse of :func:`to_content`; :class:`SecAggError` unless it holds an ``expected``."""
    if SECAGG not in content.config_records:
        raise SecAggError(f"message lacks the {SECAGG!r} config record")
    record = content.config_records[SECAGG]
    kind, body = record.get("kind"), record.get("body")
    if kind != expected.KIND or not isinstance(body, bytes):
        raise SecAggError(f"expected a {expected.KIND!r} message, got {kind!r}")
    if expected is not MaskedInput:
        return expected.from_bytes(body)
    session, node, dtype, length = MaskedInput._parse_header(body)
    array = content.array_records[SECAGG_VECTOR].get("masked") if SECAGG_VECTOR in content.array_records else None
    if array is None or array.stype != "numpy.ndarray" or array.dtype != dtype.name or tuple(array.shape) != (length,):
        raise SecAggError(
            f"masked input of node {node}: the {SECAGG_VECTOR!r} array is not {length} {dtype.name} values"
        )
    try:
        vector = array.numpy()  # np.load(allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - np.load on received bytes: whatever it raises, the array is unreadable
        raise SecAggError(
            f"masked input of node {node}: unreadable array ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    if vector.dtype != dtype or vector.shape != (length,):
        raise SecAggError(
            f"masked input of node {node}: payload is {vector.dtype}{vector.shape}, header says {dtype.name}({length},)"
        )
    return MaskedInput(session, node, np.ascontiguousarray(vector, dtype=dtype))
