"""One session's parameters (:class:`SecAggConfig`), chosen by the coordinator and checked by
every client: session id, threshold, dimension, clip range, scale, weight bound, ring, rounding."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SecAggError
from .ring import ROUNDINGS, check_headroom, max_scale_bits, quantisation_error_bound, ring_dtype
from .wire import MAX_DIMENSION, MAX_NODES, b64, exact_fields, unb64


@dataclass(frozen=True)
class SecAggConfig:
    """One session's parameters, chosen by the coordinator and checked by every client.

    ``session``: 16..64 bytes binding every key, share and mask to one job and round (e.g.
    ``sha256(job id || round)``); ``threshold``: ``t``, the shares needed to reconstruct a
    secret (``t > n/2``); ``dimension``: ``d``, values in the flattened update; ``clip_range``:
    ``c``; ``scale_bits``: ``f``, the scale ``s = 2**f``; ``max_weight``: the largest integer
    weight a client may send; ``bits``: ``k``, the ring ``Z_{2^k}``; ``rounding``:
    ``stochastic`` or ``nearest``.
    """

    session: bytes
    threshold: int
    dimension: int
    clip_range: float
    scale_bits: int
    max_weight: int = 1 << 20
    bits: int = 64
    rounding: str = "stochastic"

    def __post_init__(self) -> None:
        if not isinstance(self.session, bytes) or not 16 <= len(self.session) <= 64:
            raise SecAggError(f"session must be 16 to 64 bytes, got {self.session!r}")
        for name in ("threshold", "dimension", "scale_bits", "max_weight", "bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SecAggError(f"config {name} must be an integer, got {value!r}")
        if not 2 <= self.threshold <= MAX_NODES:
            raise SecAggError(f"threshold must be in [2, {MAX_NODES}], got {self.threshold}")
        if not 1 <= self.dimension <= MAX_DIMENSION:
            raise SecAggError(f"dimension must be in [1, {MAX_DIMENSION}], got {self.dimension}")
        if not -1074 <= self.scale_bits <= 1000:
            raise SecAggError(f"scale bits out of range: {self.scale_bits}")
        if self.rounding not in ROUNDINGS:
            raise SecAggError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        ring_dtype(self.bits)
        max_scale_bits(self.bits, self.clip_range, self.max_weight, 1)  # validates clip_range, max_weight

    @classmethod
    def for_job(
        cls,
        session: bytes,
        dimension: int,
        num_clients: int,
        clip_range: float,
        *,
        max_weight: int = 1 << 20,
        bits: int = 64,
        threshold: int | None = None,
        rounding: str = "stochastic",
    ) -> SecAggConfig:
        """The finest scale that ``num_clients`` can use without overflow, and ``t = n//2 + 1`` unless given."""
        return cls(
            session=session,
            threshold=num_clients // 2 + 1 if threshold is None else threshold,
            dimension=dimension,
            clip_range=float(clip_range),
            scale_bits=max_scale_bits(bits, float(clip_range), max_weight, num_clients),
            max_weight=max_weight,
            bits=bits,
            rounding=rounding,
        )

    def check_nodes(self, num_nodes: int) -> None:
        """Raise unless ``num_nodes`` invited clients fit: ``n/2 < t <= n`` and the ring's headroom."""
        if not self.threshold <= num_nodes <= MAX_NODES:
            raise SecAggError(f"{num_nodes} node(s) for threshold {self.threshold}: need between t and {MAX_NODES}")
        if 2 * self.threshold <= num_nodes:
            raise SecAggError(f"threshold {self.threshold} must be more than half of the {num_nodes} nodes")
        check_headroom(self.bits, self.clip_range, self.scale_bits, self.max_weight, num_nodes)

    def error_bound(self, num_nodes: int) -> float:
        """:func:`quantisation_error_bound` for this config and ``num_nodes`` clients."""
        return quantisation_error_bound(
            self.clip_range,
            self.scale_bits,
            num_nodes,
            rounding=self.rounding,
            bits=self.bits,
            max_weight=self.max_weight,
        )

    def to_json(self) -> dict:
        return {
            "session": b64(self.session),
            "threshold": self.threshold,
            "dimension": self.dimension,
            "clip_range": self.clip_range,
            "scale_bits": self.scale_bits,
            "max_weight": self.max_weight,
            "bits": self.bits,
            "rounding": self.rounding,
        }

    @classmethod
    def from_json(cls, value: object) -> SecAggConfig:
        names = {"session", "threshold", "dimension", "clip_range", "scale_bits", "max_weight", "bits", "rounding"}
        fields = exact_fields(value, "config", names)
        clip = fields["clip_range"]
        if isinstance(clip, bool) or not isinstance(clip, (int, float)):
            raise SecAggError(f"config clip_range must be a number, got {clip!r}")
        if not isinstance(fields["rounding"], str):
            raise SecAggError(f"config rounding must be a string, got {fields['rounding']!r}")
        return cls(
            session=unb64(fields["session"], "config session"),
            threshold=fields["threshold"],
            dimension=fields["dimension"],
            clip_range=float(clip),
            scale_bits=fields["scale_bits"],
            max_weight=fields["max_weight"],
            bits=fields["bits"],
            rounding=fields["rounding"],
        )
