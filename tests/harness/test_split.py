"""Splitting a task file among data owners: partition properties, IID vs Dirichlet skew, files, CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from offsite.cli import main
from offsite.emulator.data import DataFormatError, Example, MCRow
from offsite.harness.split import (
    SPLIT_FILE,
    SplitError,
    read_rows,
    row_label,
    split_dirichlet,
    split_file,
    split_iid,
    write_shares,
)
from tests.conftest import write_jsonl

LABELS = [" True", " False", " Neither"]


def mc_rows(count: int = 600) -> list[dict]:
    """Multiple-choice rows with an unbalanced label mix (3:2:1), the answer's position varying."""
    rows = []
    for i in range(count):
        label = LABELS[[0, 0, 0, 1, 1, 2][i % 6]]
        choices = LABELS[i % 3 :] + LABELS[: i % 3]
        rows.append({"prompt": f"claim {i}?", "choices": choices, "answer": choices.index(label)})
    return rows


@pytest.fixture
def mc_file(tmp_path):
    path = tmp_path / "task.jsonl"
    write_jsonl(path, mc_rows())
    return path


def distribution(rows) -> dict[str, float]:
    counts = Counter(row_label(row) for row in rows)
    return {label: counts.get(label, 0) / len(rows) for label in LABELS}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p[k] - q[k]) for k in p)


def mean_tv(shares, rows) -> float:
    overall = distribution(rows)
    return sum(total_variation(distribution(share), overall) for share in shares) / len(shares)


def assert_partition(shares, rows) -> None:
    """Every row in exactly one share, shares in file order."""
    position = {id(row): index for index, row in enumerate(rows)}
    seen = [position[id(row)] for share in shares for row in share]
    assert sorted(seen) == list(range(len(rows)))
    for share in shares:
        indices = [position[id(row)] for row in share]
        assert indices == sorted(indices)


@pytest.mark.parametrize(
    "split", [lambda rows, seed: split_iid(rows, 7, seed), lambda rows, seed: split_dirichlet(rows, 7, 0.3, seed)]
)
def test_every_row_lands_in_exactly_one_share_and_the_seed_fixes_the_split(mc_file, split):
    rows = read_rows(mc_file)
    shares = split(rows, 3)
    assert len(shares) == 7 and all(shares)
    assert_partition(shares, rows)
    assert split(rows, 3) == shares
    assert split(rows, 4) != shares


def test_iid_shares_follow_the_global_label_mix(mc_file):
    rows = read_rows(mc_file)
    shares = split_iid(rows, 5, seed=0)
    assert sorted({len(share) for share in shares}) == [120]
    overall = distribution(rows)
    for share in shares:
        assert total_variation(distribution(share), overall) < 0.1


def test_small_alpha_skews_the_shares_large_alpha_does_not(mc_file):
    rows = read_rows(mc_file)
    skewed = [mean_tv(split_dirichlet(rows, 6, 0.1, seed), rows) for seed in range(3)]
    flat = [mean_tv(split_dirichlet(rows, 6, 100.0, seed), rows) for seed in range(3)]
    assert min(skewed) > 0.25, skewed
    assert max(flat) < 0.1, flat


def test_every_owner_gets_min_rows_by_redraws_or_by_moving_rows(mc_file):
    rows = read_rows(mc_file)
    shares = split_dirichlet(rows, 20, 0.05, seed=0, min_rows=10)
    assert min(len(share) for share in shares) >= 10
    assert_partition(shares, rows)
    # no redraw allowed: the first draw is topped up by moving rows, still a deterministic partition
    moved = split_dirichlet(rows, 20, 0.05, seed=0, min_rows=25, redraws=1)
    assert min(len(share) for share in moved) >= 25
    assert_partition(moved, rows)
    assert split_dirichlet(rows, 20, 0.05, seed=0, min_rows=25, redraws=1) == moved


def test_impossible_splits_are_refused(mc_file):
    rows = read_rows(mc_file)
    with pytest.raises(SplitError, match="600 rows cannot give 7 owners 100"):
        split_dirichlet(rows, 7, 1.0, min_rows=100)
    with pytest.raises(SplitError, match="alpha"):
        split_dirichlet(rows, 3, 0.0)
    with pytest.raises(SplitError, match="owners"):
        split_iid(rows, 0)


