"""Differential privacy: clipping, noise of the stated size, reproducibility, and an accountant
that agrees with hand-computed RDP, with the exact Gaussian mechanism and with published values."""

from __future__ import annotations

import math

import pytest
import torch

from offsite.protocol.dp import (
    DEFAULT_ORDERS,
    DPConfig,
    DPError,
    PrivacyAccountant,
    clip_update,
    epsilon_for,
    gaussian_delta,
    gaussian_epsilon,
    gaussian_rdp,
    l2_norm,
    privatize_update,
    rdp_to_epsilon,
    subsampled_gaussian_rdp,
    update_delta,
)

SHAPES = {"blocks.0.w": (40, 30), "blocks.0.b": (30,), "blocks.29.w": (2, 3, 5), "blocks.29.s": ()}


def adapter(seed: int, scale: float = 1.0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
        for name, shape in SHAPES.items()
    }


# ---------------------------------------------------------------- clipping and noise


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0, 100.0])
def test_clipping_caps_the_norm_and_leaves_small_updates_alone(scale):
    delta = update_delta(adapter(1, scale), adapter(2, 0.0))
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(l2_norm(delta), rel=1e-12)
    if norm <= 1.0:
        assert all(torch.equal(clipped[name], delta[name]) for name in delta)
    else:
        assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-12)
        for name in delta:  # same direction
            torch.testing.assert_close(clipped[name], delta[name] / norm, rtol=1e-12, atol=0)
    assert l2_norm(clipped) <= 1.0 + 1e-12


def test_clipping_a_zero_update_and_bad_settings():
    zero = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in SHAPES.items()}
    clipped, norm = clip_update(zero, 0.5)
    assert norm == 0 and all(torch.equal(clipped[n], zero[n]) for n in zero)
    for kwargs, match in [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm"),
        ({"clip_norm": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "mode": "central"}, "mode"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "min_clients": 3}, "distributed mode only"),
    ]:
        with pytest.raises(DPError, match=match):
            DPConfig(**kwargs)
    broken = adapter(3)
    broken["blocks.0.b"] = torch.full((30,), float("nan"))
    with pytest.raises(DPError, match="tensor 'blocks.0.b': non-finite"):
        update_delta(broken, adapter(4))
    with pytest.raises(DPError, match="tensor 'blocks.0.w': shape"):
        update_delta({**adapter(3), "blocks.0.w": torch.zeros(3)}, adapter(4))


@pytest.mark.parametrize("mode, min_clients", [("local", 1), ("distributed", 4)])
def test_noise_std_matches_z_times_c(mode, min_clients):
    config = DPConfig(clip_norm=0.7, noise_multiplier=1.3, mode=mode, min_clients=min_clients)
    assert config.noise_std == pytest.approx(0.7 * 1.3 / math.sqrt(min_clients))
    assert config.aggregate_std == pytest.approx(0.7 * 1.3)  # what the sum of m honest updates carries
    global_adapter = {"w": torch.zeros(400_000)}
    update = privatize_update(global_adapter, global_adapter, config, seed=7)  # zero delta: pure noise
    noise = update.delta["w"]
    count = noise.numel()
    assert update.noise_std == config.noise_std and not update.clipped
    assert float(noise.std()) == pytest.approx(config.noise_std, rel=6 / math.sqrt(2 * count))  # 6 s.e. of a sample sd
    assert abs(float(noise.mean())) < 6 * config.noise_std / math.sqrt(count)
    # the distributed noise of m clients adds up to the aggregate's
    if mode == "distributed":
        total = sum(
            privatize_update(global_adapter, global_adapter, config, seed=s).delta["w"] for s in range(min_clients)
        )
        assert float(total.std()) == pytest.approx(0.7 * 1.3, rel=6 / math.sqrt(2 * count))


