"""Differential privacy for adapter updates: client-side clipping and Gaussian noise, and the
accountant that reports the privacy spent by a job.

The mechanism (one data owner, one round)
    ``delta = tuned adapter - global adapter`` (all tensors as one vector), clipped to L2 norm
    ``C`` (``delta * min(1, C / ||delta||)``), plus Gaussian noise ``N(0, sigma^2)`` on every
    coordinate. :func:`privatize_update` does both; the data owner then sends ``global +
    delta`` (or ``delta`` itself, which suits secure aggregation's clip range better).

Unit of privacy and sensitivity
    A data owner's whole local dataset (client-level DP, add-or-remove-one-client neighbours,
    as in DP-FedAvg, McMahan et al. 2018): whatever the data, a client's clipped delta has norm
    at most ``C``, so the *sum* of the clients' deltas has L2 sensitivity ``C``. The mean the
    coordinator applies is that sum divided by the number of clients, a public count. Weighting
    by example counts would make the sensitivity ``w_i C`` and leak the counts: in DP mode,
    aggregate with equal weights (``max_weight=1`` for secure aggregation).

Modes: who is the adversary
    ``local`` (``sigma = z C``): each update is itself a Gaussian mechanism with noise multiplier
    ``z``. Protects against everyone who sees an individual update, the coordinator included,
    with or without secure aggregation. The sum carries ``sqrt(n)`` times the noise it needs.

    ``distributed`` (``sigma = z C / sqrt(m)``, ``m = min_clients``): the sum of at least ``m``
    honest updates has noise ``>= z C``, so the *sum* is a Gaussian mechanism with multiplier
    ``z``. Only meaningful if no one sees an individual update: with secure aggregation
    (:mod:`offsite.protocol.secagg`) against an honest-but-curious coordinator. Set ``m`` to the
    number of updates the coordinator is guaranteed to sum (secure aggregation's threshold
    ``t``); if fewer than ``m`` honest clients end up in the sum, or ``k`` of them collude and
    subtract their own noise, the multiplier falls to ``z sqrt((m - k) / m)``. Each individual
    update alone only has multiplier ``z / sqrt(m)``.

    Central DP (noise added by a trusted coordinator; Flower's ``DifferentialPrivacyServerSide*``
    strategies) is not offered: the coordinator is the party we protect against.

Accounting
    ``T`` rounds of the Gaussian mechanism with multiplier ``z`` (every client in every round),
    in Rényi DP (Mironov 2017): ``RDP(alpha) = T alpha / (2 z^2)``; with Poisson sampling of
    clients at rate ``q`` per round, the sampled Gaussian mechanism of Mironov, Talwar and Zhang
    (2019), computed exactly for integer orders (``log A_alpha`` as a binomial sum; fractional
    orders are used only without sampling). Converted to ``(epsilon, delta)`` by
    ``eps = min_alpha RDP(alpha) + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)``
    (Balle et al. 2020, Thm. 21) or the classic ``RDP(alpha) + log(1/delta)/(alpha-1)``
    (Mironov 2017, Prop. 3). Without sampling, the composition is exactly the Gaussian
    mechanism with multiplier ``z / sqrt(T)`` (Gaussian DP, Dong, Roth and Su 2019), whose exact
    epsilon (Balle and Wang 2018, Thm. 8) :func:`gaussian_epsilon` computes; the accountant
    reports both. Sampling amplification assumes the sample is secret: it does not hold
    against a coordinator that knows who took part.

    Flower 1.41's ``flwr.serverapp.RdpAccountant`` does the same through Google's
    ``dp-accounting`` package, an optional extra (``flwr[dp]``) that is not installed here;
    Flower's ``localdp_mod`` is a Laplace-style per-parameter mechanism for the legacy API.
    Both are left aside; this module has no dependency beyond torch and the standard library.

Why in ``protocol/`` (not ``emulator/``): the mechanism runs on the data owner's side but is
part of the contract about what crosses the wire. The coordinator needs the same ``C``, ``z``
and mode to account, to check the norm of what it receives, and to pick secure aggregation's
clip range, and it must not import the tuning stack for that; nor does DP depend on the
offsite-tuning method (it applies to any update).

Noise comes from ``torch.randn`` with a ``torch.Generator`` seeded from ``os.urandom`` (or
from ``seed`` for tests and reproducible experiments); floating-point Gaussian sampling is not
the idealised mechanism (Mironov 2012), a caveat shared with every DP-SGD library.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .dp_config import DPConfig, DPError  # the settings, torch-free (they travel in train instructions)
from .tensors import check_like

CONVERSIONS = ("balle2020", "classic")
DEFAULT_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 20 for x in range(1, 40))
    + tuple(3 + x / 4 for x in range(36))
    + tuple(range(12, 64))
    + (64, 80, 96, 128, 192, 256, 384, 512, 1024)
)


# ---------------------------------------------------------------- the mechanism


def update_delta(
    tuned: Mapping[str, torch.Tensor], global_adapter: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``tuned - global`` per tensor, in float64; the tensors must match by name and shape."""
    check_like(tuned, global_adapter, DPError, "the tuned adapter", finite=True)
    return {
        name: tuned[name].detach().to("cpu", torch.float64) - reference.detach().to("cpu", torch.float64)
        for name, reference in global_adapter.items()
    }


