import numpy as np
import pytest
import torch

from offsite.cloud.aggregate import AggregationError, aggregate, coordinate_median, fedavg, trimmed_mean


def make_updates(n: int, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for _ in range(n):
        state = {
            "blocks.0.mlp.weight": torch.randn(4, 3, generator=generator).to(dtype),
            "blocks.0.norm.weight": torch.randn(3, generator=generator).to(dtype),
            "blocks.7.scale": torch.randn((), generator=generator).to(dtype),
        }
        weight = float(torch.randint(1, 50, (), generator=generator))
        updates.append((state, weight))
    return updates


def oracle_mean(updates, key):
    arrays = np.stack([state[key].double().numpy() for state, _ in updates])
    return np.average(arrays, axis=0, weights=[w for _, w in updates])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_fedavg_equals_numpy_weighted_average(n):
    updates = make_updates(n, seed=n)
    merged = fedavg(updates)
    assert set(merged) == set(updates[0][0])
    for key in merged:
        assert merged[key].dtype == torch.float32
        np.testing.assert_allclose(merged[key].double().numpy(), oracle_mean(updates, key), rtol=1e-6, atol=1e-7)


def test_fedavg_is_not_the_unweighted_mean():
    updates = make_updates(3, seed=1)
    updates = [(state, weight) for (state, _), weight in zip(updates, [1.0, 10.0, 100.0])]
    merged = fedavg(updates)
    unweighted = torch.stack([s["blocks.0.mlp.weight"] for s, _ in updates]).mean(0)
    assert not torch.allclose(merged["blocks.0.mlp.weight"], unweighted, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fedavg_keeps_low_precision_dtypes(dtype):
    updates = make_updates(4, seed=3, dtype=dtype)
    merged = fedavg(updates)
    for key, tensor in merged.items():
        assert tensor.dtype == dtype
        expected = torch.from_numpy(np.asarray(oracle_mean(updates, key))).to(dtype)
        assert torch.equal(tensor, expected)  # float64 accumulation, one rounding at the end


def test_fedavg_of_identical_updates_is_that_update():
    state = make_updates(1, seed=9)[0][0]
    merged = fedavg([(state, 3.0), ({k: v.clone() for k, v in state.items()}, 7.0)])
    for key in state:
        assert torch.allclose(merged[key], state[key], atol=1e-7)


def test_trimmed_mean_matches_numpy():
    updates = make_updates(6, seed=4)
    merged = trimmed_mean(updates, 0.2)  # floor(1.2) = 1 dropped at each end
    for key in merged:
        arrays = np.sort(np.stack([s[key].double().numpy() for s, _ in updates]), axis=0)
        np.testing.assert_allclose(merged[key].double().numpy(), arrays[1:-1].mean(axis=0), rtol=1e-6, atol=1e-7)


def test_trimmed_mean_resists_one_outlier():
    updates = make_updates(5, seed=5)
    poisoned = [(dict(updates[0][0]), 1.0)] + updates[1:]
    poisoned[0][0]["blocks.0.mlp.weight"] = torch.full((4, 3), 1e6)
    assert trimmed_mean(poisoned, 0.2)["blocks.0.mlp.weight"].abs().max() < 10


@pytest.mark.parametrize("n", [1, 4, 5])
def test_coordinate_median_matches_numpy(n):
    updates = make_updates(n, seed=6)
    merged = coordinate_median(updates)
    for key in merged:
        arrays = np.stack([s[key].double().numpy() for s, _ in updates])
        np.testing.assert_allclose(merged[key].double().numpy(), np.median(arrays, axis=0), rtol=1e-6, atol=1e-7)


def test_aggregate_dispatches_by_name():
    updates = make_updates(3, seed=7)
    assert torch.equal(aggregate("fedavg", updates)["blocks.7.scale"], fedavg(updates)["blocks.7.scale"])
    with pytest.raises(AggregationError, match="unknown aggregator"):
        aggregate("krum", updates)


def test_rejects_mismatched_shape_naming_the_tensor():
    updates = make_updates(2)
    updates[1][0]["blocks.0.mlp.weight"] = torch.zeros(3, 4)
    with pytest.raises(AggregationError, match=r"blocks\.0\.mlp\.weight"):
        fedavg(updates)


def test_rejects_mismatched_keys_naming_the_tensor():
    updates = make_updates(2)
    del updates[1][0]["blocks.0.norm.weight"]
    with pytest.raises(AggregationError, match=r"blocks\.0\.norm\.weight"):
        fedavg(updates)
    updates = make_updates(2)
    updates[0][0]["blocks.9.extra"] = torch.zeros(1)
    with pytest.raises(AggregationError, match=r"blocks\.9\.extra"):
        coordinate_median(updates)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_rejects_bad_weights(weight):
    updates = make_updates(2)
    updates[1] = (updates[1][0], weight)
    with pytest.raises(AggregationError, match="update 1: weight"):
        fedavg(updates)


def test_rejects_empty_and_zero_total():
    with pytest.raises(AggregationError, match="no updates"):
        fedavg([])
    updates = [(s, 0.0) for s, _ in make_updates(2)]
    with pytest.raises(AggregationError, match="sum to zero"):
        fedavg(updates)


def test_rejects_bad_trim_fraction():
    with pytest.raises(AggregationError, match="trim_fraction"):
        trimmed_mean(make_updates(3), 0.5)