def test_privatize_is_deterministic_with_a_seed_and_fresh_without():
    tuned, global_adapter = adapter(1, 0.1), adapter(2, 0.1)
    config = DPConfig(clip_norm=0.5, noise_multiplier=0.8)
    first = privatize_update(tuned, global_adapter, config, seed=123)
    second = privatize_update(tuned, global_adapter, config, seed=123)
    other = privatize_update(tuned, global_adapter, config, seed=124)
    assert all(torch.equal(first.delta[n], second.delta[n]) for n in SHAPES)
    assert not torch.equal(first.delta["blocks.0.w"], other.delta["blocks.0.w"])
    unseeded = [privatize_update(tuned, global_adapter, config) for _ in range(2)]
    assert not torch.equal(unseeded[0].delta["blocks.0.w"], unseeded[1].delta["blocks.0.w"])
    assert first.clipped and first.norm == pytest.approx(l2_norm(update_delta(tuned, global_adapter)))
    merged = first.adapter(global_adapter)
    assert list(merged) == list(global_adapter) and all(merged[n].dtype == torch.float32 for n in merged)
    torch.testing.assert_close(
        merged["blocks.0.w"], (global_adapter["blocks.0.w"].double() + first.delta["blocks.0.w"]).float()
    )
    without_noise = privatize_update(tuned, global_adapter, DPConfig(clip_norm=0.5, noise_multiplier=0.0), seed=1)
    assert l2_norm(without_noise.delta) == pytest.approx(0.5, rel=1e-12)


# ---------------------------------------------------------------- accounting


def test_gaussian_rdp_and_a_hand_computed_point():
    assert gaussian_rdp(2.0, [8.0]) == [8 / 8]
    # T=10 rounds, z=2, order 8, delta=1e-5, worked out by hand:
    # classic:   10 * 8 / (2 * 4) + ln(1e5) / 7                         = 10 + 1.644704 = 11.644704
    # balle2020: 10 + ln(7/8) - (ln(1e-5) + ln 8) / 7 = 10 - 0.133531 + 1.347641          = 11.214110
    assert epsilon_for(2.0, 10, 1e-5, orders=[8], conversion="classic") == pytest.approx(11.644704, abs=1e-6)
    assert epsilon_for(2.0, 10, 1e-5, orders=[8]) == pytest.approx(11.214110, abs=1e-6)
    # with a dense grid, the classic conversion reaches its continuous optimum
    # min_a T a / (2 z^2) + L / (a - 1) = T / (2 z^2) + sqrt(2 T L) / z, L = ln(1/delta)
    dense = [1 + i / 1000 for i in range(1, 60_000)]
    optimum = 10 / 8 + math.sqrt(2 * 10 * math.log(1e5)) / 2
    assert epsilon_for(2.0, 10, 1e-5, orders=dense, conversion="classic") == pytest.approx(optimum, rel=1e-6)


def test_sampled_gaussian_rdp_matches_published_values_and_a_closed_form():
    # q=0.01, z=2.5, 50 rounds: the values in Google's dp_accounting test suite
    # (rdp_privacy_accountant_test.py, test_compute_rdp_poisson_sampled_gaussian)
    rdp = [50 * value for value in subsampled_gaussian_rdp(0.01, 2.5, [5, 50, 100])]
    assert rdp == pytest.approx([2.18075656e-03, 2.38460375e-02, 1.67416308e02], rel=1e-4)
    # order 2 by hand: A_2 = (1-q)^2 + 2q(1-q) + q^2 e^(1/z^2) = 1 + q^2 (e^(1/z^2) - 1)
    for q, z in [(0.1, 1.0), (0.5, 0.7), (0.01, 3.0)]:
        assert subsampled_gaussian_rdp(q, z, [2])[0] == pytest.approx(
            math.log1p(q * q * math.expm1(1 / z**2)), rel=1e-12
        )
    # q = 1 is the plain Gaussian; q = 0 spends nothing; fractional orders need q = 1
    integers = [2, 3, 10, 64]
    assert subsampled_gaussian_rdp(1.0, 1.5, integers) == pytest.approx(gaussian_rdp(1.5, integers))
    assert subsampled_gaussian_rdp(1 - 1e-12, 1.5, integers) == pytest.approx(gaussian_rdp(1.5, integers), rel=1e-6)
    assert subsampled_gaussian_rdp(0.0, 1.5, integers) == [0.0] * 4
    assert subsampled_gaussian_rdp(0.3, 1.5, [2.5]) == [math.inf]


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0, 4.530877117])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_one_round_rdp_epsilon_bounds_the_exact_gaussian_mechanism_tightly(z, delta):
    exact = gaussian_epsilon(z, delta)
    assert gaussian_delta(exact, 1 / z) == pytest.approx(delta, rel=1e-6)  # the bisection found it
    rdp, classic = epsilon_for(z, 1, delta), epsilon_for(z, 1, delta, conversion="classic")
    assert exact <= rdp <= 1.12 * exact  # RDP is an upper bound, and a close one (Balle et al. 2020)
    assert rdp < classic <= 1.4 * exact