def test_rows_are_read_with_the_task_readers(tmp_path, mc_file):
    assert isinstance(read_rows(mc_file)[0], MCRow)
    sft = tmp_path / "sft.jsonl"
    write_jsonl(sft, [{"prompt": f"q{i}", "completion": f"a{i % 2}"} for i in range(10)])
    examples = read_rows(sft)
    assert isinstance(examples[0], Example) and {row_label(e) for e in examples} == {"a0", "a1"}


def test_malformed_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = mc_rows(5)
    rows[3] = {"prompt": "x", "choices": [" a", " b"], "answer": 7}
    write_jsonl(bad, rows)
    with pytest.raises(DataFormatError, match=rf"{bad}:4: "):
        split_file(bad, tmp_path / "out", 2, None, seed=0)
    bad.write_text(bad.read_text().replace('{"prompt": "x"', "{not json"))
    with pytest.raises(DataFormatError, match=rf"{bad}:4: not valid JSON"):
        read_rows(bad)


def test_shares_are_written_as_jsonl_with_a_summary(tmp_path, mc_file):
    rows = read_rows(mc_file)
    shares = split_dirichlet(rows, 4, 0.5, seed=1)
    out = tmp_path / "shares"
    (out / "owner-9.jsonl").parent.mkdir()
    (out / "owner-9.jsonl").write_text("stale\n")
    paths = write_shares(shares, out, method="dirichlet", alpha=0.5)
    assert [p.name for p in paths] == [f"owner-{k}.jsonl" for k in range(4)]
    assert not (out / "owner-9.jsonl").exists()
    back = [read_rows(path) for path in paths]
    assert back == shares  # multiple-choice rows survive with their choices
    summary = json.loads((out / SPLIT_FILE).read_text())
    assert summary["method"] == "dirichlet" and summary["rows"] == len(rows)
    for owner, share in zip(summary["owners"], shares):
        assert owner["rows"] == len(share)
        assert owner["labels"] == {label: Counter(map(row_label, share)).get(label, 0) for label in sorted(LABELS)}


def test_cli_split_prints_label_counts_per_owner(tmp_path, mc_file, capsys):
    out = tmp_path / "owners"
    assert (
        main(
            [
                "cloud",
                "split",
                "--data",
                str(mc_file),
                "--clients",
                "3",
                "--alpha",
                "0.2",
                "--seed",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert "600 rows" in lines[0] and "Dirichlet alpha=0.2" in lines[0]
    assert lines[1].split() == ["owner", "rows", "'False'", "'Neither'", "'True'"]
    summary = json.loads((out / SPLIT_FILE).read_text())
    for line, owner in zip(lines[2:5], summary["owners"]):
        assert line.split() == [str(owner["owner"]), str(owner["rows"]), *map(str, owner["labels"].values())]
    assert summary["seed"] == 5 and summary["clients"] == 3
    # the same command twice gives the same files
    first = [(out / f"owner-{k}.jsonl").read_text() for k in range(3)]
    main(
        ["cloud", "split", "--data", str(mc_file), "--clients", "3", "--alpha", "0.2", "--seed", "5", "--out", str(out)]
    )
    assert [(out / f"owner-{k}.jsonl").read_text() for k in range(3)] == first


def test_cli_split_errors(tmp_path, mc_file, capsys):
    assert main(["cloud", "split", "--data", str(mc_file), "--clients", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--iid or --alpha" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n[1, 2]\n')
    assert main(["cloud", "split", "--data", str(bad), "--clients", "1", "--iid", "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: expected a JSON object" in capsys.readouterr().err


def test_labels_held_by_one_row_each_are_spread_over_the_owners():
    """Free-text answers (every row its own label): each row goes to an owner drawn from its label's
    proportions, so no owner collects them all (flooring the cuts gave the last owner ~90%)."""
    from offsite.emulator.data import Example
    from offsite.harness.split import split_dirichlet

    rows = [Example(f"p{i}", f" answer {i}") for i in range(3000)]
    shares = split_dirichlet(rows, 3, alpha=0.5, seed=0)
    assert sum(map(len, shares)) == 3000
    assert all(700 < len(s) < 1300 for s in shares), [len(s) for s in shares]
