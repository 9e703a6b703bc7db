import torch

from offsite.emulator.data import MCRow, collate, encode_pair
from offsite.emulator.score import _plan_mc, answer_logprobs, score_mc
from tests.conftest import tiny_model


def test_answer_logprobs_match_full_logits(tokenizer, family):
    model = tiny_model(family)
    encoded = [
        encode_pair(tokenizer, "A prompt", " yes", 32),
        encode_pair(tokenizer, "Another, longer prompt", " no!", 32),
    ]
    batch = collate(encoded, pad_id=0)
    with torch.no_grad():
        fast = answer_logprobs(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logprobs = torch.log_softmax(logits.float(), -1)
    for row, (ids, start) in enumerate(encoded):
        expected = sum(logprobs[row, t - 1, ids[t]].item() for t in range(start, len(ids)))
        assert abs(fast[row].item() - expected) < 1e-4


def test_score_mc_picks_the_most_likely_choice(tokenizer):
    model = tiny_model("llama")
    rows = [MCRow("Pick:", (" a", " bb", " c"), 0), MCRow("Again:", (" x", " y"), 1)]
    result = score_mc(model, tokenizer, rows, batch_size=2)
    for row, prediction in zip(rows, result.predictions):
        scores = []
        for choice in row.choices:
            batch = collate([encode_pair(tokenizer, row.prompt, choice, 64)], 0)
            with torch.no_grad():
                scores.append(answer_logprobs(model, batch).item())
        assert prediction == max(range(len(scores)), key=scores.__getitem__)
    assert result.correct == sum(p == r.answer for p, r in zip(result.predictions, rows))


def test_shared_prompt_scoring_equals_pairwise_scoring(tokenizer, family):
    """Single-token choices share their prompt's pass; other rows take the whole-sequence path."""
    model = tiny_model(family)
    rows = [MCRow(f"Prompt number {i}" + "!" * (i % 3), ("a", "b", "c"), i % 3) for i in range(7)]  # one token each
    rows += [MCRow("Longer choices:", (" abc", " d"), 0), MCRow("x", (" yes", " no"), 1)]
    result = score_mc(model, tokenizer, rows, batch_size=3)
    for row, scores in zip(rows, result.scores):
        for choice, score in zip(row.choices, scores):
            batch = collate([encode_pair(tokenizer, row.prompt, choice, 64)], 0)
            with torch.no_grad():
                assert abs(answer_logprobs(model, batch).item() - score) < 1e-4
    assert result.predictions == [max(range(len(s)), key=s.__getitem__) for s in result.scores]


def test_multi_token_choices_on_the_prompts_keys_and_values_equal_pairwise_scoring(tokenizer, family):
    """Choices of several tokens, of unequal lengths and counts, run on their prompt's cached keys
    and values (right-padded, several prompt lengths, batches that split groups): every choice's
    log-likelihood is the one scoring the pair alone gives."""
    model = tiny_model(family)
    rows = [
        MCRow(
            f"Define word {i}{'?' * (i % 4)}\nAnswer:",
            tuple(f" the {'long ' * ((i + c) % 4)}choice {c}" for c in range(2 + i % 3)),
            0,
        )
        for i in range(9)
    ]
    plan = _plan_mc(tokenizer, rows, 64)
    assert sorted(r for group in plan.shared.values() for r in group) == list(range(9)) and not plan.pairs
    assert len(plan.shared) > 1 and any(len(tokens) > 2 for row in plan.choice_ids for tokens in row)
    result = score_mc(model, tokenizer, rows, batch_size=2)
    for row, scores in zip(rows, result.scores):
        for choice, score in zip(row.choices, scores):
            batch = collate([encode_pair(tokenizer, row.prompt, choice, 64)], 0)
            with torch.no_grad():
                assert abs(answer_logprobs(model, batch).item() - score) < 1e-4, (family, row.prompt, choice)


def test_sft_nll_equals_an_independent_cross_entropy_over_the_completion_tokens(tokenizer):
    """score_sft against the model's own loss on labels that mask the prompt: tokens pooled over rows."""
    import math

    import torch.nn.functional as F

    from offsite.emulator.data import Example
    from offsite.emulator.score import score_sft

    model = tiny_model("llama")
    rows = [
        Example("Entry: foo\n", " a word that means bar"),
        Example("Entry: x\n", " y"),
        Example("Q", " a much longer answer, with commas"),
    ]
    result = score_sft(model, tokenizer, rows, batch_size=2)
    total, tokens, per_row = 0.0, 0, []
    for row in rows:
        context = tokenizer(row.prompt, add_special_tokens=True)["input_ids"]
        completion = tokenizer(row.completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        targets = ids[0, 1:].clone()
        targets[: len(context) - 1] = -100  # the prompt is context only
        nll = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        total, tokens = total + nll, tokens + len(completion)
        per_row.append(nll)
    assert result.tokens == tokens and result.rows == 3
    assert abs(result.nll - total / tokens) < 1e-4
    assert all(abs(a - b) < 1e-3 for a, b in zip(result.row_nll, per_row))
    assert math.isclose(result.perplexity, math.exp(result.nll))
    assert result.stderr > 0


def test_sft_stderr_is_zero_when_every_row_has_the_same_per_token_nll():
    from offsite.emulator.score import SFTResult

    same = SFTResult(nll=2.0, rows=3, tokens=6, row_nll=[2.0, 4.0, 6.0], row_tokens=[1, 2, 3])
    assert same.stderr == 0.0
    spread = SFTResult(nll=2.0, rows=3, tokens=6, row_nll=[1.0, 5.0, 6.0], row_tokens=[1, 2, 3])
    assert spread.stderr > 0.1


def test_acc_norm_divides_by_the_choice_length_and_can_disagree_with_acc(tokenizer):
    """A row whose long choice has the lower summed log-likelihood but the higher per-character one."""
    from offsite.emulator.score import normalised_predictions

    rows = [MCRow("Pick:", (" a", " a much longer choice"), 1)]
    scores = [[-3.0, -10.0]]  # acc picks 0; per character: -1.5 against -0.5, acc_norm picks 1
    assert normalised_predictions(rows, scores) == [1]
    model = tiny_model("llama")
    result = score_mc(model, tokenizer, rows * 2, batch_size=2)
    expected = [max(range(2), key=lambda c: s[c] / len(rows[0].choices[c])) for s in result.scores]
    assert result.norm_predictions == expected
    assert result.acc_norm == sum(p == 1 for p in expected) / 2
