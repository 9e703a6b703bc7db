"""An update envelope inside a Flower message: a ``uint8`` ``ArrayRecord`` in parts.

The envelope is opaque ciphertext to Flower; it travels as ``part-0`` ... ``part-{n-1}``, 1-d
``uint8`` arrays of at most ``part_bytes`` each (one gRPC message must not carry a whole 1 GB
envelope in one array). :func:`envelope_from_record` checks every part's declared type and
shape, and the total against the job's limit, before it decodes or joins anything.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from .envelope import Reason, Rejected, log

ENVELOPE = "envelope"  # the record key in the reply's RecordDict
DEFAULT_PART_BYTES = 64 << 20


def envelope_to_record(envelope: bytes, part_bytes: int = DEFAULT_PART_BYTES) -> ArrayRecord:
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be >= 1, got {part_bytes}")
    view = memoryview(envelope).cast("B")
    record = ArrayRecord()
    for number, start in enumerate(range(0, max(len(view), 1), part_bytes)):
        record[f"part-{number}"] = Array(np.frombuffer(view[start : start + part_bytes], dtype=np.uint8))
    return record


def envelope_from_record(record: ArrayRecord, max_bytes: int, node: int | str | None = None) -> bytes:
    """The envelope's bytes; :class:`Rejected` (MALFORMED_FRAME / OVERSIZED) naming ``node`` otherwise.

    ``max_bytes``: the job's envelope limit, e.g. ``max_envelope_bytes(opener.max_payload_bytes)``.
    """
    where = f"node {node}" if node is not None else "unknown node"

    def refuse(reason: Reason, message: str) -> Rejected:
        log.warning("rejected update from %s: %s: %s", where, reason.value, message)
        return Rejected(reason, f"update from {where}: {message}")

    if not isinstance(record, ArrayRecord):
        raise refuse(Reason.MALFORMED_FRAME, f"expected an ArrayRecord, got {type(record).__name__}")
    names = [f"part-{number}" for number in range(len(record))]
    if sorted(record.keys()) != sorted(names):
        raise refuse(
            Reason.MALFORMED_FRAME,
            f"envelope record keys {sorted(record.keys())[:5]} are not part-0..part-{len(record) - 1}",
        )
    total = 0
    for name in names:
        array = record[name]
        if array.stype != "numpy.ndarray" or array.dtype != "uint8" or len(array.shape) != 1:
            raise refuse(Reason.MALFORMED_FRAME, f"envelope {name} is not a 1-d uint8 array")
        total += int(array.shape[0])
        if total > max_bytes:
            raise refuse(Reason.OVERSIZED, f"envelope of more than {max_bytes} bytes (the job's limit)")
    parts = []
    for name in names:
        try:
            values = record[name].numpy()  # np.load(allow_pickle=False)
        except Exception as error:  # noqa: BLE001 - np.load on hostile bytes: whatever it raises, the part is malformed
            raise refuse(
                Reason.MALFORMED_FRAME, f"envelope {name} does not decode ({type(error).__name__}: {str(error)[:200]})"
            ) from None
        if values.dtype != np.uint8 or values.ndim != 1 or values.shape != tuple(record[name].shape):
            raise refuse(
                Reason.MALFORMED_FRAME, f"envelope {name} is {values.dtype}{values.shape}, not what it declares"
            )
        parts.append(values.tobytes())
    return b"".join(parts)
