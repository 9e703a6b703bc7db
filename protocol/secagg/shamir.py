"""Shamir secret sharing over the prime field ``GF(2**521 - 1)``: a secret of up to 65 bytes
(here a 32-byte X25519 private key or self-mask seed) split ``t``-of-``n`` and recombined by
Lagrange interpolation at 0."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import SecAggError

RandomBytes = Callable[[int], bytes]

PRIME = 2**521 - 1  # Mersenne prime: the Shamir field; holds any 32-byte secret
SHARE_BYTES = 4 + 66  # x (uint32) + y (66 bytes, big-endian)
KEY_BYTES = 32
MAX_SUBSETS = 2_000  # t-subsets tried when a reconstruction fails its check


@dataclass(frozen=True)
class Share:
    """One Shamir share: the point ``(x, y)`` of the sharing polynomial, ``1 <= x``, ``y < p``."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return struct.pack(">I", self.x) + self.y.to_bytes(66, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise SecAggError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x, y = struct.unpack(">I", data[:4])[0], int.from_bytes(data[4:], "big")
        if x < 1 or y >= PRIME:
            raise SecAggError(f"share ({x}, ...) is outside the field")
        return cls(x, y)


def _field_element(random_bytes: RandomBytes) -> int:
    while True:  # rejection sampling: uniform on [0, p), p = 2**521 - 1
        value = int.from_bytes(random_bytes(66), "big") & PRIME
        if value < PRIME:
            return value


def shamir_split(
    secret: bytes, threshold: int, xs: Sequence[int], random_bytes: RandomBytes = os.urandom
) -> list[Share]:
    """Shares of ``secret`` (at most 65 bytes) at the points ``xs``: any ``threshold`` of them
    determine it, fewer reveal nothing (the polynomial has ``threshold - 1`` uniform coefficients)."""
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 1 <= x < 2**32 for x in xs):
        raise SecAggError(f"share points {list(xs)[:5]} must be distinct integers in [1, 2**32)")
    if len(secret) > 65:
        raise SecAggError(f"a secret is at most 65 bytes, got {len(secret)}")
    coefficients = [int.from_bytes(secret, "big")] + [_field_element(random_bytes) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares.append(Share(x, y))
    return shares


def shamir_combine(shares: Sequence[Share], threshold: int, length: int = KEY_BYTES) -> bytes:
    """The secret (``length`` bytes) from at least ``threshold`` shares (Lagrange interpolation at
    0 over the first ``threshold``); fewer raise :class:`SecAggError`."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} share(s) cannot reconstruct a {threshold}-of-n secret")
    points = list(shares)[:threshold]
    xs = [share.x for share in points]
    if len(set(xs)) != len(xs):
        raise SecAggError(f"duplicate share points {sorted(xs)}")
    secret = 0
    for j, share in enumerate(points):
        numerator, denominator = 1, 1
        for m, other in enumerate(xs):
            if m != j:
                numerator = numerator * other % PRIME
                denominator = denominator * (other - share.x) % PRIME
        secret = (secret + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise SecAggError(f"the shares interpolate to a value wider than {length} bytes (corrupt shares)")
    return secret.to_bytes(length, "big")
