"""The emulator as a privacy-utility knob: for each emulator that `experiments/trajectory.py` tuned
on one task, how good it is as a language model on its own (held-out next-token cross-entropy,
the privacy side: an emulator should be clearly worse than the model) against what its tuned
adapter is worth on the real model (plug-in accuracy and margin AUC) and on the emulator itself
(emulator-FT). Averages over the seeds found; prints a Markdown table and draws a PNG.

    python experiments/knob.py runs/mixed.jsonl runs/auc.jsonl --task hyperbaton --step 120 --out runs/knob.png

Reads the fidelity record (``heldout_ce``) trajectory.py writes before tuning, joined to the
step records by emulator name; emulators without one are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def read_records(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        with open(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise SystemExit(f"{path}:{number}: not JSON ({error.msg})") from None
    return records


def has_auc(record: dict) -> bool:
    return (record.get("auc") or {}).get("plug_in") is not None


def knob_rows(
    records: list[dict], task: str, step: int, rows: int | None = None, schedule: str | None = None
) -> tuple[list[dict], list[str]]:
    """One row per emulator (recipe name): held-out CE and KD from its fidelity record, and the
    mean over seeds of emulator-FT, plug-in, plug-in AUC and calibrated accuracy at ``step``
    (gamma 1; only runs with this learning-rate ``schedule`` when one is given). Returns the rows,
    sorted from most to least faithful, and notes on what was skipped."""
    fidelity, latest, notes = {}, {}, []
    for record in records:
        if record.get("task") != task or (rows is not None and record.get("rows") not in (None, rows)):
            continue
        if "heldout_ce" in record:
            fidelity[record["emulator"]] = record
        elif (
            record.get("step") == step
            and record.get("gamma", 1.0) == 1.0
            and schedule in (None, record.get("schedule"))
        ):
            record = record | {"seed": record.get("seed") or 0}  # records from before --seed were seed 0
            # the same run scored again (e.g. re-run to record the AUC): the later record stands,
            # unless only the earlier one has the AUC (files may come in any order)
            key = (record["recipe"], record["seed"], record.get("lr"), record.get("train"), record.get("rows"))
            if key not in latest or has_auc(record) or not has_auc(latest[key]):
                latest[key] = record
    results = defaultdict(list)
    for record in latest.values():
        results[record["recipe"]].append(record)
    table = []
    for name, runs in results.items():
        if name not in fidelity:
            notes.append(f"{name}: no fidelity record, skipped")
            continue

        def mean(get):
            values = [get(run) for run in runs if get(run) is not None]
            return statistics.fmean(values) if values else None

        table.append(
            {
                "emulator": name,
                "seeds": sorted({run["seed"] for run in runs}),
                "rows": runs[0]["rows"],
                "heldout_ce": fidelity[name]["heldout_ce"]["emulator"],
                "full_ce": fidelity[name]["heldout_ce"]["full"],
                "heldout_kd": fidelity[name]["heldout_kd"],
                "full_zero_shot": fidelity[name]["full_zero_shot"],
                "emulator_ft": mean(lambda r: r["emulator_ft"]),
                "plug_in": mean(lambda r: r["plug_in"]),
                "plug_in_auc": mean(lambda r: (r.get("auc") or {}).get("plug_in")),
                "plug_in_calibrated": mean(lambda r: (r.get("calibrated") or {}).get("plug_in")),
            }
        )
    table.sort(key=lambda row: row["heldout_ce"])
    return table, notes


def markdown(table: list[dict]) -> str:
    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| emulator | seeds | held-out CE | held-out KD | emulator-FT | plug-in | plug-in AUC | plug-in calibrated "
        "| plug-in - full zero-shot |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['emulator']} | {','.join(map(str, row['seeds']))} | {row['heldout_ce']:.2f} "
            f"| {row['heldout_kd']:.3f} | "
            f"{fmt(row['emulator_ft'])} | {fmt(row['plug_in'])} | {fmt(row['plug_in_auc'])} | "
            f"{fmt(row['plug_in_calibrated'])} | {row['plug_in'] - row['full_zero_shot']:+.3f} |"
        )
    return "\n".join(lines)


def plot(table: list[dict], task: str, step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [row["heldout_ce"] for row in table]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for ce, row in zip(x, table):  # the privacy gap of each emulator: plug-in up (or down) to emulator-FT
        ax.plot([ce, ce], [row["plug_in"], row["emulator_ft"]], color="lightgrey", linewidth=3, zorder=1)
        label = row["emulator"].removeprefix("keep-2-26-2-") if row["emulator"] != "keep-2-26-2" else "nothing dropped"
        ax.annotate(
            label,
            (ce, max(row["emulator_ft"], row["plug_in"])),
            fontsize=7,
            rotation=60,
            xytext=(0, 5),
            textcoords="offset points",
        )
    ax.scatter(
        x,
        [row["emulator_ft"] for row in table],
        marker="o",
        facecolors="none",
        edgecolors="tab:blue",
        zorder=3,
        label="emulator-FT (accuracy)",
    )
    ax.scatter(
        x, [row["plug_in"] for row in table], marker="s", color="tab:orange", zorder=3, label="plug-in (accuracy)"
    )
    auc = [(ce, row["plug_in_auc"]) for ce, row in zip(x, table) if row["plug_in_auc"] is not None]
    if auc:
        ax.scatter(*zip(*auc), marker="^", color="tab:green", zorder=3, label="plug-in (margin AUC)")
    ax.axhline(table[0]["full_zero_shot"], color="grey", linestyle=":", label="full zero-shot")
    ax.axvline(table[0]["full_ce"], color="black", linestyle=":", label="full model's CE")
    ax.set_ylim(top=max(max(row["emulator_ft"], row["plug_in"]) for row in table) + 0.12)
    ax.set_xlabel("emulator's held-out next-token cross-entropy (nats; right = more lossy)")
    ax.set_ylabel(f"{task}, {table[0]['rows']} test rows, step {step}")
    ax.set_title("The emulator as a privacy-utility knob")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="trajectory.py --out files")
    parser.add_argument("--task", default="hyperbaton")
    parser.add_argument("--step", type=int, default=120)
    parser.add_argument("--rows", type=int, default=None, help="only runs scored on this many rows")
    parser.add_argument("--schedule", default="constant", help="only runs with this learning-rate schedule")
    parser.add_argument("--out", type=Path, default=Path("runs/knob.png"))
    args = parser.parse_args()
    table, notes = knob_rows(read_records(args.files), args.task, args.step, args.rows, args.schedule)
    for note in notes:
        print(note, file=sys.stderr)
    if not table:
        raise SystemExit(
            f"no {args.task} runs at step {args.step} with a fidelity record in {', '.join(map(str, args.files))}"
        )
    print(markdown(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(table, args.task, args.step, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
