"""Quantised emulators: every kept middle block's linear weights rounded to a few bits."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from offsite.emulator.arch import get_path, spec_for
from offsite.emulator.quantize import Quantize, RoundingNoise, quantize_blocks
from tests.conftest import tiny_model


def linear_weights(block):
    """(name, weight as out x in) of every linear map, as the quantiser sees them."""
    return [
        (name, m.weight.t() if isinstance(m, Conv1D) else m.weight)
        for name, m in block.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D))
    ]


def test_each_group_takes_at_most_2_to_the_bits_levels_and_the_widths_cycle(family):
    model = tiny_model(family, n_blocks=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = Quantize((2, 4), group=16)
    quantize_blocks(model, [1, 2, 3, 4], spec)
    blocks = get_path(model, spec_for(model).blocks)
    original = tiny_model(family, n_blocks=6)  # same seed: the weights before rounding
    original_blocks = get_path(original, spec_for(original).blocks)
    for position, block in enumerate(blocks):
        weights = linear_weights(block)
        assert weights, f"{family}: block {position} has no linear maps to check"
        for (name, weight), (_, reference) in zip(weights, linear_weights(original_blocks[position])):
            if position in (0, 5):  # not listed: untouched, bit for bit
                assert torch.equal(weight, reference), (family, position, name)
                continue
            bits = spec.bits[(position - 1) % 2]
            groups, ref = weight.reshape(-1, 16), reference.reshape(-1, 16)
            assert max(len(torch.unique(g)) for g in groups) <= 2**bits, (family, position, name)
            # the nearest level: off by at most half a step of the group's own range
            step = (ref.amax(-1, keepdim=True) - ref.amin(-1, keepdim=True)) / (2**bits - 1)
            assert ((groups - ref).abs() <= step / 2 + 1e-6).all(), (family, position, name)
            assert not torch.equal(weight, reference)
    # norms, biases and embeddings are not linear weights: left as they were
    for key, tensor in model.state_dict().items():
        if not key.endswith("weight") or "norm" in key or "ln" in key or "embed" in key or "wte" in key or "wpe" in key:
            assert torch.equal(tensor, before[key]), key


def test_more_bits_stay_closer_to_the_original():
    errors = {}
    for bits in (2, 3, 4, 8):
        model = tiny_model("llama", n_blocks=4)
        quantize_blocks(model, [1, 2], Quantize((bits,), 16))
        reference = tiny_model("llama", n_blocks=4)
        errors[bits] = sum((a - b).pow(2).sum().item() for a, b in zip(model.parameters(), reference.parameters()))
    assert errors[2] > errors[3] > errors[4] > errors[8] > 0


def test_bad_specs_are_refused_with_the_reason():
    assert Quantize.parse("3,4", 16) == Quantize((3, 4), 16)
    assert str(Quantize((3, 3, 4), 16)) == "q334g16"
    with pytest.raises(ValueError, match="integers like 3"):
        Quantize.parse("three")
    with pytest.raises(ValueError, match="1-8"):
        Quantize((0,))
    with pytest.raises(ValueError, match="1-8"):
        Quantize((3, 9))
    with pytest.raises(ValueError, match="group must be >= 1"):
        Quantize((3,), 0)
    model = tiny_model("llama", n_blocks=4)
    with pytest.raises(ValueError, match="group 64 does not divide the 32 input columns of block 1's self_attn.q_proj"):
        quantize_blocks(model, [1, 2], Quantize((3,), 64))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_model("llama", n_blocks=4).parameters()))


def test_rounding_noise_draws_inside_the_cells_the_real_weights_lie_in(family):
    """The cells are read from the rounded weights alone, and they hold the real weights; draws
    stay inside them (scaled), differ from draw to draw, and restore() gives back the rounded
    weights bit for bit."""
    spec, positions = Quantize((2, 3), group=16), [1, 2, 3]
    model = tiny_model(family, n_blocks=5)
    quantize_blocks(model, positions, spec)
    rounded = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = get_path(model, spec_for(model).blocks)
    shipped = {p: [(name, w.detach().clone()) for name, w in linear_weights(blocks[p])] for p in positions}
    real = get_path(tiny_model(family, n_blocks=5), spec_for(model).blocks)  # same seed: before rounding
    noise = RoundingNoise(model, positions, spec, scale=0.5, seed=0)
    draws = []
    for _ in range(2):
        noise.sample()
        draws.append({k: v.clone() for k, v in model.state_dict().items()})
        for index, position in enumerate(positions):
            levels = 2 ** spec.bits[index % 2] - 1
            triples = zip(shipped[position], linear_weights(blocks[position]), linear_weights(real[position]))
            for (name, ship), (_, drawn), (_, truth) in triples:
                ship, drawn, truth = ship.reshape(-1, 16), drawn.reshape(-1, 16), truth.reshape(-1, 16)
                step = (ship.amax(-1, keepdim=True) - ship.amin(-1, keepdim=True)) / levels
                assert ((truth - ship).abs() <= step / 2 + 1e-6).all(), (
                    family,
                    position,
                    name,
                )  # the real weights' cell
                assert ((drawn - ship).abs() <= 0.5 * step / 2 + 1e-6).all(), (family, position, name)  # scale 0.5
                assert not torch.equal(drawn, ship), (family, position, name)
    assert any(not torch.equal(draws[0][k], draws[1][k]) for k in rounded)
    # a draw moves exactly the tensors rounding moved
    original = tiny_model(family, n_blocks=5).state_dict()
    moved = {k for k in rounded if not torch.equal(draws[0][k], rounded[k])}
    assert moved == {k for k in rounded if not torch.equal(rounded[k], original[k])}
    noise.restore()
    assert all(torch.equal(v, rounded[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="scale must be > 0"):
        RoundingNoise(model, [1], spec, scale=0)
