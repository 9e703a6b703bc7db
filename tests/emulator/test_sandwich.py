import pytest
import torch

from offsite.emulator.arch import UnsupportedModelError, spec_for, spec_for_model_type
from offsite.emulator.sandwich import (
    SandwichShape,
    adapter_state_dict,
    build_emulator,
    load_adapter_state,
    num_blocks,
    plug_in,
    with_layout,
)
from tests.conftest import VOCAB, tiny_model


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_registry_covers_every_family(family):
    model = tiny_model(family)
    spec = spec_for(model)
    assert num_blocks(model) == 8
    assert spec.family in {"llama", "gpt2", "opt"}


def test_unknown_family_is_named():
    with pytest.raises(UnsupportedModelError, match="bert"):
        spec_for_model_type("bert")


def test_keep_all_emulator_reproduces_the_model(family):
    model = tiny_model(family)
    n = num_blocks(model)
    shape = SandwichShape(2, n - 4, 2)  # keeps every middle block
    emulator, layout = build_emulator(model, shape)
    assert layout == list(range(n))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(emulator(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_layer_drop_changes_the_model_and_keeps_the_ends(family):
    model = tiny_model(family, n_blocks=10)
    emulator, layout = build_emulator(model, SandwichShape(2, 3, 2))
    assert layout == [0, 1, 2, 4, 7, 8, 9]  # round(2.5) == 2: Python rounds half to even, as the reference does
    assert num_blocks(emulator) == 7
    ids = _ids()
    with torch.no_grad():
        assert not torch.allclose(emulator(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.parametrize(
    "shape, n, kept",
    [
        ("2-10-2", 30, [2, 5, 8, 10, 13, 16, 19, 21, 24, 27]),
        ("2-2-2", 30, [2, 27]),
        ("1-1-1", 5, [1]),
        ("2-26-2", 30, list(range(2, 28))),
    ],
)
def test_uniform_selection(shape, n, kept):
    assert SandwichShape.parse(shape).kept_middle(n) == kept


@pytest.mark.parametrize("text", ["2-10", "a-b-c", "0-3-0", "2-0-2"])
def test_bad_shapes_are_rejected(text):
    with pytest.raises(ValueError):
        SandwichShape.parse(text)


def test_shape_too_deep_for_model():
    with pytest.raises(ValueError, match="middle has only"):
        SandwichShape(2, 10, 2).kept_middle(8)


def test_untouched_adapter_plugs_in_exactly(family):
    model = tiny_model(family)
    emulator, layout = build_emulator(model, SandwichShape(2, 2, 2))
    adapter = adapter_state_dict(emulator, layout, SandwichShape(2, 2, 2).adapter_blocks(8))
    plugged = plug_in(model, adapter)
    ids = _ids(1)
    with torch.no_grad():
        assert torch.equal(plugged(ids).logits, model(ids).logits)


def test_tuned_adapter_changes_the_plug_in(family):
    model = tiny_model(family)
    shape = SandwichShape(2, 2, 2)
    emulator, layout = build_emulator(model, shape)
    adapter = adapter_state_dict(emulator, layout, shape.adapter_blocks(8))
    key = sorted(adapter)[-1]
    # a random change: a constant shift could vanish in a LayerNorm
    adapter[key] = adapter[key] + 0.5 * torch.randn(adapter[key].shape, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugged = plug_in(model, adapter)
    ids = _ids(2)
    with torch.no_grad():
        assert not torch.allclose(plugged(ids).logits, model(ids).logits, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is untouched


def test_adapter_keys_are_checked():
    model = tiny_model("llama")
    layout = list(range(8))
    state = adapter_state_dict(model, layout, [0, 7])
    with pytest.raises(KeyError, match="block 9"):
        load_adapter_state(model, layout, {"blocks.9.mlp.up_proj.weight": torch.zeros(1)})
    bad = dict(state)
    key = next(k for k in bad if k.endswith("up_proj.weight"))
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=key):
        load_adapter_state(model, layout, bad)


def test_blocks_are_renumbered_for_the_kv_cache():
    model = tiny_model("llama", n_blocks=10)
    emulator, layout = build_emulator(model, SandwichShape(2, 3, 2))
    blocks = emulator.model.layers
    assert [b.self_attn.layer_idx for b in blocks] == list(range(len(layout)))
    out = emulator.generate(_ids(3, (1, 5)), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_with_layout_leaves_the_source_alone():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = with_layout(model, [0, 3, 7])
    for param in copy.parameters():
        param.data.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert num_blocks(model) == 8
