"""Multiple-choice scoring: each choice on its prompt's cached keys and values (what `score_mc`
does) against every (prompt, choice) pair scored whole, side by side in one process on the same
model and rows. Prints rows/s of each, the ratio, and how far apart their log-likelihoods are
(they must agree: the predictions are compared row by row).

    python benchmarks/mc_scoring.py [--task wordnet_definitions] [--rows 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from offsite.cloud.models import load_base
from offsite.emulator.data import encode_pair, pad_id_of, read_test_rows
from offsite.emulator.score import _summed_logprobs, score_mc
from offsite.harness.pipeline import task_files


class _NoBar:
    def update(self) -> None:
        pass


def pairwise(model, tokenizer, rows, batch_size: int = 16) -> list[list[float]]:
    """Every (prompt, choice) pair as one whole sequence: the path `score_mc` takes only when a
    choice changes how its prompt tokenizes."""
    encoded = [encode_pair(tokenizer, row.prompt, choice, 1024) for row in rows for choice in row.choices]
    with torch.no_grad():
        flat = _summed_logprobs(model, encoded, batch_size, pad_id_of(tokenizer), "cpu", _NoBar())
    scores, at = [], 0
    for row in rows:
        scores.append(flat[at : at + len(row.choices)])
        at += len(row.choices)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="wordnet_definitions")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each, interleaved")
    args = parser.parse_args()
    _, test = task_files(args.task)
    kind, rows = read_test_rows(test, limit=args.rows)
    if kind != "mc":
        raise SystemExit(f"{test}: not a multiple-choice file")
    model, tokenizer, _ = load_base("smollm2-135m")
    model.eval()
    times = {"cached prompt (score_mc)": [], "pairs whole": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        cached = score_mc(model, tokenizer, rows, progress=False).scores
        times["cached prompt (score_mc)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        whole = pairwise(model, tokenizer, rows)
        times["pairs whole"].append(time.perf_counter() - started)
    gap = max(abs(a - b) for x, y in zip(cached, whole) for a, b in zip(x, y))
    same = sum(
        max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__) for x, y in zip(cached, whole)
    )
    print(
        f"{args.task}: {len(rows)} rows, {sum(len(r.choices) for r in rows)} choices, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name, values in times.items():
        best = min(values)
        print(
            f"  {name:26s} best {best:6.1f} s  ({len(rows) / best:5.1f} rows/s; "
            f"runs {', '.join(f'{v:.1f}' for v in values)})"
        )
    ratio = min(times["pairs whole"]) / min(times["cached prompt (score_mc)"])
    print(
        f"  speed-up {ratio:.2f}x; largest log-likelihood difference {gap:.2e}; "
        f"same prediction on {same}/{len(rows)} rows"
    )


if __name__ == "__main__":
    main()
