"""Split a task file among data owners: IID, or non-IID by a Dirichlet(alpha) draw over the labels.

A row's **label** is what training teaches it to produce: the text of the correct choice of a
multiple-choice row (`` a``, `` True``, ...), or the completion of an SFT row. Every row lands in
exactly one share, each share keeps its rows in file order, and the same seed gives the same split.

- :func:`split_iid` shuffles the rows and deals them into ``n`` shares of near-equal size.
- :func:`split_dirichlet` (Hsu et al. 2019, "Measuring the effects of non-identical data
  distribution"): for every label, draw the owners' proportions ``p ~ Dirichlet(alpha, ..., alpha)``
  and cut that label's shuffled rows at the cumulative proportions. Small ``alpha`` (0.1) gives
  each owner a few dominant labels; large ``alpha`` (100) approaches an IID split. Each owner must
  end with at least ``min_rows`` rows: the whole draw is repeated (from the same generator, so
  still deterministic) up to ``redraws`` times; if no draw qualifies, rows move from the largest
  share (its last rows in file order) to each short share until all have ``min_rows``.

:func:`write_shares` writes ``owner-K.jsonl`` files plus ``split.json`` (rows and label counts per
owner). ``offsite cloud split`` is the command line; ``offsite cloud simulate`` uses the same split.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from offsite.emulator.data import DataFormatError, Example, MCRow, read_examples, read_mc_jsonl
from offsite.protocol.simulation import partition_file_name

SPLIT_FILE = "split.json"
MAX_SUMMARY_LABELS = 50  # split.json and the table name at most this many labels; the rest is "(other)"

Row = Any  # an Example, an MCRow, or a row dict ({"prompt","choices","answer"} or {"prompt","completion"})


class SplitError(ValueError):
    """The rows cannot be split as asked (too few rows, bad parameters); the message says why."""


def owner_file(index: int) -> str:
    """``owner-{index}.jsonl``: the name a simulated data owner looks for (:mod:`offsite.protocol.simulation`)."""
    return partition_file_name(index)


# ---------------------------------------------------------------- rows and labels


def read_rows(path: Path | str) -> list[MCRow | Example]:
    """The rows of a task file: multiple-choice rows as :class:`MCRow` (choices kept), else
    training examples (SFT rows, or a file mixing both). A malformed row raises
    :class:`~offsite.emulator.data.DataFormatError` naming ``file:line``."""
    try:
        return list(read_mc_jsonl(path))
    except DataFormatError:
        return list(read_examples(path))  # raises the first bad row's file:line if it is not SFT either


def row_label(row: Row) -> str:
    """What the row trains the model to answer: the correct choice's text, or the completion."""
    if isinstance(row, Example):
        return row.completion
    if isinstance(row, MCRow):
        return row.choices[row.answer]
    if isinstance(row, dict):
        if "choices" in row:
            return row["choices"][row["answer"]]
        return row["completion"]
    raise TypeError(f"cannot label a {type(row).__name__}")


def row_to_json(row: Row) -> dict:
    if isinstance(row, Example):
        return {"prompt": row.prompt, "completion": row.completion}
    if isinstance(row, MCRow):
        return {"prompt": row.prompt, "choices": list(row.choices), "answer": row.answer}
    if isinstance(row, dict):
        return row
    raise TypeError(f"cannot write a {type(row).__name__} as JSON")


# ---------------------------------------------------------------- splits


def _check(rows: Sequence, n: int, min_rows: int) -> None:
    if n < 1:
        raise SplitError(f"the number of owners must be >= 1, got {n}")
    if min_rows < 1:
        raise SplitError(f"min_rows must be >= 1, got {min_rows}")
    if len(rows) < n * min_rows:
        raise SplitError(f"{len(rows)} rows cannot give {n} owners {min_rows} row(s) each")


def _shares(rows: Sequence[Row], assignment: list[list[int]]) -> list[list[Row]]:
    return [[rows[i] for i in sorted(indices)] for indices in assignment]


def split_iid(rows: Sequence[Row], n: int, seed: int = 0) -> list[list[Row]]:
    """Shuffle and deal the rows into ``n`` shares whose sizes differ by at most one."""
    _check(rows, n, 1)
    order = np.random.default_rng(seed).permutation(len(rows))
    return _shares(rows, [part.tolist() for part in np.array_split(order, n)])


