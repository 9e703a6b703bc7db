"""A five-setting report: what each setting scored (accuracy for multiple choice, completion NLL
for SFT), the privacy and utility gaps and the recovery, read the same way round for both; and its
files: ``report.md`` (tables), ``report.json`` and ``report.png`` (bars with one standard error)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SETTINGS = ("full_zero_shot", "emulator_zero_shot", "emulator_ft", "plug_in", "full_ft")
LABELS = {
    "full_zero_shot": "full zero-shot",
    "emulator_zero_shot": "emulator zero-shot",
    "emulator_ft": "emulator-FT",
    "plug_in": "plug-in",
    "full_ft": "full FT",
    "federated_emulator_ft": "emulator-FT, federated",
    "federated_plug_in": "plug-in, federated",
}
# table order: each offsite setting beside its federated twin (a federated job's adapter, scored by
# ``offsite demo``), full FT last (the paper's order)
ROWS = (
    "full_zero_shot",
    "emulator_zero_shot",
    "emulator_ft",
    "federated_emulator_ft",
    "plug_in",
    "federated_plug_in",
    "full_ft",
)
# what each kind of test file is scored by: the result field, whether larger is better, the unit of a gap
METRICS = {
    "mc": ("accuracy", True, "points"),
    "sft": ("nll", False, "nats/token"),
}
# the fields every result of a kind must carry as numbers
RESULT_FIELDS = {"mc": ("accuracy", "stderr", "correct"), "sft": ("nll", "stderr", "tokens")}


@dataclass
class Report:
    task: str
    test_rows: int
    train_rows: int
    results: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    kind: str = "mc"  # "mc": accuracy; "sft": completion NLL (see METRICS)

    @property
    def metric(self) -> str:
        return METRICS[self.kind][0]

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.kind][1]

    def value(self, setting: str) -> float | None:
        """The setting's score: accuracy (MC) or NLL in nats per token (SFT)."""
        return self.results.get(setting, {}).get(self.metric)

    def accuracy(self, setting: str) -> float | None:
        return self.results.get(setting, {}).get("accuracy")

    def _better_by(self, a: float | None, b: float | None) -> float | None:
        """How much better ``a`` is than ``b`` in this report's metric (positive: better)."""
        if a is None or b is None:
            return None
        return a - b if self.higher_is_better else b - a

    @property
    def privacy_gap(self) -> float | None:
        """How much better the plug-in is than emulator-FT."""
        return self._better_by(self.offsite("plug_in"), self.offsite("emulator_ft"))

    @property
    def utility_gap(self) -> float | None:
        """How much better full FT is than the plug-in."""
        return self._better_by(self.value("full_ft"), self.offsite("plug_in"))

    @property
    def recovery(self) -> float | None:
        """(plug-in - zero-shot) / (full FT - zero-shot): the share of full FT's gain the plug-in keeps."""
        zs, plug, full = self.value("full_zero_shot"), self.offsite("plug_in"), self.value("full_ft")
        if zs is None or plug is None or full is None or full == zs:
            return None
        return (plug - zs) / (full - zs)

    def offsite(self, setting: str) -> float | None:
        """The centralised ``setting`` (emulator_ft, plug_in), or the federated one when only the
        federated job ran (``offsite demo`` by default): the gaps are taken on what was run."""
        value = self.value(setting)
        return self.value(f"federated_{setting}") if value is None else value

    @property
    def gaps_federated(self) -> bool:
        return self.value("plug_in") is None and self.value("federated_plug_in") is not None

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "kind": self.kind,
            "test_rows": self.test_rows,
            "train_rows": self.train_rows,
            "results": self.results,
            "privacy_gap": self.privacy_gap,
            "utility_gap": self.utility_gap,
            "recovery": self.recovery,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The inverse of :meth:`to_dict` (the gaps are recomputed, not read). Reports written before
        SFT scoring carry no ``kind``: they are multiple choice."""
        if not isinstance(data, dict):
            raise TypeError(f"a report is a JSON object, not {type(data).__name__}")
        kind = data.get("kind", "mc")
        if kind not in METRICS:
            raise ValueError(f"unknown kind {kind!r}; known: {', '.join(METRICS)}")
        results = data.get("results", {})
        if not isinstance(results, dict):
            raise TypeError("'results' is not an object")
        for setting, result in results.items():
            if setting not in LABELS:
                raise ValueError(f"unknown setting {setting!r}; known: {', '.join(LABELS)}")
            needed = RESULT_FIELDS[kind]
            if not isinstance(result, dict) or not all(isinstance(result.get(k), (int, float)) for k in needed):
                raise ValueError(f"{setting}: needs numeric {', '.join(repr(k) for k in needed)}")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise TypeError("'meta' is not an object")
        task, test_rows, train_rows = data["task"], data["test_rows"], data["train_rows"]
        if not isinstance(task, str) or not all(isinstance(n, int) and n >= 0 for n in (test_rows, train_rows)):
            raise ValueError("'task' must be a string and 'test_rows', 'train_rows' counts")
        return cls(
            task=task, test_rows=test_rows, train_rows=train_rows, results=dict(results), meta=dict(meta), kind=kind
        )

    def markdown(self, label: str | None = None) -> str:
        lines = [f"### {label or self.task}: {self._size()}", "", *self._table(), ""]
        which = ", federated" if self.gaps_federated else ""
        unit = METRICS[self.kind][2]
        # each difference written the way round that makes a positive number good
        privacy, utility, federated = (
            ("plug-in - emulator-FT", "full FT - plug-in", "federated plug-in - centralised plug-in")
            if self.higher_is_better
            else ("emulator-FT - plug-in", "plug-in - full FT", "centralised plug-in - federated plug-in")
        )
        if self.privacy_gap is not None:
            lines.append(f"privacy gap ({privacy}{which}): {self._gap(self.privacy_gap)} {unit}")
        if self.utility_gap is not None:
            lines.append(f"utility gap ({utility}{which}): {self._gap(self.utility_gap)} {unit}")
        if self.recovery is not None:
            lines.append(f"recovery ((plug-in - zero-shot) / (full FT - zero-shot){which}): {100 * self.recovery:.0f}%")
        difference = self._better_by(self.value("federated_plug_in"), self.value("plug_in"))
        if difference is not None:
            lines.append(f"{federated}: {self._gap(difference)} {unit}")
        if self.meta.get("middle_nmse_at_answer") is not None:
            lines.append(
                f"emulator vs real middle output at the answer position (normalised MSE, before tuning): "
                f"{self.meta['middle_nmse_at_answer']:.3f}"
            )
        return "\n".join(lines) + "\n"

    def _size(self) -> str:
        rows = f"{self.test_rows} {'held-out train' if self.meta.get('val_rows') else 'test'} rows"
        if self.kind == "sft":
            tokens = next((r["tokens"] for r in self.results.values() if "tokens" in r), None)
            return (
                rows + (f", {tokens} completion tokens" if tokens else "") + " (NLL in nats per token, lower is better)"
            )
        return f"{rows} (one standard error at 0.5 is {50 / self.test_rows**0.5:.1f} points)"

    def _gap(self, gap: float) -> str:
        return f"{100 * gap:+.1f}" if self.kind == "mc" else f"{gap:+.3f}"

    def _cells(self, result: dict) -> str:
        """One setting's row of the table, without its label."""
        if self.kind == "sft":
            return f"{result['nll']:.3f} | {result['stderr']:.3f} | {result.get('ppl', float('nan')):.2f}"
        norm = f"{result['acc_norm']:.3f}" if result.get("acc_norm") is not None else "-"
        return f"{result['accuracy']:.3f} | {result['stderr']:.3f} | {result['correct']}/{self.test_rows} | {norm}"

    def _table(self) -> list[str]:
        if self.kind == "sft":
            lines = ["| setting | NLL (nats/token) | ± s.e. | perplexity |", "|---|---|---|---|"]
        else:
            lines = ["| setting | accuracy | ± s.e. | correct | acc_norm |", "|---|---|---|---|---|"]
        for setting in ROWS:
            if setting in self.results:
                label = LABELS[setting]
                if setting.endswith("plug_in") and self.meta.get("plugin_gain", 1.0) != 1.0:
                    label += f" (gain {self.meta['plugin_gain']:g})"
                lines.append(f"| {label} | {self._cells(self.results[setting])} |")
        return lines


