"""State dicts <-> Flower ``ArrayRecord``: the symmetric pair ``state_to_record`` /
``state_from_record`` (config dataclasses <-> ``ConfigRecord``: :mod:`offsite.protocol.config_record`,
torch-free).

Flower's own ``ArrayRecord.from_torch_state_dict`` goes through ``tensor.numpy()``, which has no
bfloat16. So:

- dtypes NumPy knows (float64/32/16, ints, bool) travel as Flower's standard ``Array`` with
  ``stype="numpy.ndarray"`` (``np.save`` bytes, ``allow_pickle=False``); any Flower tooling can
  read them;
- bfloat16 travels as ``Array(dtype="bfloat16", stype="offsite.raw-le", data=<little-endian
  2-byte words>)``: the raw bits, exact, read back only by :func:`state_from_record`.

Nothing is ever pickled; decoding checks that each array's bytes match its declared dtype and
shape, and names the key when they do not.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"
RAW_STYPE = "offsite.raw-le"

# torch dtypes that travel as raw little-endian words: name -> (torch dtype, same-width integer view)
RAW_DTYPES: dict[str, tuple[torch.dtype, str]] = {"bfloat16": (torch.bfloat16, "<i2")}
_RAW_BY_TORCH = {dtype: (name, view) for name, (dtype, view) in RAW_DTYPES.items()}
# NumPy dtypes accepted on decode (object/str arrays can never appear: they need pickle)
NUMPY_KINDS = "fiub"  # float, signed int, unsigned int, bool


class RecordError(ValueError):
    """An ArrayRecord does not decode into a state dict; the message names the tensor key."""


def tensor_to_array(tensor: torch.Tensor) -> Array:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype in _RAW_BY_TORCH:
        name, view = _RAW_BY_TORCH[tensor.dtype]
        words = tensor.view(torch.int16 if view == "<i2" else tensor.dtype).numpy().astype(view, copy=False)
        return Array(dtype=name, shape=tuple(tensor.shape), stype=RAW_STYPE, data=words.tobytes())
    return Array.from_numpy_ndarray(tensor.numpy())


def tensor_from_array(key: str, array: Array) -> torch.Tensor:
    shape = tuple(int(d) for d in array.shape)
    if array.stype == RAW_STYPE:
        if array.dtype not in RAW_DTYPES:
            raise RecordError(f"tensor {key!r}: raw dtype {array.dtype!r} is not one of {sorted(RAW_DTYPES)}")
        dtype, view = RAW_DTYPES[array.dtype]
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(view).itemsize
        if len(array.data) != expected:
            raise RecordError(
                f"tensor {key!r}: {len(array.data)} bytes for shape {shape} of {array.dtype} (expected {expected})"
            )
        words = np.frombuffer(array.data, dtype=view).astype(np.int16).reshape(shape)
        return torch.from_numpy(words.copy()).view(dtype)
    if array.stype != NUMPY_STYPE:
        raise RecordError(f"tensor {key!r}: unknown serialisation {array.stype!r}")
    try:
        values = array.numpy()  # np.load(allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - np.load on received bytes: whatever it raises, the payload is bad
        detail = f"{type(error).__name__}: {str(error)[:200]}"
        raise RecordError(f"tensor {key!r}: not a readable .npy payload ({detail})") from None
    if values.dtype.kind not in NUMPY_KINDS:
        raise RecordError(f"tensor {key!r}: dtype {values.dtype} is not a numeric dtype")
    if tuple(values.shape) != shape or str(values.dtype) != array.dtype:
        raise RecordError(
            f"tensor {key!r}: payload is {values.dtype}{tuple(values.shape)}, header says {array.dtype}{shape}"
        )
    return torch.from_numpy(np.array(values, copy=True, order="C"))  # (ascontiguousarray would make 0-dim 1-dim)


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Encode a state dict (any device, any of float64/32/16, bfloat16, int, bool) as an ArrayRecord."""
    record = ArrayRecord()
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise RecordError(f"tensor {key!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        record[key] = tensor_to_array(tensor)
    return record


def state_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode an ArrayRecord written by :func:`state_to_record` (or by Flower's
    ``from_torch_state_dict``) into CPU tensors, in the record's key order."""
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"expected an ArrayRecord, got {type(record).__name__}")
    return {key: tensor_from_array(key, array) for key, array in record.items()}
