"""Rounded weights packed in a bundle: codes, bit for bit, instead of one float per weight.

A quantised emulator's kept middle holds, per group of input columns, at most ``2**bits`` distinct
values ``code * scale + low`` (:mod:`offsite.emulator.quantize`). Shipping those as floats costs 32
bits a weight; packed, a weight costs its ``bits`` plus its share of the group's float scale and
offset. For each packed parameter ``NAME`` (out x in, or in x out when ``transposed``) the weights
file holds, in place of ``NAME`` itself:

- ``NAME.qcodes``: uint8, the codes in row-major (out, in) order, ``bits`` bits each, least
  significant bit first, the last byte zero-padded;
- ``NAME.qscale``, ``NAME.qlow``: (out, in / group), the weight's float dtype.

The manifest's ``packed`` entry (signed with the rest) says which parameters are packed and how::

    {"scheme": "minmax-groups/1",
     "weights": {NAME: {"bits": 3, "group": 16, "shape": [out, in], "transposed": false}}}

Unpacking computes ``codes * scale + low`` in the scale's dtype, the operations the quantiser
used, so the floats are the ones the operator evaluated, bit for bit; packing checks that before
it writes anything.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

SCHEME = "minmax-groups/1"
CODES, SCALE, LOW = ".qcodes", ".qscale", ".qlow"


class RoundedWeight(Protocol):
    """What the quantiser hands over per weight (:class:`offsite.emulator.quantize.Rounded`)."""

    codes: torch.Tensor  # uint8 (out, groups, group)
    scale: torch.Tensor  # (out, groups, 1)
    low: torch.Tensor
    bits: int
    transposed: bool


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (each < 2**bits; any shape, read row-major) -> bytes, ``bits`` bits per code."""
    if codes.dtype != torch.uint8 or not 1 <= bits <= 8:
        raise ValueError(f"pack_codes needs uint8 codes and 1-8 bits, got {codes.dtype} and {bits}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise ValueError(f"a code of {int(flat.max())} does not fit in {bits} bits")
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
    return (stream.reshape(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` codes of ``bits`` bits each that :func:`pack_codes` wrote, as uint8 (1-D).
    A code starts at bit ``i * bits`` and spans at most two bytes (bits <= 8, offset <= 7)."""
    start = torch.arange(count, dtype=torch.int64) * bits
    byte, shift = start >> 3, (start & 7).to(torch.int32)
    data = torch.cat([packed.reshape(-1), packed.new_zeros(1)]).to(torch.int32)
    word = data[byte] | (data[byte + 1] << 8)
    return ((word >> shift) & ((1 << bits) - 1)).to(torch.uint8)


def packed_bytes(shape: tuple[int, int], bits: int) -> int:
    return math.ceil(shape[0] * shape[1] * bits / 8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(out, groups, group) codes with (out, groups, 1) scales and offsets -> the (out, in) floats."""
    return (codes.to(scale.dtype) * scale + low).reshape(codes.shape[0], -1)


def pack_state(tensors: dict[str, torch.Tensor], rounded: dict[str, RoundedWeight]) -> tuple[dict[str, torch.Tensor], dict]:
    """``tensors`` (a weights file's contents) with every rounded parameter replaced by its packed
    form, and the manifest's ``packed`` entry. Refuses (ValueError) a parameter that is absent, or
    whose floats are not exactly what its codes give back: the bundle must be the model as it was
    rounded, not a near copy."""
    out = dict(tensors)
    entries = {}
    for name, weight in sorted(rounded.items()):
        if name not in out:
            raise ValueError(f"packing {name}: not among the weights being written")
        floats = out.pop(name)
        rebuilt = dequantize(weight.codes, weight.scale, weight.low)
        if weight.transposed:
            rebuilt = rebuilt.t()
        if rebuilt.shape != floats.shape or rebuilt.dtype != floats.dtype or not torch.equal(rebuilt, floats):
            raise ValueError(f"packing {name}: its codes do not give back its weights exactly "
                             "(changed after rounding?); refusing to ship a near copy")
        out[name + CODES] = pack_codes(weight.codes, weight.bits)
        out[name + SCALE] = weight.scale.squeeze(-1).contiguous()
        out[name + LOW] = weight.low.squeeze(-1).contiguous()
        entries[name] = {"bits": weight.bits, "group": weight.codes.shape[-1], "shape": list(floats.shape),
                         "transposed": weight.transposed}
    return out, {"scheme": SCHEME, "weights": entries}


def unpack_state(tensors: dict[str, torch.Tensor], packed: object, where: str,
                 error: Callable[[str], Exception] = ValueError) -> dict[str, torch.Tensor]:
    """The weights file's contents with every packed parameter rebuilt as floats; every entry of
    the manifest's ``packed`` and every packed tensor is checked first, and ``error(message)``
    names the file and parameter of whatever does not fit."""
    if not isinstance(packed, dict) or packed.get("scheme") != SCHEME or not isinstance(packed.get("weights"), dict):
        raise error(f"{where}: 'packed' must be {{'scheme': {SCHEME!r}, 'weights': {{...}}}}")
    out = dict(tensors)
    for name, entry in packed["weights"].items():
        here = f"{where}: packed weight {name!r}"
        if not isinstance(entry, dict):
            raise error(f"{here}: its entry must be an object")
        bits, group, shape, transposed = entry.get("bits"), entry.get("group"), entry.get("shape"), entry.get("transposed")
        if not _int(bits) or not 1 <= bits <= 8 or not _int(group) or group < 1 or not isinstance(transposed, bool):
            raise error(f"{here}: needs 'bits' 1-8, 'group' >= 1 and 'transposed' true or false")
        if not isinstance(shape, list) or len(shape) != 2 or not all(_int(n) and n > 0 for n in shape):
            raise error(f"{here}: 'shape' must be two positive integers")
        rows, cols = reversed(shape) if transposed else shape  # the (out, in) orientation it was rounded in
        if cols % group:
            raise error(f"{here}: group {group} does not divide its {cols} input columns")
        if name in out:
            raise error(f"{here}: the file holds it both packed and as floats")
        try:
            codes, scale, low = (out.pop(name + suffix) for suffix in (CODES, SCALE, LOW))
        except KeyError as missing:
            raise error(f"{here}: the file lacks {missing.args[0]!r}") from None
        if codes.dtype != torch.uint8 or codes.shape != (packed_bytes((rows, cols), bits),):
            raise error(f"{here}: codes must be {packed_bytes((rows, cols), bits)} uint8 bytes, "
                        f"got {codes.dtype} {tuple(codes.shape)}")
        if not scale.is_floating_point() or scale.dtype != low.dtype or scale.shape != (rows, cols // group) or low.shape != scale.shape:
            raise error(f"{here}: scale and low must be floats of one dtype, shape {(rows, cols // group)}; "
                        f"got {scale.dtype} {tuple(scale.shape)} and {low.dtype} {tuple(low.shape)}")
        grouped = unpack_codes(codes, bits, rows * cols).reshape(rows, cols // group, group)
        weight = dequantize(grouped, scale.unsqueeze(-1), low.unsqueeze(-1))
        out[name] = weight.t().contiguous() if transposed else weight
    stray = sorted(key for key in out if key.endswith((CODES, SCALE, LOW)))
    if stray:
        raise error(f"{where}: packed tensors that the manifest does not list: {stray[:5]}")
    return out


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
