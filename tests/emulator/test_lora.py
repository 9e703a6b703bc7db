import torch

from offsite.emulator.lora import (
    LoRASpec,
    attach_lora,
    load_lora_state,
    lora_is_transposed,
    lora_state_dict,
    merge_lora,
)
from offsite.emulator.sandwich import SandwichShape, adapter_state_dict, build_emulator, plug_in
from tests.conftest import VOCAB, tiny_model


def test_merged_lora_equals_unmerged_and_differs_from_base(family):
    model = tiny_model(family)
    shape = SandwichShape(2, 2, 2)
    adapter_blocks = shape.adapter_blocks(8)
    emulator, layout = build_emulator(model, shape)
    base_adapter = adapter_state_dict(emulator, layout, adapter_blocks)
    spec = LoRASpec(rank=4, alpha=8.0)
    attach_lora(emulator, layout, adapter_blocks, spec, seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # give B non-zero values, as training would
        for name, param in emulator.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    factors = lora_state_dict(emulator, layout)
    assert factors and all(k.startswith("blocks.") for k in factors)

    merged = merge_lora(base_adapter, factors, spec.alpha, transposed=lora_is_transposed(model))
    full_layout = list(range(8))
    unmerged_full = plug_in(model, base_adapter)
    attach_lora(unmerged_full, full_layout, adapter_blocks, spec)
    load_lora_state(unmerged_full, full_layout, factors)
    merged_full = plug_in(model, merged)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        merged_logits = merged_full(ids).logits
        torch.testing.assert_close(merged_logits, unmerged_full(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged_logits, model(ids).logits, atol=1e-4)


def test_fresh_lora_is_a_no_op():
    model = tiny_model("llama")
    layout = list(range(8))
    copy = plug_in(model, {})
    attach_lora(copy, layout, [0, 1, 6, 7], LoRASpec(rank=2, alpha=4))
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, model(ids).logits)