def labels(reports: list[Report]) -> list[str]:
    """Each report's name in a table or chart: its task, and its preset when the reports are of
    more than one."""
    presets = {r.meta.get("preset") for r in reports}
    return [f"{r.meta.get('preset') or 'no preset'}: {r.task}" if len(presets) > 1 else r.task for r in reports]


def summary_table(reports: list[Report]) -> str:
    """A row per task (and preset), a column per setting any of them measured, then the two gaps
    (points for accuracy, nats per token for NLL; positive is good) and the recovery."""
    settings = [s for s in ROWS if any(s in r.results for r in reports)]
    header = ["task (test rows, metric)", *(LABELS[s] for s in settings), "privacy gap", "utility gap", "recovery"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for report, label in zip(reports, labels(reports)):
        cells = [f"{label} ({report.test_rows}, {'acc' if report.kind == 'mc' else 'NLL'})"]
        cells += [f"{report.value(s):.3f}" if report.value(s) is not None else "-" for s in settings]
        cells += [report._gap(gap) if gap is not None else "-" for gap in (report.privacy_gap, report.utility_gap)]
        cells.append(f"{100 * report.recovery:.0f}%" if report.recovery is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


REPORT_DIR = "report"  # where a job directory keeps its report (``offsite eval``, ``finish``, the demo)


def job_report_dir(job: Path | str) -> Path:
    """The folder :func:`write_report` writes a job's report to: ``job/report``."""
    return Path(job) / REPORT_DIR


def write_report(
    reports: list[Report], out: Path | str, title: str = "Offsite five-setting evaluation"
) -> dict[str, Path]:
    """``report.md``, ``report.json`` and ``report.png`` (bar chart with ± one s.e.) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = f"# {title}\n\n"
    if len(reports) > 1:
        md += summary_table(reports) + "\n"
    md += "\n".join(r.markdown(label) for r, label in zip(reports, labels(reports)))
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps([r.to_dict() for r in reports], indent=1))
    _plot(reports, out / "report.png", title)
    return {"md": out / "report.md", "json": out / "report.json", "png": out / "report.png"}


def _plot(reports: list[Report], path: Path, title: str) -> None:
    """Bars with ± one s.e.: one panel for the accuracy reports, one for the NLL reports."""
    import matplotlib  # loaded only when a chart is drawn: slow to import, and it picks a backend

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = list(zip(reports, labels(reports)))
    panels = [[(r, name) for r, name in named if r.kind == kind] for kind in METRICS]
    panels = [p for p in panels if p]
    widths = [max(6, 2.2 * len(p) + 2) for p in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(sum(widths), 4), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for ax, panel in zip(axes[0], panels):
        _bars(ax, [r for r, _ in panel], [name for _, name in panel])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax, reports: list[Report], names: list[str]) -> None:
    settings = [s for s in ROWS if any(s in r.results for r in reports)]
    width = 0.8 / max(1, len(settings))
    for i, setting in enumerate(settings):
        xs = [j + (i - (len(settings) - 1) / 2) * width for j in range(len(reports))]
        ys = [r.value(setting) or 0.0 for r in reports]
        es = [r.results.get(setting, {}).get("stderr", 0.0) for r in reports]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=LABELS[setting])
    ax.set_xticks(range(len(reports)))
    ax.set_xticklabels([f"{label.replace(': ', chr(10))}\n({r.test_rows} rows)" for r, label in zip(reports, names)])
    if reports[0].kind == "mc":
        ax.set_ylabel("accuracy (higher is better)")
        ax.set_ylim(0, 1)
    else:
        ax.set_ylabel("completion NLL, nats/token (lower is better)")
    ax.legend(fontsize=8, ncol=min(4, len(settings)), loc="upper center", bbox_to_anchor=(0.5, -0.18))
