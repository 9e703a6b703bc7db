import dataclasses

import pytest
import torch

from offsite.emulator.data import Example
from offsite.emulator.lora import LoRASpec
from offsite.emulator.sandwich import SandwichShape, adapter_state_dict, build_emulator, plug_in
from offsite.emulator.tune import StochasticDepth, TuneConfig, lr_at, pick_device, tune_adapter
from tests.conftest import tiny_model

EXAMPLES = [Example(f"Item {i}: colour?", " red" if i % 2 else " blue") for i in range(16)]


def _setup(family="llama"):
    model = tiny_model(family)
    shape = SandwichShape(2, 2, 2)
    emulator, layout = build_emulator(model, shape)
    return emulator, layout, shape.adapter_blocks(8)


def _block_params(model, layout):
    blocks = model.model.layers
    return {layout[p]: [t.clone() for t in blocks[p].parameters()] for p in range(len(layout))}


def test_blocks_mode_learns_and_touches_only_the_adapter(tokenizer):
    emulator, layout, adapter_blocks = _setup()
    before = _block_params(emulator, layout)
    embed = emulator.model.embed_tokens.weight.clone()
    config = TuneConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, device="cpu")
    result = tune_adapter(emulator, tokenizer, layout, adapter_blocks, EXAMPLES, config, a=2, progress=False)
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    after = _block_params(emulator, layout)
    for original in layout:
        changed = any(not torch.equal(x, y) for x, y in zip(before[original], after[original]))
        assert changed == (original in adapter_blocks), original
    assert torch.equal(embed, emulator.model.embed_tokens.weight)
    assert {int(k.split(".")[1]) for k in result.adapter} == set(adapter_blocks)
    assert not any(t.requires_grad for t in emulator.parameters())


def test_lora_mode_returns_only_factors(tokenizer):
    emulator, layout, adapter_blocks = _setup()
    config = TuneConfig(steps=10, batch_size=4, lr=1e-2, mode="lora", lora=LoRASpec(rank=2, alpha=4), device="cpu")
    result = tune_adapter(emulator, tokenizer, layout, adapter_blocks, EXAMPLES, config, a=2, progress=False)
    assert result.adapter and all(k.endswith(("lora_A", "lora_B")) for k in result.adapter)
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in result.adapter.items())


def test_train_top_only_leaves_the_bottom_alone(tokenizer):
    emulator, layout, adapter_blocks = _setup()
    before = _block_params(emulator, layout)
    config = TuneConfig(steps=3, batch_size=4, lr=1e-2, train="top", device="cpu")
    tune_adapter(emulator, tokenizer, layout, adapter_blocks, EXAMPLES, config, a=2, progress=False)
    after = _block_params(emulator, layout)
    assert all(torch.equal(x, y) for x, y in zip(before[0], after[0]))
    assert any(not torch.equal(x, y) for x, y in zip(before[7], after[7]))


def test_prox_keeps_the_adapter_closer(tokenizer):
    distances = []
    for prox in (0.0, 50.0):
        emulator, layout, adapter_blocks = _setup()
        start = {k: v.clone() for k, v in emulator.state_dict().items()}
        config = TuneConfig(steps=15, batch_size=8, lr=3e-3, prox=prox, device="cpu", max_grad_norm=0.0)
        tune_adapter(emulator, tokenizer, layout, adapter_blocks, EXAMPLES, config, a=2, progress=False)
        distances.append(sum((v - start[k]).pow(2).sum().item() for k, v in emulator.state_dict().items()))
    assert distances[1] < distances[0]


def test_schedule_warms_up_then_decays():
    config = TuneConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(99, config) < 0.01
    assert lr_at(50, dataclasses.replace(config, schedule="constant")) == 1.0


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (dict(steps=0), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(prox=-1.0), "prox"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(max_length=1), "max_length"),
        (dict(schedule="linear"), "schedule"),
        (dict(mode="full"), "mode"),
        (dict(train="middle"), "train"),
    ],
)
def test_bad_configs_are_rejected(bad, named):
    with pytest.raises(ValueError, match=named):
        TuneConfig(**bad)


def test_middle_drop_is_a_probability():
    with pytest.raises(ValueError, match="middle_drop"):
        tune_adapter(None, None, [0], [0], EXAMPLES, TuneConfig(), a=1, middle_drop=1.0)


def test_stochastic_depth_keeps_the_adapter_and_varies_the_middle():
    layout = [0, 1, 2, 5, 8, 11, 12, 13]
    depth = StochasticDepth(layout, [0, 1, 12, 13], drop=0.5, seed=0)
    samples = [depth.sample() for _ in range(50)]
    assert all({0, 1, 6, 7} <= set(s) and len(s) >= 5 and s == sorted(s) for s in samples)
    assert len({tuple(s) for s in samples}) > 3
    assert StochasticDepth(layout, [0, 1, 12, 13], drop=0.0, seed=0).sample() == list(range(8))


