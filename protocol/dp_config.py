"""The settings of the differential-privacy mechanism of :mod:`offsite.protocol.dp`, torch-free:
they travel in every train instruction, which the light ClientApp processes also import."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .ids import DP_MODES


class DPError(ValueError):
    """Bad DP settings or updates; the message names the setting or the tensor."""


@dataclass(frozen=True)
class DPConfig:
    """``clip_norm``: ``C``; ``noise_multiplier``: ``z``; ``mode``: ``local`` or ``distributed``;
    ``min_clients``: ``m``, the number of updates the sum is guaranteed to contain
    (``distributed`` only)."""

    clip_norm: float
    noise_multiplier: float
    mode: str = "local"
    min_clients: int = 1

    def __post_init__(self) -> None:
        if not _finite_number(self.clip_norm) or not self.clip_norm > 0:
            raise DPError(f"clip_norm must be a finite number > 0, got {self.clip_norm!r}")
        if not _finite_number(self.noise_multiplier) or not self.noise_multiplier >= 0:
            raise DPError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if self.mode not in DP_MODES:
            raise DPError(f"mode must be one of {DP_MODES}, got {self.mode!r}")
        if isinstance(self.min_clients, bool) or not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise DPError(f"min_clients must be an integer >= 1, got {self.min_clients!r}")
        if self.mode == "local" and self.min_clients != 1:
            raise DPError("min_clients applies to the distributed mode only")

    @property
    def noise_std(self) -> float:
        """The standard deviation each client adds per coordinate: ``z C`` (local) or
        ``z C / sqrt(m)`` (distributed)."""
        std = self.noise_multiplier * self.clip_norm
        return std if self.mode == "local" else std / math.sqrt(self.min_clients)

    @property
    def aggregate_std(self) -> float:
        """The noise standard deviation in the sum of ``m`` honest updates (local: of one update)."""
        return self.noise_std * math.sqrt(self.min_clients)


def _finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
