"""The experiment scripts' own logic: the diagnostics `experiments/trajectory.py` reports next to
accuracy (margin AUC, batch-calibrated accuracy) and the table `experiments/knob.py` builds from
its records."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from offsite.emulator.data import MCRow
from offsite.emulator.score import MCResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from knob import knob_rows, read_records  # noqa: E402
from trajectory import batch_calibrated, margin_auc  # noqa: E402


def result(scores: list[list[float]]) -> MCResult:
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    return MCResult(accuracy=0.0, rows=len(scores), correct=0, predictions=predictions, scores=scores)


def rows(answers: list[int], k: int = 2) -> list[MCRow]:
    return [MCRow("p", tuple("abcd"[:k]), a) for a in answers]


def brute_auc(margins, answers) -> float:
    pairs = [(x, y) for x, a in zip(margins, answers) if a == 0 for y, b in zip(margins, answers) if b == 1]
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs) / len(pairs)


def test_margin_auc_is_the_pairwise_ranking_rate_and_ignores_a_shifted_threshold():
    rng = random.Random(0)
    answers = [rng.randrange(2) for _ in range(60)]
    scores = [[rng.gauss(0, 1) + (a == 0), rng.gauss(0, 1) + (a == 1)] for a in answers]
    auc = margin_auc(result(scores), rows(answers))
    assert auc == pytest.approx(brute_auc([s[0] - s[1] for s in scores], answers))
    assert 0.6 < auc < 1.0  # the scores carry the signal they were built with
    # A bias toward the second choice moves every prediction to it (accuracy = that label's share)
    # and leaves the AUC and the batch-calibrated accuracy where they were.
    biased = [[s[0] - 50.0, s[1]] for s in scores]
    assert result(biased).predictions == [1] * len(answers)
    assert margin_auc(result(biased), rows(answers)) == pytest.approx(auc)
    assert batch_calibrated(result(biased), rows(answers)) == batch_calibrated(result(scores), rows(answers))
    flipped = [[s[1], s[0]] for s in scores]
    assert margin_auc(result(flipped), rows(answers)) == pytest.approx(1.0 - auc)


def test_diagnostics_are_none_where_they_do_not_apply():
    assert margin_auc(result([[0.0, 1.0, 2.0]] * 2), rows([0, 2], k=3)) is None
    assert batch_calibrated(result([[0.0, 1.0, 2.0]] * 2), rows([0, 2], k=3)) is None
    assert margin_auc(result([[0.0, 1.0]] * 3), rows([1, 1, 1])) is None  # one class only: undefined


def test_knob_rows_join_fidelity_to_results_and_average_over_seeds(tmp_path):
    def step(name, seed, plug, emu, auc=None, step=120, rows=300, schedule="constant"):
        return {
            "recipe": name,
            "task": "hyperbaton",
            "seed": seed,
            "step": step,
            "gamma": 1.0,
            "rows": rows,
            "schedule": schedule,
            "emulator_ft": emu,
            "plug_in": plug,
            "auc": {"emulator_ft": None, "plug_in": auc},
            "calibrated": {"emulator_ft": None, "plug_in": None},
        }

    def fidelity(name, ce, rows=300):
        return {
            "task": "hyperbaton",
            "emulator": name,
            "rows": rows,
            "full_zero_shot": 0.5,
            "heldout_kd": ce / 10,
            "heldout_ce": {"full": 2.6, "emulator": ce},
        }

    records = [
        fidelity("lossy", 4.0),
        fidelity("close", 3.0),
        fidelity("other-task", 3.5) | {"task": "sports"},
        step("lossy", 0, 0.50, 0.70, 0.55),
        step("lossy", 1, 0.54, 0.80, 0.65),
        step("lossy", 1, 0.9, 0.9, step=60),
        step("close", 0, 0.70, 0.75),
        step("orphan", 0, 0.6, 0.6),
        step("close", 0, 0.1, 0.1, rows=1000),
        step("close", 1, 0.2, 0.2, schedule="cosine"),
        step("lossy", 0, 0.50, 0.70, 0.57),  # re-scored: the later record stands...
        step("lossy", 0, 0.50, 0.70),
    ]  # ...unless it lacks the AUC the earlier one has
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    table, notes = knob_rows(read_records([path]), "hyperbaton", 120, rows=300, schedule="constant")
    assert [row["emulator"] for row in table] == ["close", "lossy"]  # most faithful first
    lossy = table[1]
    assert lossy["seeds"] == [0, 1] and lossy["plug_in"] == pytest.approx(0.52)
    assert lossy["emulator_ft"] == pytest.approx(0.75) and lossy["plug_in_auc"] == pytest.approx(0.61)
    assert table[0]["plug_in"] == pytest.approx(0.70) and table[0]["plug_in_auc"] is None
    assert notes == ["orphan: no fidelity record, skipped"]
    path.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(SystemExit, match="runs.jsonl:2"):
        read_records([path])


def test_the_linear_loss_gradient_does_not_depend_on_what_the_model_predicts(tokenizer):
    """`trajectory.py --loss linear`: d loss / d answer logits is (1/V - onehot) / n for any model,
    where cross-entropy's (p - onehot) / n differs between two models on the same batch."""
    import torch
    from trajectory import linear_answer_loss

    from offsite.emulator.data import collate, encode_pair
    from offsite.emulator.score import answer_loss
    from tests.conftest import tiny_model

    batch = collate(
        [encode_pair(tokenizer, p, c, 64) for p, c in (("Is it so?", " True"), ("Or not", " False no"))],
        tokenizer.pad_token_id or 0,
    )

    def logit_grad(model, loss_fn):
        seen = []
        head = model.get_output_embeddings()

        def keep(module, inputs, output):
            output.retain_grad()
            seen.append(output)

        handle = head.register_forward_hook(keep)
        loss_fn(model, batch).backward()
        handle.remove()
        return seen[0].grad

    models = [tiny_model("llama", n_blocks=2, seed=seed) for seed in (0, 1)]
    linear = [logit_grad(m, linear_answer_loss) for m in models]
    targets = batch.labels[:, 1:][batch.labels[:, 1:] != -100]
    n, vocab = linear[0].shape
    expected = (torch.full((n, vocab), 1.0 / vocab) - torch.nn.functional.one_hot(targets, vocab).float()) / n
    for grad in linear:
        torch.testing.assert_close(grad, expected)
    ce = [logit_grad(m, answer_loss) for m in models]
    assert not torch.allclose(ce[0], ce[1], atol=1e-4)  # cross-entropy's gradient carries each model's predictions
