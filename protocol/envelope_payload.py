"""Update envelopes, the payload: an update's tensors as safetensors bytes, with a small JSON
object of metadata under ``"offsite"``, and the strict reading of a received payload's
safetensors header (dtypes, shapes, metadata) before any tensor is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import save

from .envelope_frame import SealError, canonical_json, strict_json_loads

MAX_META_BYTES = 64 << 10
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20
META_KEY = "offsite"

# torch dtype <-> safetensors dtype name
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def encode_payload(tensors: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> bytes:
    """Safetensors bytes of ``tensors`` (moved to CPU, contiguous) with ``metadata`` as JSON under ``"offsite"``."""
    plain = {}
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise SealError(f"update entry {key!r}: expected str -> torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise SealError(f"tensor {key!r}: dtype {tensor.dtype} cannot travel in an envelope")
        plain[key] = tensor.detach().to("cpu").contiguous()
    meta = None
    if metadata is not None:
        try:
            text = canonical_json(dict(metadata)).decode()
        except (TypeError, ValueError) as error:
            raise SealError(f"update metadata is not finite JSON: {error}") from None
        if len(text) > MAX_META_BYTES:
            raise SealError(f"update metadata is {len(text)} bytes, over {MAX_META_BYTES}")
        meta = {META_KEY: text}
    return save(plain, metadata=meta)


def read_safetensors_index(plaintext: bytes) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """Each tensor's (dtype name, shape) and the ``offsite`` metadata, from the safetensors header
    only (nothing is materialised); ValueError saying what is wrong."""

    def bad(reason: str) -> ValueError:
        return ValueError(f"payload {reason}")

    if len(plaintext) < 8:
        raise bad("is shorter than a safetensors header")
    length = int.from_bytes(plaintext[:8], "little")
    if length > MAX_SAFETENSORS_HEADER_BYTES or 8 + length > len(plaintext):
        raise bad(f"safetensors header length {length} does not fit")
    try:
        header = strict_json_loads(plaintext[8 : 8 + length])
    except (ValueError, UnicodeDecodeError) as error:
        raise bad(f"safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise bad("safetensors header is not an object")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or set(raw_meta) - {META_KEY}:
        raise bad(f"metadata must hold only {META_KEY!r}")
    meta = {}
    if META_KEY in raw_meta:
        text = raw_meta[META_KEY]
        if not isinstance(text, str) or len(text) > MAX_META_BYTES:
            raise bad(f"metadata {META_KEY!r} is not a string of at most {MAX_META_BYTES} bytes")
        try:
            meta = strict_json_loads(text.encode(), allow_floats=True)
        except (ValueError, UnicodeDecodeError) as error:
            raise bad(f"metadata is not valid JSON ({error})") from None
        if not isinstance(meta, dict):
            raise bad("metadata is not a JSON object")
    index = {}
    for key, entry in header.items():
        typed = isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
        if not typed or not isinstance(entry.get("shape"), list):
            raise bad(f"entry {key[:80]!r} lacks a dtype or shape")
        shape = entry["shape"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise bad(f"tensor {key[:80]!r} has shape {str(shape)[:80]}")
        index[key] = (entry["dtype"], tuple(shape))
    return index, meta