def l2_norm(state: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors taken as one vector (float64)."""
    return math.sqrt(sum(float(torch.sum(tensor.detach().to(torch.float64) ** 2)) for tensor in state.values()))


def clip_update(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``delta * min(1, C / ||delta||)`` (float64) and ``||delta||`` before clipping; a delta
    already within ``C`` comes back unchanged."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise DPError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    norm = l2_norm(delta)
    if norm <= clip_norm:
        return {name: tensor.detach().to(torch.float64).clone() for name, tensor in delta.items()}, norm
    factor = clip_norm / norm
    return {name: tensor.detach().to(torch.float64) * factor for name, tensor in delta.items()}, norm


def noise_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from ``os.urandom`` when ``seed`` is None."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") if seed is None else seed)


def add_gaussian_noise(
    delta: Mapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``delta + N(0, std^2)`` on every coordinate, in float64, tensors in ``delta``'s order."""
    if not (math.isfinite(std) and std >= 0):
        raise DPError(f"noise std must be a finite number >= 0, got {std!r}")
    return {
        name: tensor.detach().to(torch.float64)
        + std * torch.randn(tuple(tensor.shape), generator=generator, dtype=torch.float64)
        for name, tensor in delta.items()
    }


@dataclass(frozen=True)
class PrivateUpdate:
    """A clipped, noised update: ``delta`` (float64 tensors), the norm before clipping, whether
    it was clipped, and the noise standard deviation added."""

    delta: dict[str, torch.Tensor]
    norm: float
    clipped: bool
    noise_std: float

    def adapter(self, global_adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``global + delta`` in the global adapter's dtypes."""
        return {
            name: (reference.detach().to("cpu", torch.float64) + self.delta[name]).to(reference.dtype)
            for name, reference in global_adapter.items()
        }


def privatize_update(
    tuned: Mapping[str, torch.Tensor],
    global_adapter: Mapping[str, torch.Tensor],
    config: DPConfig,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> PrivateUpdate:
    """Clip ``tuned - global`` to ``config.clip_norm`` and add ``N(0, config.noise_std^2)`` per
    coordinate; reproducible with ``seed`` (or a ``generator``), fresh randomness otherwise."""
    if seed is not None and generator is not None:
        raise DPError("pass seed or generator, not both")
    clipped, norm = clip_update(update_delta(tuned, global_adapter), config.clip_norm)
    noisy = add_gaussian_noise(clipped, config.noise_std, generator or noise_generator(seed))
    return PrivateUpdate(noisy, norm, norm > config.clip_norm, config.noise_std)


# ---------------------------------------------------------------- Rényi DP accounting


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    orders = tuple(float(order) for order in orders)
    if not orders or any(not (math.isfinite(order) and order > 1) for order in orders):
        raise DPError(f"RDP orders must be finite numbers > 1, got {orders[:5]}")
    return orders


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS) -> list[float]:
    """RDP of one Gaussian mechanism with multiplier ``z`` (sensitivity 1, noise ``z``):
    ``alpha / (2 z^2)`` at each order (``inf`` for ``z = 0``)."""
    orders = _check_orders(orders)
    if noise_multiplier < 0:
        raise DPError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if noise_multiplier == 0:
        return [math.inf] * len(orders)
    return [order / (2 * noise_multiplier**2) for order in orders]


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


def _log_a_integer(sampling_rate: float, noise_multiplier: float, order: int) -> float:
    """``log A_alpha`` of the sampled Gaussian mechanism at integer ``alpha``:
    ``A_alpha = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 z^2))``
    (Mironov, Talwar and Zhang 2019, section 3.3), summed in log space."""
    log_q, log_1q = math.log(sampling_rate), math.log1p(-sampling_rate)
    total = -math.inf
    for k in range(order + 1):
        log_binomial = math.lgamma(order + 1) - math.lgamma(k + 1) - math.lgamma(order - k + 1)
        term = log_binomial + k * log_q + (order - k) * log_1q + (k * k - k) / (2 * noise_multiplier**2)
        total = _log_add(total, term)
    return total


def subsampled_gaussian_rdp(
    sampling_rate: float, noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> list[float]:
    """RDP of one round of the Poisson-sampled Gaussian mechanism (each client takes part with
    probability ``q``, add-or-remove neighbours). ``q = 1`` is :func:`gaussian_rdp`; for ``q < 1``
    only integer orders are computed (exact binomial sum), other orders get ``inf``."""
    orders = _check_orders(orders)
    if not 0 <= sampling_rate <= 1:
        raise DPError(f"sampling_rate must be in [0, 1], got {sampling_rate}")
    if sampling_rate == 1:
        return gaussian_rdp(noise_multiplier, orders)
    if sampling_rate == 0:
        return [0.0] * len(orders)
    if noise_multiplier == 0:
        return [math.inf] * len(orders)
    return [
        _log_a_integer(sampling_rate, noise_multiplier, int(order)) / (order - 1)
        if float(order).is_integer()
        else math.inf
        for order in orders
    ]


def rdp_to_epsilon(
    orders: Sequence[float], rdp: Sequence[float], delta: float, conversion: str = "balle2020"
) -> tuple[float, float]:
    """``(epsilon, best order)`` for ``delta``: the minimum over the orders of
    ``rdp + log((a-1)/a) - (log delta + log a)/(a-1)`` (``balle2020``) or
    ``rdp + log(1/delta)/(a-1)`` (``classic``), floored at 0; 0 when every RDP value is 0."""
    orders = _check_orders(orders)
    if len(orders) != len(rdp):
        raise DPError(f"{len(orders)} orders but {len(rdp)} RDP values")
    if not 0 < delta < 1:
        raise DPError(f"delta must be in (0, 1), got {delta}")
    if conversion not in CONVERSIONS:
        raise DPError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")
    if all(value == 0 for value in rdp):
        return 0.0, orders[0]  # nothing released
    best, best_order = math.inf, math.nan
    for order, value in zip(orders, rdp):
        if value < 0:
            raise DPError(f"RDP at order {order} is negative: {value}")
        if conversion == "classic":
            epsilon = value + math.log(1 / delta) / (order - 1)
        else:
            epsilon = value + math.log1p(-1 / order) - (math.log(delta) + math.log(order)) / (order - 1)
        if epsilon < best:
            best, best_order = epsilon, order
    return max(best, 0.0), best_order


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The exact ``delta(epsilon)`` of a ``mu``-GDP mechanism (the Gaussian mechanism with
    sensitivity/noise ratio ``mu``): ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``
    (Balle and Wang 2018, Thm. 8)."""
    if mu == 0:
        return 0.0
    tail = _normal_cdf(-epsilon / mu - mu / 2)
    return max(_normal_cdf(-epsilon / mu + mu / 2) - (math.exp(epsilon) * tail if tail > 0 else 0.0), 0.0)


def gaussian_epsilon(noise_multiplier: float, delta: float, rounds: int = 1) -> float:
    """The exact (tight) epsilon of ``rounds`` Gaussian mechanisms with multiplier ``z``, no
    sampling: ``mu = sqrt(rounds) / z``, epsilon found by bisection on :func:`gaussian_delta`."""
    if not 0 < delta < 1:
        raise DPError(f"delta must be in (0, 1), got {delta}")
    if noise_multiplier < 0 or rounds < 0:
        raise DPError(f"noise_multiplier and rounds must be >= 0, got {noise_multiplier}, {rounds}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return _gdp_epsilon(math.sqrt(rounds) / noise_multiplier, delta)


def _gdp_epsilon(mu: float, delta: float) -> float:
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(high, mu) > delta:
        low, high = high, 2 * high
        if high > 1e4:
            return math.inf
    for _ in range(200):
        middle = (low + high) / 2
        if gaussian_delta(middle, mu) > delta:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return high


def epsilon_for(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    *,
    sampling_rate: float = 1.0,
    orders: Sequence[float] = DEFAULT_ORDERS,
    conversion: str = "balle2020",
) -> float:
    """RDP epsilon of ``rounds`` rounds of the (sampled) Gaussian mechanism, at ``delta``."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise DPError(f"rounds must be an integer >= 0, got {rounds!r}")
    per_round = subsampled_gaussian_rdp(sampling_rate, noise_multiplier, orders)
    return rdp_to_epsilon(orders, [rounds * value for value in per_round], delta, conversion)[0]


@dataclass(frozen=True)
class PrivacySpent:
    """``epsilon`` at ``delta`` (RDP, at ``order``) after ``rounds``; ``exact_epsilon``: the tight
    value when no round sampled clients (``None`` otherwise)."""

    epsilon: float
    delta: float
    order: float
    rounds: int
    exact_epsilon: float | None

    def to_json(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "order": self.order,
            "rounds": self.rounds,
            "exact_epsilon": self.exact_epsilon,
        }


@dataclass
class PrivacyAccountant:
    """The privacy a job has spent, round after round (client-level, add-or-remove-one)."""

    orders: tuple[float, ...] = DEFAULT_ORDERS
    rdp: list[float] = field(default_factory=list)
    rounds: int = 0
    mu_squared: float = 0.0  # GDP composition of the unsampled rounds
    sampled: bool = False  # some round sampled clients (q < 1): no exact value

    def __post_init__(self) -> None:
        self.orders = _check_orders(self.orders)
        if not self.rdp:
            self.rdp = [0.0] * len(self.orders)
        if len(self.rdp) != len(self.orders):
            raise DPError(f"{len(self.orders)} orders but {len(self.rdp)} RDP values")

    def step(self, noise_multiplier: float, sampling_rate: float = 1.0, rounds: int = 1) -> None:
        """Account for ``rounds`` rounds with multiplier ``z`` (the aggregate's: see the modes)
        and client sampling rate ``q``."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise DPError(f"rounds must be an integer >= 0, got {rounds!r}")
        per_round = subsampled_gaussian_rdp(sampling_rate, noise_multiplier, self.orders)
        self.rdp = [total + rounds * value for total, value in zip(self.rdp, per_round)]
        self.rounds += rounds
        if sampling_rate < 1:
            self.sampled = True
        elif rounds:
            self.mu_squared += math.inf if noise_multiplier == 0 else rounds / noise_multiplier**2

    def epsilon(self, delta: float, conversion: str = "balle2020") -> float:
        return rdp_to_epsilon(self.orders, self.rdp, delta, conversion)[0]

    def spent(self, delta: float, conversion: str = "balle2020") -> PrivacySpent:
        epsilon, order = rdp_to_epsilon(self.orders, self.rdp, delta, conversion)
        exact = (
            None if self.sampled else (0.0 if self.mu_squared == 0 else _gdp_epsilon(math.sqrt(self.mu_squared), delta))
        )
        return PrivacySpent(epsilon, delta, order, self.rounds, exact)

    def to_json(self) -> dict:
        """For the job's ``state.json`` (plain numbers; ``inf`` as the string ``"inf"``)."""

        def number(value: float):
            return "inf" if value == math.inf else value

        return {
            "orders": list(self.orders),
            "rdp": [number(v) for v in self.rdp],
            "rounds": self.rounds,
            "mu_squared": number(self.mu_squared),
            "sampled": self.sampled,
        }

    @classmethod
    def from_json(cls, value: object) -> PrivacyAccountant:
        if not isinstance(value, dict) or set(value) != {"orders", "rdp", "rounds", "mu_squared", "sampled"}:
            raise DPError("accountant state: expected orders, rdp, rounds, mu_squared, sampled")

        def number(item: object, what: str) -> float:
            if item == "inf":
                return math.inf
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or item < 0:
                raise DPError(f"accountant state: {what} {item!r} is not a number >= 0")
            return float(item)

        if not isinstance(value["orders"], list) or not isinstance(value["rdp"], list):
            raise DPError("accountant state: orders and rdp must be lists")
        if (
            isinstance(value["rounds"], bool)
            or not isinstance(value["rounds"], int)
            or value["rounds"] < 0
            or not isinstance(value["sampled"], bool)
        ):
            raise DPError("accountant state: rounds must be an integer >= 0 and sampled a boolean")
        return cls(
            orders=tuple(number(order, "order") for order in value["orders"]),
            rdp=[number(item, "rdp") for item in value["rdp"]],
            rounds=value["rounds"],
            mu_squared=number(value["mu_squared"], "mu_squared"),
            sampled=value["sampled"],
        )
