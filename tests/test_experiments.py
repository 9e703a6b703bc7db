"""The diagnostics that `experiments/trajectory.py` reports next to accuracy: the margin AUC and
batch-calibrated accuracy of a two-choice scorer."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from offsite.emulator.data import MCRow
from offsite.emulator.score import MCResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
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