def _label_groups(rows: Sequence[Row], label: Callable[[Row], str]) -> list[list[int]]:
    """Row indices grouped by label, labels in sorted order (so the draw does not depend on file order)."""
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(label(row), []).append(index)
    return [groups[key] for key in sorted(groups)]


def _dirichlet_draw(groups: list[list[int]], n: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    assignment: list[list[int]] = [[] for _ in range(n)]
    for indices in groups:
        shuffled = rng.permutation(indices)
        proportions = rng.dirichlet(np.full(n, alpha))
        # rounded, not floored: flooring sends every row of a small group (a label held by one row, as in
        # a task whose correct choices are free text) to the last owner
        cuts = np.round(np.cumsum(proportions)[:-1] * len(shuffled)).astype(int)
        for owner, part in enumerate(np.split(shuffled, cuts)):
            assignment[owner].extend(part.tolist())
    return assignment


def _top_up(assignment: list[list[int]], min_rows: int) -> list[list[int]]:
    """Move rows from the largest share (its last rows in file order; ties: lowest owner) to each
    share below ``min_rows``, lowest owner first, until every share has ``min_rows``."""
    assignment = [sorted(indices) for indices in assignment]
    for owner in range(len(assignment)):
        while len(assignment[owner]) < min_rows:
            donor = max(range(len(assignment)), key=lambda k: (len(assignment[k]), -k))
            assignment[owner].append(assignment[donor].pop())
    return assignment


def split_dirichlet(
    rows: Sequence[Row],
    n: int,
    alpha: float,
    seed: int = 0,
    min_rows: int = 1,
    label: Callable[[Row], str] = row_label,
    redraws: int = 100,
) -> list[list[Row]]:
    """Non-IID shares: each label's rows divided among the ``n`` owners by proportions drawn from
    ``Dirichlet(alpha)``; every owner gets at least ``min_rows`` rows (see the module docstring)."""
    if not alpha > 0:
        raise SplitError(f"alpha must be > 0, got {alpha}")
    _check(rows, n, min_rows)
    rng = np.random.default_rng(seed)
    groups = _label_groups(rows, label)
    for _ in range(max(1, redraws)):
        assignment = _dirichlet_draw(groups, n, alpha, rng)
        if min(len(indices) for indices in assignment) >= min_rows:
            return _shares(rows, assignment)
    return _shares(rows, _top_up(assignment, min_rows))


# ---------------------------------------------------------------- summaries and files


def label_counts(share: Sequence[Row], label: Callable[[Row], str] = row_label) -> Counter:
    return Counter(label(row) for row in share)


def summary_labels(shares: Sequence[Sequence[Row]], label: Callable[[Row], str] = row_label) -> list[str]:
    """The labels a summary names: all of them, or the most common :data:`MAX_SUMMARY_LABELS`."""
    total = Counter()
    for share in shares:
        total.update(label_counts(share, label))
    return [name for name, _ in sorted(total.most_common(MAX_SUMMARY_LABELS), key=lambda item: item[0])]


def split_summary(shares: Sequence[Sequence[Row]], label: Callable[[Row], str] = row_label, **meta) -> dict:
    """``split.json``: the split's settings (``meta``) and rows and label counts per owner."""
    named = summary_labels(shares, label)
    owners = []
    for index, share in enumerate(shares):
        counts = label_counts(share, label)
        labels = {name: counts.get(name, 0) for name in named}
        other = len(share) - sum(labels.values())
        if other:
            labels["(other)"] = other
        owners.append({"owner": index, "file": owner_file(index), "rows": len(share), "labels": labels})
    return {**meta, "owners": owners, "rows": sum(len(share) for share in shares)}


def write_shares(
    shares: Sequence[Sequence[Row]], out_dir: Path | str, label: Callable[[Row], str] = row_label, **meta
) -> list[Path]:
    """Write ``owner-K.jsonl`` (one JSON object per row) and ``split.json`` into ``out_dir``;
    return the share files in owner order. Stale ``owner-*.jsonl`` files there are removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("owner-*.jsonl"):
        stale.unlink()
    paths = []
    for index, share in enumerate(shares):
        path = out / owner_file(index)
        with open(path, "w") as handle:
            handle.writelines(json.dumps(row_to_json(row), ensure_ascii=False) + "\n" for row in share)
        paths.append(path)
    (out / SPLIT_FILE).write_text(json.dumps(split_summary(shares, label, **meta), indent=1, ensure_ascii=False) + "\n")
    return paths


def format_table(summary: dict, max_labels: int = 8) -> str:
    """Rows and label counts per owner, one line each (at most ``max_labels`` label columns)."""
    names = list(dict.fromkeys(name for owner in summary["owners"] for name in owner["labels"]))
    shown = names[:max_labels]
    header = ["owner", "rows", *[repr(name.strip()) if name != "(other)" else name for name in shown]]
    if len(names) > len(shown):
        header.append(f"+{len(names) - len(shown)} more")
    lines = [header]
    for owner in summary["owners"]:
        line = [str(owner["owner"]), str(owner["rows"]), *[str(owner["labels"].get(name, 0)) for name in shown]]
        if len(names) > len(shown):
            line.append(str(sum(owner["labels"].get(name, 0) for name in names[len(shown) :])))
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def split_file(
    data: Path | str, out_dir: Path | str, clients: int, alpha: float | None, seed: int, min_rows: int = 1
) -> dict:
    """Read ``data``, split it (IID when ``alpha`` is None), write the shares; return ``split.json``'s content."""
    rows = read_rows(data)
    if alpha is None:
        shares = split_iid(rows, clients, seed)
        meta = {"method": "iid"}
    else:
        shares = split_dirichlet(rows, clients, alpha, seed, min_rows=min_rows)
        meta = {"method": "dirichlet", "alpha": alpha, "min_rows": min_rows}
    write_shares(shares, out_dir, source=str(Path(data).resolve()), clients=clients, seed=seed, **meta)
    return json.loads((Path(out_dir) / SPLIT_FILE).read_text())


# ---------------------------------------------------------------- command line


def add_split_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--data --clients (--iid | --alpha) --seed --min-rows``; shared by ``cloud split`` and ``cloud simulate``."""
    parser.add_argument(
        "--data",
        type=Path,
        metavar="FILE",
        required=required,
        help="task JSONL: multiple-choice {prompt, choices, answer} or SFT {prompt, completion}",
    )
    parser.add_argument("--clients", type=int, metavar="N", required=required, help="number of data owners (shares)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--iid", action="store_true", help="IID: shuffle and deal into near-equal shares")
    how.add_argument(
        "--alpha",
        type=float,
        metavar="A",
        default=None,
        help="non-IID: Dirichlet(ALPHA) over the labels (0.1: skewed, 100: near IID)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", default=0, help="seed of the split (default 0): same seed, same split"
    )
    parser.add_argument(
        "--min-rows", type=int, metavar="M", default=1, help="with --alpha: rows every owner gets at least (default 1)"
    )


def register(commands) -> None:
    split = commands.add_parser(
        "split",
        help="split a task file among N data owners (IID or Dirichlet non-IID); writes owner-K.jsonl + split.json",
        description="Split a JSONL task file among N data owners: --iid deals shuffled rows into near-equal shares; "
        "--alpha A draws each label's share per owner from Dirichlet(A) (a label is the correct choice's text, or the "
        "SFT completion). Writes OUT/owner-0.jsonl ... and OUT/split.json (rows and label counts per owner) and prints "
        "the label counts per owner.",
    )
    add_split_arguments(split)
    split.add_argument(
        "--out", type=Path, metavar="DIR", required=True, help="output directory for owner-K.jsonl and split.json"
    )
    split.set_defaults(func=_split)


def split_args_alpha(args: argparse.Namespace) -> float | None:
    """``--alpha`` (None for ``--iid``), or ValueError when neither was given."""
    if not args.iid and args.alpha is None:
        raise ValueError("say how to split: --iid or --alpha A")
    return None if args.iid else args.alpha


def _split(args: argparse.Namespace) -> int:
    summary = split_file(args.data, args.out, args.clients, split_args_alpha(args), args.seed, args.min_rows)
    how = "IID" if summary["method"] == "iid" else f"Dirichlet alpha={summary['alpha']:g}"
    print(f"{summary['rows']} rows of {args.data} -> {args.clients} owners ({how}, seed {args.seed}) in {args.out}")
    print(format_table(summary))
    return 0
