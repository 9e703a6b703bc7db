"""Secure aggregation: the unmasked weighted mean matches plain FedAvg within the stated
quantisation bound (with and without dropouts), what the coordinator holds for one client is
unrelated to its plaintext, Shamir below threshold reveals nothing, tampered shares are refused,
and every message survives its byte/Flower-record round trip (JSON and raw arrays only)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from offsite.cloud.aggregate import fedavg
from offsite.cloud.federate.secagg_server import SecAggResult, SecAggServer, reconstruct
from offsite.protocol.secagg import (
    PRIME,
    EncryptedShares,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    SetupRequest,
    Share,
    ShareBundle,
    UnmaskRequest,
    UnmaskShares,
    apply_mask,
    flatten_state,
    from_content,
    from_ring,
    max_scale_bits,
    quantisation_error_bound,
    quantise,
    self_mask_seed,
    shamir_combine,
    shamir_split,
    to_content,
    to_ring,
    unflatten_state,
)

SESSION = bytes(range(32))
SHAPES = {
    "blocks.0.attn.weight": (48, 32),
    "blocks.0.norm.bias": (32,),
    "blocks.29.mlp.weight": (3, 50, 7),
    "blocks.29.scale": (),
}
DIMENSION = sum(math.prod(shape) for shape in SHAPES.values())
NODES = [11, 7, 2**63 + 5, 42, 1000]  # Flower node ids: arbitrary uint64


def seeded(seed: int):
    """A deterministic entropy source for the clients (tests only)."""
    rng = np.random.default_rng(seed)
    return lambda count: rng.bytes(count)


def make_update(seed: int, clip: float = 1.0, dtype=torch.float64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: ((torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * clip).to(dtype)
        for name, shape in SHAPES.items()
    }


def wire(message, cls):
    """Both encodings, as they would cross Flower: bytes and a RecordDict."""
    assert cls.from_bytes(message.to_bytes()) == message
    return from_content(to_content(message), cls)


@dataclasses.dataclass
class Transcript:
    """Everything the coordinator received, per stage and node."""

    keys: dict
    shares: dict
    masked: dict
    unmask: dict
    requests: dict


def run_session(
    config: SecAggConfig,
    updates: dict[int, dict[str, torch.Tensor] | np.ndarray],
    weights: dict[int, int],
    *,
    silent_at: dict[str, set[int]] | None = None,
    seed: int = 0,
) -> tuple[SecAggResult, Transcript, SecAggServer]:
    """One session over the message encodings; each client is persisted with ``to_bytes`` between
    stages (Flower runs a fresh ClientApp process per message). ``silent_at[stage]``: nodes that
    send nothing from that stage on (``keys``, ``shares``, ``masked``, ``unmask``)."""
    silent_at = silent_at or {}
    gone: set[int] = set()
    server = SecAggServer(config)
    states = {node: SecAggClient(node, seeded(seed * 1000 + index)).to_bytes() for index, node in enumerate(updates)}
    transcript = Transcript({}, {}, {}, {}, {})

    def step(stage: str, requests: dict, request_cls, handle, reply_cls) -> dict:
        gone.update(silent_at.get(stage, set()))
        replies = {}
        for node, request in requests.items():
            if node in gone:
                continue
            client = SecAggClient.from_bytes(states[node], seeded(seed * 1000 + 500 + node % 997 + len(stage)))
            reply = handle(client, wire(request, request_cls))
            states[node] = client.to_bytes()
            replies[node] = wire(reply, reply_cls)
        getattr(transcript, stage).update(replies)
        return replies

    setup = server.start(list(updates))
    replies = step(
        "keys", {node: setup for node in updates}, SetupRequest, lambda c, m: c.advertise(m), KeyAdvertisement
    )
    rosters = server.collect_keys(replies)
    replies = step("shares", rosters, KeyRoster, lambda c, m: c.share_keys(m), EncryptedShares)
    bundles = server.collect_shares(replies)
    replies = step(
        "masked", bundles, ShareBundle, lambda c, m: c.masked_input(m, updates[c.node], weights[c.node]), MaskedInput
    )
    requests = server.collect_masked(replies)
    transcript.requests.update(requests)
    replies = step("unmask", requests, UnmaskRequest, lambda c, m: c.unmask(m), UnmaskShares)
    return server.collect_unmask(replies), transcript, server


def exact_mean(updates: dict, weights: dict, nodes) -> np.ndarray:
    """Plain weighted FedAvg (cloud/aggregate.py) in float64, flattened."""
    merged = fedavg(
        [({k: v.to(torch.float64) for k, v in updates[node].items()}, float(weights[node])) for node in nodes]
    )
    return flatten_state(merged)


def config_for(
    nodes, *, scale_bits=None, rounding="stochastic", bits=64, clip=1.0, max_weight=1000, threshold=None
) -> SecAggConfig:
    config = SecAggConfig.for_job(
        SESSION, DIMENSION, len(nodes), clip, max_weight=max_weight, bits=bits, threshold=threshold, rounding=rounding
    )
    return config if scale_bits is None else dataclasses.replace(config, scale_bits=scale_bits)


# ---------------------------------------------------------------- (a) correctness, no dropout


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_five_clients_weighted_mean_equals_fedavg_within_a_tight_bound(rounding):
    updates = {node: make_update(index) for index, node in enumerate(NODES)}
    weights = dict(zip(NODES, [3, 250, 17, 1, 999]))
    config = config_for(NODES, scale_bits=16, rounding=rounding)  # coarse on purpose: the bound is visible
    result, _, server = run_session(config, updates, weights)

    bound = quantisation_error_bound(1.0, 16, len(NODES), rounding=rounding, max_weight=1000)
    assert result.error_bound == bound == (0.5 if rounding == "nearest" else 1.0) * 2**-16 + 2**-50
    assert result.survivors == tuple(sorted(NODES)) and result.dropped == () and server.failures == {}
    assert result.total_weight == sum(weights.values())
    error = np.abs(result.mean() - exact_mean(updates, weights, NODES))
    assert error.max() <= bound
    assert error.max() >= bound / 4  # the bound is tight: ~DIMENSION rounding errors come close to it
    if rounding == "stochastic":  # unbiased: the errors average out
        assert abs(float((result.mean() - exact_mean(updates, weights, NODES)).mean())) < 10 * bound / math.sqrt(
            DIMENSION
        )


def test_default_scale_float32_adapter_matches_fedavg_to_float32_precision():
    updates = {node: make_update(index, clip=0.5, dtype=torch.float32) for index, node in enumerate(NODES)}
    weights = dict(zip(NODES, [120, 80, 64, 1, 7]))
    config = config_for(NODES, clip=0.5, max_weight=1 << 20)
    assert config.scale_bits == max_scale_bits(64, 0.5, 1 << 20, len(NODES)) == 41 and config.threshold == 3
    result, _, _ = run_session(config, updates, weights)
    expected = exact_mean(updates, weights, NODES)
    assert np.abs(result.mean() - expected).max() <= result.error_bound < 2e-12
    merged = result.mean_state(updates[NODES[0]])
    reference = fedavg([(updates[node], float(weights[node])) for node in NODES])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        torch.testing.assert_close(tensor, reference[name], rtol=2**-23, atol=1e-12)


def test_thirty_two_bit_ring_and_flat_vectors():
    rng = np.random.default_rng(5)
    nodes = [1, 2, 3]
    updates = {node: rng.uniform(-2, 2, DIMENSION) for node in nodes}
    weights = {1: 10, 2: 20, 3: 30}
    config = SecAggConfig.for_job(SESSION, DIMENSION, 3, 2.0, max_weight=100, bits=32, rounding="nearest")
    result, transcript, _ = run_session(config, updates, weights)
    assert transcript.masked[1].vector.dtype == np.uint32
    expected = sum(weights[n] * updates[n] for n in nodes) / 60
    assert np.abs(result.mean() - expected).max() <= result.error_bound == 0.5 * 2.0**-config.scale_bits + 2 * 2**-50


def test_headroom_formula_is_exact_and_the_worst_case_does_not_wrap():
    for bits, clip, weight, n in [(64, 1.0, 1, 5), (64, 8.0, 10**6, 5), (32, 1.0, 1000, 5), (32, 0.1, 3, 100)]:
        f = max_scale_bits(bits, clip, weight, n)
        assert n * weight * (2**f * clip + 1) <= 2 ** (bits - 1) - 1
        assert n * weight * (2 ** (f + 1) * clip + 1) > 2 ** (bits - 1) - 1 or 2 ** (f + 1) * clip > 2**48
        # every client at the edge of the range with the largest weight: the sum still decodes
        integers, _ = quantise(np.array([clip, -clip]), clip, f, "nearest")
        total = np.zeros(2, dtype=np.uint64 if bits == 64 else np.uint32)
        for _ in range(n):
            total += to_ring(integers * weight, bits)
        assert integers.tolist() == [round(2**f * clip), -round(2**f * clip)]
        assert from_ring(total, bits).tolist() == [n * weight * round(2**f * clip), -n * weight * round(2**f * clip)]
    with pytest.raises(SecAggError, match="overflow"):
        quantisation_error_bound(1.0, 30, 5, bits=32, max_weight=10)


def test_stochastic_rounding_is_unbiased_and_clips():
    rng = np.random.default_rng(0)
    values = np.full(200_000, 0.3 / 2**4)
    integers, clipped = quantise(values, 1.0, 4, "stochastic", rng)
    assert clipped == 0 and set(np.unique(integers)) == {0, 1}
    assert abs(integers.mean() - 0.3) < 0.01
    integers, clipped = quantise(np.array([5.0, -5.0, 0.5]), 1.0, 2, "nearest")
    assert clipped == 2 and integers.tolist() == [4, -4, 2]


# ---------------------------------------------------------------- (b) dropouts


@pytest.mark.parametrize("dropped", [{7}, {2**63 + 5, 42}])
def test_clients_dropping_after_the_masked_input_are_recovered(dropped):
    updates = {node: make_update(index + 10) for index, node in enumerate(NODES)}
    weights = dict(zip(NODES, [5, 6, 7, 8, 9]))
    config = config_for(NODES, scale_bits=20)
    result, transcript, _ = run_session(config, updates, weights, silent_at={"unmask": dropped}, seed=3)
    # they sent their masked input, then vanished: the coordinator declared them survivors, so
    # this is the "late" case: what the others reveal must suffice without them
    assert set(transcript.masked) == set(NODES) and set(transcript.unmask) == set(NODES) - dropped
    survivors = sorted(NODES)
    assert np.abs(result.mean() - exact_mean(updates, weights, survivors)).max() <= result.error_bound


@pytest.mark.parametrize("dropped", [{7}, {2**63 + 5, 42}])
def test_clients_dropping_before_the_masked_input_are_unmasked_out(dropped):
    updates = {node: make_update(index + 20) for index, node in enumerate(NODES)}
    weights = dict(zip(NODES, [50, 1, 2, 3, 4]))
    config = config_for(NODES, scale_bits=20)
    result, transcript, _ = run_session(config, updates, weights, silent_at={"masked": dropped}, seed=4)
    survivors = sorted(set(NODES) - dropped)
    assert result.survivors == tuple(survivors) and result.dropped == tuple(sorted(dropped))
    assert result.total_weight == sum(weights[n] for n in survivors)
    assert np.abs(result.mean() - exact_mean(updates, weights, survivors)).max() <= result.error_bound
    # the survivors revealed the dropped nodes' mask keys, and the survivors' self-mask seeds
    for reply in transcript.unmask.values():
        assert [owner for owner, _ in reply.mask_key_shares] == sorted(dropped)
        assert [owner for owner, _ in reply.self_mask_shares] == survivors


def test_drops_at_every_stage():
    updates = {node: make_update(index + 30) for index, node in enumerate(NODES)}
    weights = dict.fromkeys(NODES, 10)
    config = dataclasses.replace(config_for(NODES, scale_bits=20), threshold=3)
    result, _, _ = run_session(config, updates, weights, silent_at={"keys": {11}, "shares": {42}}, seed=5)
    survivors = sorted(set(NODES) - {11, 42})
    assert result.survivors == tuple(survivors)
    assert np.abs(result.mean() - exact_mean(updates, weights, survivors)).max() <= result.error_bound


def test_too_many_dropouts_abort():
    updates = {node: make_update(index) for index, node in enumerate(NODES)}
    config = config_for(NODES, scale_bits=20)
    with pytest.raises(SecAggAbort, match="sent masked inputs, threshold 3"):
        run_session(config, updates, dict.fromkeys(NODES, 1), silent_at={"masked": {7, 11, 42}})
    with pytest.raises(SecAggAbort, match="sent their shares, threshold 3"):
        run_session(config, updates, dict.fromkeys(NODES, 1), silent_at={"unmask": {7, 11, 42}})


# ---------------------------------------------------------------- (c) the coordinator learns nothing about one client


def chi_square_uniform(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_255_LIMIT = 255 + 6 * math.sqrt(2 * 255)  # mean + 6 sd of chi-square with 255 dof


def ring_statistics(vector: np.ndarray, plaintext: np.ndarray) -> dict[str, float]:
    """Byte histogram and top-byte histogram chi-square against uniform, correlation with the plaintext."""
    as_unit = vector.astype(np.float64) / 2.0**64
    return {
        "bytes": chi_square_uniform(np.bincount(np.frombuffer(vector.tobytes(), dtype=np.uint8), minlength=256)),
        "top": chi_square_uniform(np.bincount((vector >> np.uint64(56)).astype(np.int64), minlength=256)),
        "corr": abs(float(np.corrcoef(as_unit, plaintext)[0, 1])),
        "mean": float(as_unit.mean()),
    }


def test_a_masked_input_is_uniform_and_uncorrelated_with_its_plaintext():
    d = 1 << 16
    nodes = [1, 2, 3, 4, 5]
    grid = np.linspace(-1, 1, d)
    plaintexts = {1: grid, 2: np.sign(np.sin(np.arange(d))) * 1.0, 3: np.zeros(d), 4: grid**3, 5: np.full(d, 0.999)}
    config = SecAggConfig.for_job(SESSION, d, 5, 1.0, max_weight=1000)
    _, transcript, _ = run_session(config, plaintexts, dict.fromkeys(nodes, 999), seed=11)
    for node in nodes:
        vector = transcript.masked[node].vector[:-1]
        stats = ring_statistics(
            vector, plaintexts[node] if np.ptp(plaintexts[node]) > 0 else grid
        )  # constants: vs the ramp
        assert stats["bytes"] < CHI2_255_LIMIT and stats["top"] < CHI2_255_LIMIT, (node, stats)
        assert stats["corr"] < 5 / math.sqrt(d), (node, stats)
        assert abs(stats["mean"] - 0.5) < 6 * math.sqrt(1 / 12 / d), (node, stats)
    # two very different plaintexts (a ramp and all zeros): their masked vectors' top-byte
    # histograms are indistinguishable (two-sample chi-square homogeneity)
    a = np.bincount((transcript.masked[1].vector >> np.uint64(56)).astype(np.int64), minlength=256)
    b = np.bincount((transcript.masked[3].vector >> np.uint64(56)).astype(np.int64), minlength=256)
    statistic = float((((a - b) ** 2) / (a + b)).sum())
    assert statistic < CHI2_255_LIMIT
    # and the plaintext-scale signal is nowhere near: the quantised ramp alone is far from uniform
    integers, _ = quantise(grid, 1.0, config.scale_bits, "nearest")
    assert ring_statistics(to_ring(integers * 999, 64), grid)["top"] > 10 * CHI2_255_LIMIT


def test_the_shares_the_coordinator_gets_never_unmask_one_client():
    d = 1 << 15
    nodes = [1, 2, 3, 4, 5]
    plaintexts = {node: np.linspace(-1, 1, d) * (node % 2 * 2 - 1) for node in nodes}
    config = SecAggConfig.for_job(SESSION, d, 5, 1.0, max_weight=10)
    result, transcript, _ = run_session(config, plaintexts, dict.fromkeys(nodes, 3), silent_at={"masked": {5}}, seed=12)
    assert result.dropped == (5,)
    # for every client, the coordinator received shares of its self-mask seed or of its mask key, never both
    for owner in nodes:
        kinds = {
            kind
            for reply in transcript.unmask.values()
            for kind, pairs in (("seed", reply.self_mask_shares), ("key", reply.mask_key_shares))
            if owner in dict(pairs)
        }
        assert kinds == ({"key"} if owner == 5 else {"seed"}), owner
    # with everything it legitimately holds, the coordinator strips a survivor's self mask: the
    # pairwise masks still hide the plaintext
    target = 1
    shares = {
        holder: Share.from_bytes(dict(reply.self_mask_shares)[target]) for holder, reply in transcript.unmask.items()
    }
    seed = shamir_combine(list(shares.values()), config.threshold)
    stripped = transcript.masked[target].vector.copy()
    apply_mask(stripped, self_mask_seed(seed, SESSION, target), -1)
    stats = ring_statistics(stripped[:-1], plaintexts[target])
    assert stats["top"] < CHI2_255_LIMIT and stats["corr"] < 5 / math.sqrt(d), stats
    assert from_ring(stripped[-1:], 64)[0] != 3  # not even the weight


def test_a_client_reveals_shares_once_and_only_for_a_consistent_partition():
    nodes = [1, 2, 3, 4, 5]
    config = SecAggConfig.for_job(SESSION, 4, 5, 1.0, max_weight=10)
    server = SecAggServer(config)
    clients = {node: SecAggClient(node, seeded(node)) for node in nodes}
    setup = server.start(nodes)
    rosters = server.collect_keys({n: c.advertise(setup) for n, c in clients.items()})
    bundles = server.collect_shares({n: c.share_keys(rosters[n]) for n, c in clients.items()})
    masked = {n: c.masked_input(bundles[n], np.zeros(4), 1) for n, c in clients.items()}
    requests = server.collect_masked(masked)
    client = clients[1]
    snapshot = client.to_bytes()
    for survivors, dropped, match in [
        ((1, 2, 3), (3, 4, 5), "both survivors and dropped"),  # node 3: both secrets asked for
        ((1, 2, 3), (4,), "not the nodes masked with"),  # node 5 left out of the partition
        ((2, 3, 4, 5), (1,), "does not count this node as a survivor"),
        ((1, 2), (3, 4, 5), "survivor"),  # fewer than t survivors
    ]:
        with pytest.raises(SecAggError, match=match):
            SecAggClient.from_bytes(snapshot).unmask(UnmaskRequest(SESSION, survivors, dropped))
    client.unmask(requests[1])
    with pytest.raises(SecAggError, match="stage 'done'"):
        client.unmask(UnmaskRequest(SESSION, (1, 2, 3), (4, 5)))
    assert client.mask_key_shares == {} and client.self_mask_shares == {}


def test_threshold_must_exceed_half_the_nodes():
    with pytest.raises(SecAggError, match="more than half"):
        SecAggServer(SecAggConfig.for_job(SESSION, 4, 6, 1.0, threshold=3)).start([1, 2, 3, 4, 5, 6])
    client = SecAggClient(1)
    with pytest.raises(SecAggError, match="more than half"):
        client.advertise(
            SetupRequest(dataclasses.replace(SecAggConfig.for_job(SESSION, 4, 4, 1.0), threshold=2), (1, 2, 3, 4))
        )


# ---------------------------------------------------------------- (d) Shamir and share encryption


def test_shamir_any_t_shares_reconstruct_fewer_cannot():
    secret = bytes(range(100, 132))
    shares = shamir_split(secret, 3, [1, 2, 3, 4, 5], seeded(1))
    for subset in itertools.combinations(shares, 3):
        assert shamir_combine(list(subset), 3) == secret
    with pytest.raises(SecAggError, match="2 share"):
        shamir_combine(shares[:2], 3)


def test_shamir_fewer_than_t_shares_fit_every_secret():
    """Perfect secrecy: for any other secret there is a degree t-1 polynomial through the same
    t-1 shares, so they carry no information about which secret was shared."""
    secret, other = b"\x01" * 32, b"\xfe" * 32
    shares = shamir_split(secret, 3, [1, 2, 3, 4, 5], seeded(2))
    seen = shares[:2]  # t - 1 = 2 shares
    points = [(0, int.from_bytes(other, "big")), *((s.x, s.y) for s in seen)]

    def lagrange(x: int) -> int:  # the unique degree-2 polynomial through the 3 points
        total = 0
        for j, (xj, yj) in enumerate(points):
            num = den = 1
            for m, (xm, _) in enumerate(points):
                if m != j:
                    num, den = num * (x - xm) % PRIME, den * (xj - xm) % PRIME
            total = (total + yj * num * pow(den, -1, PRIME)) % PRIME
        return total

    assert [Share(s.x, lagrange(s.x)) for s in seen] == seen  # the same two shares...
    forged = [*seen, Share(3, lagrange(3))]
    assert shamir_combine(forged, 3) == other  # ...belong to a valid sharing of the other secret
    assert shamir_combine(shares[:3], 3) == secret


def _two_clients_through_stage_one():
    config = dataclasses.replace(SecAggConfig.for_job(SESSION, 4, 3, 1.0), threshold=2)
    server = SecAggServer(config)
    clients = {node: SecAggClient(node, seeded(node)) for node in (1, 2, 3)}
    setup = server.start([1, 2, 3])
    rosters = server.collect_keys({n: c.advertise(setup) for n, c in clients.items()})
    bundles = server.collect_shares({n: c.share_keys(rosters[n]) for n, c in clients.items()})
    return clients, bundles


@pytest.mark.parametrize("where", [0, 5, 12, 40, 100, -1])
def test_a_tampered_share_ciphertext_is_refused_naming_the_sender(where):
    clients, bundles = _two_clients_through_stage_one()
    bundle = bundles[1]
    sender, ciphertext = bundle.ciphertexts[0]
    flipped = bytearray(ciphertext)
    flipped[where] ^= 0x01
    tampered = dataclasses.replace(bundle, ciphertexts=((sender, bytes(flipped)), *bundle.ciphertexts[1:]))
    with pytest.raises(SecAggError, match=f"shares from node {sender} to node 1 fail authentication"):
        clients[1].masked_input(tampered, np.zeros(4), 1)


def test_a_misrouted_or_replayed_share_is_refused():
    clients, bundles = _two_clients_through_stage_one()
    # node 2's ciphertext for node 3, delivered to node 1 as if from node 2
    misrouted = dataclasses.replace(
        bundles[1], ciphertexts=((2, dict(bundles[3].ciphertexts)[2]), (3, dict(bundles[1].ciphertexts)[3]))
    )
    with pytest.raises(SecAggError, match="fail authentication"):
        clients[1].masked_input(misrouted, np.zeros(4), 1)
    # a share bundle of another session
    with pytest.raises(SecAggError, match="another session"):
        clients[1].masked_input(dataclasses.replace(bundles[1], session=b"x" * 32), np.zeros(4), 1)


def test_a_bad_share_from_one_survivor_is_outvoted_by_the_commitment():
    shares = shamir_split(b"\x07" * 32, 3, [1, 2, 3, 4, 5], seeded(3))
    holders = {10 + s.x: s for s in shares}
    holders[11] = Share(1, (holders[11].y + 1) % PRIME)  # one liar
    secret = reconstruct(99, "self-mask seed", holders, 3, lambda s: s == b"\x07" * 32)
    assert secret == b"\x07" * 32
    with pytest.raises(SecAggAbort, match="node 99"):
        reconstruct(99, "self-mask seed", dict(list(holders.items())[:3]), 3, lambda s: s == b"\x07" * 32)


# ---------------------------------------------------------------- messages, state, validation


def test_every_message_round_trips_through_bytes_and_flower_records():
    nodes = [3, 9, 27]
    updates = {node: make_update(node) for node in nodes}
    config = SecAggConfig.for_job(SESSION, DIMENSION, 3, 1.0)
    _, transcript, _ = run_session(config, updates, dict.fromkeys(nodes, 1))
    masked = transcript.masked[9]
    again = MaskedInput.from_bytes(masked.to_bytes())
    assert again.node == 9 and again.session == SESSION and np.array_equal(again.vector, masked.vector)
    content = to_content(masked)
    assert content.array_records["secagg-vector"]["masked"].dtype == "uint64"
    assert len(content.config_records["secagg"]["body"]) < 200  # only the header travels as config
    with pytest.raises(SecAggError, match="expected a 'secagg.unmask-shares' message"):
        from_content(content, UnmaskShares)
    with pytest.raises(SecAggError, match="expected a 'secagg.keys' message"):
        KeyAdvertisement.from_bytes(transcript.unmask[3].to_bytes())
    for bad in [
        b"",
        b"\x80",
        b"[]",
        b'{"kind":"secagg.keys"}',
        transcript.keys[3].to_bytes().replace(b'"node":3', b'"node":-3'),
    ]:
        with pytest.raises(SecAggError):
            KeyAdvertisement.from_bytes(bad)
    truncated = masked.to_bytes()[:-1]
    with pytest.raises(SecAggError, match="bytes for"):
        MaskedInput.from_bytes(truncated)


SECAGG_BOMBS = [
    b"[" * 1500,
    b'{"kind":' * 3000,
    b'{"kind":"x","node":' + b"9" * 5000 + b"}",
    b'{"kind":"x","clip_range":1e999}',
    b'{"kind":"x","kind":"y"}',
    b"[" * 70 + b"]" * 70,
    b"\xff",
]


@pytest.mark.parametrize(
    "kind",
    [KeyAdvertisement, KeyRoster, EncryptedShares, ShareBundle, MaskedInput, UnmaskRequest, UnmaskShares, SetupRequest],
)
def test_parser_bombs_in_a_stage_message_are_a_secagg_error(kind):
    """Deep nesting, a 5000-digit integer, an overflowing float, duplicate keys, bad UTF-8: every
    stage message refuses them as :class:`SecAggError` (what the round records as the node's
    failure), from bytes and from a Flower record, never a RecursionError or a bare ValueError."""
    from flwr.app import ConfigRecord, RecordDict

    for bomb in SECAGG_BOMBS:
        with pytest.raises(SecAggError):
            kind.from_bytes(bomb) if kind is not MaskedInput else MaskedInput._parse_header(bomb)
        with pytest.raises(SecAggError):
            from_content(RecordDict({"secagg": ConfigRecord({"kind": kind.KIND, "body": bomb})}), kind)
    for bomb in SECAGG_BOMBS:
        with pytest.raises(SecAggError):
            SecAggClient.from_bytes(bomb)


def test_client_state_round_trips_and_rejects_junk():
    client = SecAggClient(5, seeded(0))
    client.advertise(SetupRequest(SecAggConfig.for_job(SESSION, 4, 3, 1.0), (1, 5, 9)))
    again = SecAggClient.from_bytes(client.to_bytes())
    assert again.to_bytes() == client.to_bytes() and again.stage == "advertised"
    for junk in [b"not json", b"{}", client.to_bytes().replace(b'"stage": "advertised"', b'"stage": "evil"')]:
        with pytest.raises(SecAggError):
            SecAggClient.from_bytes(junk)


def test_server_drops_a_node_whose_reply_lies_about_who_it_is_or_its_session():
    config = SecAggConfig.for_job(SESSION, 4, 3, 1.0)
    clients = {node: SecAggClient(node, seeded(node)) for node in (1, 2, 3)}
    setup = SetupRequest(config, (1, 2, 3))
    replies = {n: c.advertise(setup) for n, c in clients.items()}
    replies[3] = dataclasses.replace(replies[3], node=2)
    server = SecAggServer(config)
    server.start([1, 2, 3])
    rosters = server.collect_keys(replies)
    assert server.failures == {3: "its reply claims to come from node 2"} and set(rosters) == {1, 2}
    replies[2] = dataclasses.replace(replies[2], session=b"y" * 32)
    server = SecAggServer(config)
    server.start([1, 2, 3])
    with pytest.raises(SecAggAbort, match="1 node\\(s\\) advertised keys, threshold 2"):
        server.collect_keys(replies)
    assert server.failures[2] == "replied for another session"


def test_client_refuses_a_roster_with_other_keys_for_it_and_bad_updates():
    config = SecAggConfig.for_job(SESSION, 4, 3, 1.0, max_weight=10)
    clients = {node: SecAggClient(node, seeded(node)) for node in (1, 2, 3)}
    adverts = {n: c.advertise(SetupRequest(config, (1, 2, 3))) for n, c in clients.items()}
    roster = KeyRoster(
        SESSION, (1, 2, 3), tuple(a.channel_key for a in adverts.values()), tuple(a.mask_key for a in adverts.values())
    )
    swapped = dataclasses.replace(roster, mask_keys=(adverts[2].mask_key, adverts[1].mask_key, adverts[3].mask_key))
    with pytest.raises(SecAggError, match="node 1: the roster carries other keys"):
        SecAggClient.from_bytes(clients[1].to_bytes()).share_keys(swapped)
    server = SecAggServer(config)
    server.start([1, 2, 3])
    rosters = server.collect_keys(adverts)
    bundles = server.collect_shares({n: c.share_keys(rosters[n]) for n, c in clients.items()})
    client = clients[1]
    for update, weight, match in [
        (np.zeros(5), 1, "5 values, the session expects 4"),
        (np.array([0.0, np.nan, 0, 0]), 1, "not a finite"),
        ({"w": torch.tensor([1.0, float("inf"), 0, 0])}, 1, "tensor 'w' has non-finite"),
        ({"w": torch.tensor([1.0, 2.0, 0, 0])}, 1, None),  # strict: outside the clip range
        (np.zeros(4), 11, "weight 11"),
        (np.zeros(4), 2.5, "weight 2.5"),
    ]:
        with pytest.raises(SecAggError, match=match or "tensor 'w' reaches 2, outside the clip range 1.0"):
            SecAggClient.from_bytes(client.to_bytes()).masked_input(bundles[1], update, weight, strict=match is None)
    done = SecAggClient.from_bytes(client.to_bytes())
    done.masked_input(bundles[1], {"w": torch.tensor([1.0, 2.0, 0, -3])}, 1)
    assert done.clipped == 2


def test_flatten_unflatten_round_trip_with_every_float_dtype():
    state = {
        "b": torch.randn(3, 4, dtype=torch.bfloat16),
        "a": torch.randn(5, dtype=torch.float16),
        "c": torch.tensor(1.5, dtype=torch.float32),
        "d": torch.randn(2, 2, dtype=torch.float64),
    }
    vector = flatten_state(state)
    assert vector.dtype == np.float64 and vector.size == 12 + 5 + 1 + 4
    assert vector[:5].tolist() == state["a"].double().tolist()  # sorted-name order
    back = unflatten_state(vector, state)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    with pytest.raises(SecAggError, match="does not fill"):
        unflatten_state(vector[:-1], state)
