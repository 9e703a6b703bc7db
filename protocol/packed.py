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

The same form carries weights that already lie on such a grid without our rounding them: a model
converted from GGUF holds its blocks' ``d * q + m`` (Q4_1) and ``d * q`` (Q8_0) values as floats,
so the adapter shells and the embeddings a bundle ships take at most 16 or 255 levels per group
of 32. :func:`find_grid` recovers their codes, scales and offsets (or says there are none:
trained and random weights), and a bundle packs them the same way, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass
class Grid:
    """A weight found on a grid by :func:`find_grid` (the :class:`RoundedWeight` fields)."""

    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    bits: int
    transposed: bool = False


GGUF_GROUP = 32  # values per block in GGUF's Q4_1 and Q8_0


def find_grid(weight: torch.Tensor, group: int = GGUF_GROUP) -> Grid | None:
    """The codes, scales and offsets that give back ``weight`` (2-D, float) exactly, per group of
    ``group`` columns, when it lies on a grid of at most 16 or 255 levels a group; None when it
    does not.

    The grids tried are those of the GGUF blocks models are converted from: 16 levels from the
    group's minimum in steps of a half-precision float (Q4_1: ``d * q + m``, ``q`` 0-15), and 255
    from ``-127 d`` to ``127 d`` with ``d = max |w| / 127`` (Q8_0: ``d * q``). One is accepted
    only when every value is rebuilt bit for bit. Q4_0 (``d * (q - 8)``) is not among them: its
    zeros come out as -0.0 where ``d`` is negative, which ``code * scale + low`` cannot give back.
    """
    if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() == 0 or weight.shape[1] % group:
        return None
    weight = weight.detach()
    if not torch.isfinite(weight).all():
        return None
    for grid in _GRIDS:
        if _on_grid(weight[:8], grid, group) is not None:  # a few rows first: most weights fail here, cheaply
            if (found := _on_grid(weight, grid, group)) is not None:
                return found
    return None


def _q4_1(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    return ((high - low) / 15).to(torch.float16).to(grouped.dtype), low, 4


def _q8_0(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    d = grouped.abs().amax(-1, keepdim=True) / 127
    return d, d * torch.round(grouped.amin(-1, keepdim=True) / d.where(d != 0, 1.0)), 8


_GRIDS = (_q4_1, _q8_0)


def _on_grid(weight: torch.Tensor, grid: Callable, group: int) -> Grid | None:
    grouped = weight.reshape(weight.shape[0], -1, group)
    scale, low, bits = grid(grouped)
    codes = torch.round((grouped - low) / scale.where(scale != 0, 1.0))  # a zero step: every value is low, code 0
    if not torch.isfinite(scale).all() or codes.amin() < 0 or codes.amax() > (1 << bits) - 1:
        return None
    codes = codes.to(torch.uint8)
    if not same_bits(dequantize(codes, scale, low), weight):
        return None
    return Grid(codes, scale, low, bits)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two float tensors are equal bit for bit (``torch.equal`` takes -0.0 for 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def _frame(bits: int) -> tuple[int, int, torch.dtype]:
    """The smallest whole run of the stream, as (codes, bytes, an integer type that holds it):
    8 codes of 3 bits fill 3 bytes, 2 of 4 bits one."""
    codes = 8 // math.gcd(bits, 8)
    width = codes * bits // 8  # 1, 3, 5 or 7 bytes
    return codes, width, torch.int32 if width <= 3 else torch.int64


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (each < 2**bits; any shape, read row-major) -> bytes, ``bits`` bits per code,
    code ``i`` at bits ``i * bits`` onwards of the stream, least significant bit first."""
    if codes.dtype != torch.uint8 or not 1 <= bits <= 8:
        raise ValueError(f"pack_codes needs uint8 codes and 1-8 bits, got {codes.dtype} and {bits}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise ValueError(f"a code of {int(flat.max())} does not fit in {bits} bits")
    per, width, kind = _frame(bits)  # each run of `per` codes is one integer of `width` bytes
    runs = torch.nn.functional.pad(flat, (0, -flat.numel() % per)).reshape(-1, per).to(kind)
    word = runs[:, 0].clone()
    for k in range(1, per):
        word |= runs[:, k] << (k * bits)
    stream = torch.stack([(word >> (8 * j)) & 255 for j in range(width)], 1).to(torch.uint8).reshape(-1)
    return stream[: packed_bytes((1, flat.numel()), bits)]


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` codes of ``bits`` bits each that :func:`pack_codes` wrote, as uint8 (1-D)."""
    per, width, kind = _frame(bits)
    stream = torch.nn.functional.pad(packed.reshape(-1), (0, -packed.numel() % width)).reshape(-1, width).to(kind)
    word = stream[:, 0].clone()
    for j in range(1, width):
        word |= stream[:, j] << (8 * j)
    codes = torch.stack([(word >> (k * bits)) & ((1 << bits) - 1) for k in range(per)], 1)
    return codes.to(torch.uint8).reshape(-1)[:count]


def packed_bytes(shape: tuple[int, int], bits: int) -> int:
    return math.ceil(shape[0] * shape[1] * bits / 8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """(out, groups, group) codes with (out, groups, 1) scales and offsets -> the (out, in) floats."""
    return (codes.to(scale.dtype) * scale + low).reshape(codes.shape[0], -1)


def pack_state(
    tensors: dict[str, torch.Tensor], rounded: dict[str, RoundedWeight]
) -> tuple[dict[str, torch.Tensor], dict]:
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
        if not same_bits(rebuilt, floats):
            raise ValueError(
                f"packing {name}: its codes do not give back its weights exactly "
                "(changed after rounding?); refusing to ship a near copy"
            )
        out[name + CODES] = pack_codes(weight.codes, weight.bits)
        out[name + SCALE] = weight.scale.squeeze(-1).contiguous()
        out[name + LOW] = weight.low.squeeze(-1).contiguous()
        entries[name] = {
            "bits": weight.bits,
            "group": weight.codes.shape[-1],
            "shape": list(floats.shape),
            "transposed": weight.transposed,
        }
    return out, {"scheme": SCHEME, "weights": entries}


def unpack_state(
    tensors: dict[str, torch.Tensor], packed: object, where: str, error: Callable[[str], Exception] = ValueError
) -> dict[str, torch.Tensor]:
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
        bits, group, shape, transposed = (
            entry.get("bits"),
            entry.get("group"),
            entry.get("shape"),
            entry.get("transposed"),
        )
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
            raise error(
                f"{here}: codes must be {packed_bytes((rows, cols), bits)} uint8 bytes, "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        if (
            not scale.is_floating_point()
            or scale.dtype != low.dtype
            or scale.shape != (rows, cols // group)
            or low.shape != scale.shape
        ):
            raise error(
                f"{here}: scale and low must be floats of one dtype, shape {(rows, cols // group)}; "
                f"got {scale.dtype} {tuple(scale.shape)} and {low.dtype} {tuple(low.shape)}"
            )
        grouped = unpack_codes(codes, bits, rows * cols).reshape(rows, cols // group, group)
        weight = dequantize(grouped, scale.unsqueeze(-1), low.unsqueeze(-1))
        out[name] = weight.t().contiguous() if transposed else weight
    stray = sorted(key for key in out if key.endswith((CODES, SCALE, LOW)))
    if stray:
        raise error(f"{where}: packed tensors that the manifest does not list: {stray[:5]}")
    return out


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