def test_published_gaussian_point():
    # dp_accounting's test_compute_epsilon_delta_gaussian: z = 4.530877117 gives (1, 1e-6) by RDP
    assert epsilon_for(4.530877117, 1, 1e-6) == pytest.approx(1.0, abs=1e-5)
    # Gaussian DP (Dong, Roth, Su 2019): 1-GDP is (1, 0.1269)-DP
    assert gaussian_delta(1.0, 1.0) == pytest.approx(0.12693, abs=1e-5)


def test_epsilon_is_monotone_in_rounds_noise_and_sampling():
    delta = 1e-5
    by_rounds = [epsilon_for(1.0, t, delta) for t in (1, 2, 5, 10, 50, 100)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == len(by_rounds)
    by_noise = [epsilon_for(z, 20, delta) for z in (0.5, 0.8, 1.0, 2.0, 5.0, 10.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == len(by_noise)
    by_rate = [epsilon_for(1.0, 100, delta, sampling_rate=q) for q in (0.01, 0.05, 0.2, 0.5, 1.0)]
    assert by_rate == sorted(by_rate) and len(set(by_rate)) == len(by_rate)
    exact = [gaussian_epsilon(1.0, delta, t) for t in (1, 10, 100)]
    assert exact == sorted(exact) and exact[-1] == pytest.approx(gaussian_epsilon(0.1, delta))  # mu = sqrt(T)/z
    assert epsilon_for(0.0, 1, delta) == math.inf and epsilon_for(1.0, 0, delta) == 0.0


def test_accountant_composes_round_by_round_and_persists():
    accountant = PrivacyAccountant()
    for _ in range(5):
        accountant.step(1.2)
    spent = accountant.spent(1e-5)
    assert spent.rounds == 5 and spent.epsilon == pytest.approx(epsilon_for(1.2, 5, 1e-5))
    assert spent.exact_epsilon == pytest.approx(gaussian_epsilon(1.2, 1e-5, 5)) and spent.exact_epsilon < spent.epsilon
    assert spent.order in DEFAULT_ORDERS
    again = PrivacyAccountant.from_json(accountant.to_json())
    assert again.spent(1e-5) == spent
    again.step(1.2, sampling_rate=0.5, rounds=3)
    after = again.spent(1e-5)
    assert after.rounds == 8 and after.exact_epsilon is None and after.epsilon > spent.epsilon
    assert rdp_to_epsilon([2.0, 4.0], [0.0, 0.0], 0.5) == (0.0, 2.0)
    with pytest.raises(DPError, match="delta"):
        accountant.spent(0.0)
    with pytest.raises(DPError, match="accountant state"):
        PrivacyAccountant.from_json({"orders": [2.0], "rdp": [-1.0], "rounds": 1, "mu_squared": 0.0, "sampled": False})
