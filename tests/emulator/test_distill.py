import torch

from offsite.emulator.distill import DistillConfig, distill, heldout_kd, normalised_mse, tap_pairs
from offsite.emulator.sandwich import SandwichShape, build_emulator
from tests.conftest import VOCAB, tiny_model


def _text_blocks(n, seq_len, seed):
    """Token blocks with structure a model can learn from (a noisy repeating pattern)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.arange(seq_len) % 17 + 3
    noise = torch.randint(0, VOCAB, (n, seq_len), generator=generator)
    keep = torch.rand((n, seq_len), generator=generator) < 0.7
    return torch.where(keep, base.expand(n, -1), noise)


def test_normalised_mse_is_scale_free():
    teacher = torch.randn(2, 5, 8)
    student = teacher + 0.1 * torch.randn(2, 5, 8)
    assert normalised_mse(teacher, teacher) == 0
    torch.testing.assert_close(normalised_mse(10 * teacher, 10 * student), normalised_mse(teacher, student))


def test_tap_pairs():
    layout = [0, 1, 2, 5, 8, 9, 10, 11]  # 12 blocks, 2-4-2
    assert tap_pairs(layout, 2, 2, 12, per_block=False) == [(5, 9)]
    assert tap_pairs(layout, 2, 2, 12, per_block=True) == [(5, 9), (2, 4), (3, 7), (4, 8)]


def test_distillation_cuts_heldout_kd_by_30_percent_against_layer_drop():
    teacher = tiny_model("llama", n_blocks=12, seed=3)
    shape = SandwichShape(2, 3, 2)
    student, layout = build_emulator(teacher, shape)
    layer_drop, _ = build_emulator(teacher, shape)
    train, heldout = _text_blocks(64, 32, seed=0), _text_blocks(8, 32, seed=1)
    config = DistillConfig(steps=80, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5)
    result = distill(teacher, student, layout, 2, 2, train, heldout, config, progress=False)
    plain = heldout_kd(teacher, layer_drop, heldout, layout, 2, 2)
    assert abs(result.heldout_before - plain) < 1e-6
    assert result.heldout_after <= 0.7 * plain
    # only the kept middle blocks moved
    for position in (0, 1, len(layout) - 2, len(layout) - 1):
        for x, y in zip(student.model.layers[position].parameters(), layer_drop.model.layers[position].parameters()):
            assert torch.equal(x, y)
    assert torch.equal(student.lm_head.weight, layer_drop.lm_head.weight)


def test_lm_kl_and_per_block_terms_run():
    teacher = tiny_model("gpt2", n_blocks=8)
    student, layout = build_emulator(teacher, SandwichShape(2, 2, 2))
    blocks = _text_blocks(8, 16, seed=0)
    config = DistillConfig(
        steps=3, batch_size=2, seq_len=16, kd_weight=1.0, lm_weight=0.5, kl_weight=0.5, per_block=True
    )
    result = distill(teacher, student, layout, 2, 2, blocks, blocks[:2], config, progress=False)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_train_top_fits_the_top_blocks_too_and_never_the_bottom():
    teacher = tiny_model("llama", n_blocks=8, seed=2)
    shape = SandwichShape(2, 2, 2)
    untouched, layout = build_emulator(teacher, shape)
    blocks = _text_blocks(8, 16, seed=0)
    config = DistillConfig(steps=2, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, kl_weight=1.0)
    moved = {}
    for train_top in (False, True):
        student, _ = build_emulator(teacher, shape)
        distill(teacher, student, layout, 2, 2, blocks, blocks[:2], config, progress=False, train_top=train_top)
        moved[train_top] = [
            any(
                not torch.equal(x, y)
                for x, y in zip(student.model.layers[p].parameters(), untouched.model.layers[p].parameters())
            )
            for p in range(len(layout))
        ]
        assert not any(p.requires_grad for p in student.parameters())
        assert torch.equal(student.model.embed_tokens.weight, untouched.model.embed_tokens.weight)
    assert moved[False] == [False, False, True, True, False, False]
    assert moved[True] == [False, False, True, True, True, True]


def test_answer_position_kd_is_zero_for_a_keep_all_emulator_and_positive_after_drop():
    from offsite.emulator.distill import answer_position_kd

    teacher = tiny_model("llama", n_blocks=10)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    same, layout = build_emulator(teacher, SandwichShape(2, 6, 2))
    assert answer_position_kd(teacher, same, layout, 2, 2, prompts) == 0.0
    dropped, layout = build_emulator(teacher, SandwichShape(2, 2, 2))
    assert answer_position_kd(teacher, dropped, layout, 2, 2, prompts) > 0.0


def test_sampled_logit_positions_give_the_terms_of_those_positions():
    """The LM and KL terms at sampled positions equal the full-logits terms restricted to those
    positions, through ``logits_to_keep`` (llama) and through slicing (OPT has no such argument);
    with every position the sample is the full sequence."""
    import torch.nn.functional as F

    from offsite.emulator.distill import kd_losses, logit_positions

    generator = torch.Generator().manual_seed(0)
    positions = logit_positions(16, 5, generator)
    assert positions.tolist() == sorted(set(positions.tolist())) and len(positions) == 5 and positions.max() < 15
    assert logit_positions(16, 0) is None and logit_positions(16, 15) is None
    ids = _text_blocks(2, 16, seed=2)
    config = DistillConfig(kd_weight=1.0, lm_weight=1.0, kl_weight=1.0)
    for family in ("llama", "opt"):
        teacher = tiny_model(family, n_blocks=8)
        student, layout = build_emulator(teacher, SandwichShape(2, 2, 2))
        pairs = tap_pairs(layout, 2, 2, 8, per_block=False)
        with torch.no_grad():
            sampled = kd_losses(teacher, student, ids, pairs, config, positions)
            every = kd_losses(teacher, student, ids, pairs, config, None)
            t_logits = teacher(input_ids=ids).logits[:, positions]
            s_logits = student(input_ids=ids).logits[:, positions]
        vocab = s_logits.shape[-1]
        lm = F.cross_entropy(s_logits.reshape(-1, vocab), ids[:, positions + 1].reshape(-1))
        kl = (t_logits.softmax(-1) * (t_logits.log_softmax(-1) - s_logits.log_softmax(-1))).sum(-1).mean()
        torch.testing.assert_close(sampled["lm"], lm)
        torch.testing.assert_close(sampled["kl"], kl)
        torch.testing.assert_close(sampled["kd"], every["kd"])
        assert not torch.isclose(sampled["kl"], every["kl"])
