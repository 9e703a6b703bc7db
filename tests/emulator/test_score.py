import torch

from offsite.emulator.data import MCRow, collate, encode_pair
from offsite.emulator.score import answer_logprobs, score_mc
from tests.conftest import tiny_model


def test_answer_logprobs_match_full_logits(tokenizer, family):
    model = tiny_model(family)
    encoded = [encode_pair(tokenizer, "A prompt", " yes", 32), encode_pair(tokenizer, "Another, longer prompt", " no!", 32)]
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