def test_middle_drop_tunes_and_restores_the_model(tokenizer):
    emulator, layout, adapter_blocks = _setup()
    config = TuneConfig(steps=4, batch_size=4, lr=1e-3, device="cpu")
    tune_adapter(emulator, tokenizer, layout, adapter_blocks, EXAMPLES, config, a=2, progress=False, middle_drop=0.5)
    assert len(emulator.model.layers) == len(layout) and emulator.config.num_hidden_layers == len(layout)


def test_adapter_tuned_on_a_keep_all_emulator_plugs_in_to_the_same_model(tokenizer, family):
    """With nothing dropped, emulator-FT and plug-in are the same model: any gap is a plug-in bug."""
    model = tiny_model(family)
    shape = SandwichShape(2, 4, 2)
    emulator, layout = build_emulator(model, shape)
    config = TuneConfig(steps=5, batch_size=4, lr=3e-3, device="cpu")
    result = tune_adapter(emulator, tokenizer, layout, shape.adapter_blocks(8), EXAMPLES, config, a=2, progress=False)
    plugged = plug_in(model, result.adapter)
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = emulator(ids).logits
        assert torch.equal(plugged(ids).logits, tuned)
        assert not torch.allclose(tuned, model(ids).logits, atol=1e-4)


def test_on_step_sees_every_step_and_the_adapter_as_it_is_then(tokenizer):
    """The hook runs after each optimiser step, 1-based, with the model mid-tuning: the adapter it
    reads at the last step is the one returned, and an early one differs from it."""
    emulator, layout, adapter_blocks = _setup()
    seen = {}

    def record(step, model):
        seen[step] = adapter_state_dict(model, layout, adapter_blocks)

    config = TuneConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, device="cpu")
    result = tune_adapter(
        emulator, tokenizer, layout, adapter_blocks, EXAMPLES, config, a=2, progress=False, on_step=record
    )
    assert sorted(seen) == [1, 2, 3, 4]
    assert all(torch.equal(seen[4][k], v) for k, v in result.adapter.items())
    assert any(not torch.equal(seen[1][k], v) for k, v in result.adapter.items())


@pytest.mark.parametrize("mode", ["blocks", "lora"])
def test_activation_checkpointing_tunes_the_same_adapter(tokenizer, mode):
    """The memory-saving path (checkpointed blocks, the head and loss in chunks) is the same
    arithmetic: the same losses and the same tuned adapter."""
    results = []
    for checkpointing in (False, True):
        emulator, layout, adapter_blocks = _setup()
        config = TuneConfig(steps=4, batch_size=8, lr=3e-3, device="cpu", mode=mode)
        results.append(
            tune_adapter(
                emulator,
                tokenizer,
                layout,
                adapter_blocks,
                EXAMPLES,
                config,
                a=2,
                progress=False,
                checkpointing=checkpointing,
            )
        )
        assert not emulator.is_gradient_checkpointing  # left as found
    plain, saved = results
    assert saved.losses == pytest.approx(plain.losses, rel=1e-5)
    assert set(saved.adapter) == set(plain.adapter)
    for key, tensor in plain.adapter.items():
        torch.testing.assert_close(saved.adapter[key], tensor, atol=1e-5, rtol=1e-4)
    assert plain.losses[-1] < plain.losses[0]  # it did tune


def test_the_chunked_loss_equals_the_whole_one(tokenizer):
    from offsite.emulator.data import ExampleStream
    from offsite.emulator.score import answer_loss

    emulator, layout, adapter_blocks = _setup()
    batch = ExampleStream(tokenizer, EXAMPLES, 8, 64, seed=0).next()
    block = emulator.model.layers[0].mlp.up_proj.weight
    block.requires_grad_(True)
    grads = []
    for chunk in (None, 3):  # 3 answer positions per chunk: several chunks, the last one short
        loss = answer_loss(emulator, batch, chunk)
        (grad,) = torch.autograd.grad(loss, block)
        grads.append((loss.detach(), grad))
    (whole, whole_grad), (chunked, chunked_grad) = grads
    assert int((batch.labels[:, 1:] != -100).sum()) > 6
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked_grad, whole_grad, atol=1e-6, rtol=1e-5)


def test_frozen_a_trains_b_only(tokenizer):
    emulator, layout, adapter_blocks = _setup()
    lora = LoRASpec(rank=4, alpha=8.0, freeze_a=True, init_seed=7)
    config = TuneConfig(steps=3, batch_size=8, lr=3e-3, device="cpu", mode="lora", lora=lora)
    result = tune_adapter(emulator, tokenizer, layout, adapter_blocks, EXAMPLES, config, a=2, progress=False)
    assert result.adapter and all(key.endswith(".lora_B") for key in result.adapter)
    assert any(float(t.abs().max()) > 0 for t in result.adapter.values())  # B moved from zero
    # A is the seed's, untouched: a second emulator with the same seed draws the same A
    block = emulator.model.layers[0].self_attn.q_proj
    other, _, _ = _setup()
    config_other = dataclasses.replace(config, steps=1, lr=1e-9)
    tune_adapter(other, tokenizer, layout, adapter_blocks, EXAMPLES, config_other, a=2, progress=False)
    assert torch.equal(block.lora_A, other.model.layers[0].self_attn.q_proj.lora_A)
