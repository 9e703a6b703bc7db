"""The plug-in gain: real + gain * (tuned - real), for whole blocks and for merged LoRA."""

from __future__ import annotations

import math

import pytest
import torch

from offsite.cloud.plugin import adapter_from_update, plug_in_update
from offsite.emulator.lora import lora_is_transposed
from offsite.emulator.sandwich import adapter_state_dict, plug_in
from tests.conftest import VOCAB, tiny_model

BLOCKS = [0, 1, 6, 7]


def _tuned(model, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    own = adapter_state_dict(model, list(range(8)), BLOCKS)
    return own, {key: value + scale * torch.randn(value.shape, generator=generator) for key, value in own.items()}


def _logits(model, seed=3):
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_gain_one_plugs_in_as_tuned_and_gain_zero_leaves_the_model(family):
    model = tiny_model(family)
    _, tuned = _tuned(model)
    assert adapter_from_update(model, tuned, BLOCKS) is tuned  # the default path is untouched
    assert torch.equal(_logits(plug_in_update(model, tuned, BLOCKS, gain=1.0)), _logits(plug_in(model, tuned)))
    assert torch.equal(_logits(plug_in_update(model, tuned, BLOCKS, gain=0.0)), _logits(model))


def test_gain_scales_what_tuning_changed_in_every_block_tensor(family):
    model = tiny_model(family)
    own, tuned = _tuned(model)
    for gain in (0.5, 2.0):
        scaled = adapter_from_update(model, tuned, BLOCKS, gain=gain)
        assert set(scaled) == set(own)
        for key in own:
            torch.testing.assert_close(scaled[key] - own[key], gain * (tuned[key] - own[key]), rtol=1e-5, atol=1e-7)
    half, double = (_logits(plug_in_update(model, tuned, BLOCKS, gain=g)) for g in (0.5, 2.0))
    assert not torch.allclose(half, double, atol=1e-4)


def test_gain_on_lora_scales_the_merged_change(family):
    model = tiny_model(family)
    own = adapter_state_dict(model, list(range(8)), BLOCKS)
    generator = torch.Generator().manual_seed(1)
    stem = "blocks.1." + ("attn.c_attn" if family == "gpt2" else "self_attn.q_proj")
    weight = own[stem + ".weight"]
    out_features, in_features = weight.shape[::-1] if lora_is_transposed(model) else weight.shape
    factors = {
        stem + ".lora_A": torch.randn(2, in_features, generator=generator),
        stem + ".lora_B": torch.randn(out_features, 2, generator=generator),
    }
    once = adapter_from_update(model, factors, BLOCKS, lora_alpha=4.0)
    thrice = adapter_from_update(model, factors, BLOCKS, lora_alpha=4.0, gain=3.0)
    changed = [key for key in own if not torch.equal(once[key], own[key])]
    assert changed == [stem + ".weight"]
    torch.testing.assert_close(
        thrice[stem + ".weight"] - weight, 3.0 * (once[stem + ".weight"] - weight), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("gain", [-0.1, math.nan, math.inf])
def test_a_negative_or_non_finite_gain_is_refused(gain):
    model = tiny_model("llama")
    _, tuned = _tuned(model)
    with pytest.raises(ValueError, match="plug-in gain must be a finite number >= 0"):
        adapter_from_update(model, tuned, BLOCKS, gain=gain)


def test_an_update_that_misses_a_block_tensor_is_named():
    model = tiny_model("llama")
    _, tuned = _tuned(model)
    missing = sorted(tuned)[0]
    del tuned[missing]
    with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
        adapter_from_update(model, tuned, BLOCKS, gain=2.0)


def test_extrapolation_keeps_float64_precision_and_the_dtype():
    from offsite.cloud.plugin import extrapolate

    generator = torch.Generator().manual_seed(4)
    real = torch.randn(64, 64, generator=generator, dtype=torch.float64)
    tuned = real + 1e-9 * torch.randn(64, 64, generator=generator, dtype=torch.float64)  # below float32's resolution
    out = extrapolate(real, tuned, 1.5)
    assert out.dtype == torch.float64
    assert torch.equal(out, real + 1.5 * (tuned - real))
    half = extrapolate(real.to(torch.bfloat16), tuned.to(torch.bfloat16), 1.5)
    assert half.dtype == torch.bfloat16
