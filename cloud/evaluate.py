"""The five settings of the Offsite-Tuning paper on one multiple-choice test file.

1. full zero-shot      the base model as it is
2. emulator zero-shot  the emulator (from the bundle) as it is
3. emulator-FT         the emulator with the adapter tuned on it
4. plug-in             the full model with that adapter around the real middle
5. full FT             the same adapter blocks tuned with the real middle in place
                       (same data, steps and optimiser)

Privacy gap = plug-in - emulator-FT (large is good: the emulator alone is worth less);
utility gap = full FT - plug-in (small is good: little is lost by tuning offsite).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from offsite.emulator.data import Example, MCRow
from offsite.emulator.sandwich import num_blocks, with_layout
from offsite.emulator.score import MCResult, score_mc
from offsite.emulator.tune import TuneConfig, pick_device, tune_adapter
from offsite.protocol.bundle import Bundle, load_emulator

from .plugin import plug_in_update

log = logging.getLogger(__name__)

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
ROWS = ("full_zero_shot", "emulator_zero_shot", "emulator_ft", "federated_emulator_ft", "plug_in", "federated_plug_in", "full_ft")


@dataclass(frozen=True)
class EvalConfig:
    settings: tuple[str, ...] = SETTINGS
    score_batch: int = 16
    device: str = "auto"
    plugin_gain: float = 1.0  # the plug-in setting scores real + gain * (tuned - real)

    def __post_init__(self) -> None:
        unknown = set(self.settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")


@dataclass
class Report:
    task: str
    test_rows: int
    train_rows: int
    results: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def accuracy(self, setting: str) -> float | None:
        return self.results.get(setting, {}).get("accuracy")

    @property
    def privacy_gap(self) -> float | None:
        plug, emu = self.offsite("plug_in"), self.offsite("emulator_ft")
        return None if plug is None or emu is None else plug - emu

    @property
    def utility_gap(self) -> float | None:
        full, plug = self.accuracy("full_ft"), self.offsite("plug_in")
        return None if full is None or plug is None else full - plug

    def offsite(self, setting: str) -> float | None:
        """The centralised ``setting`` (emulator_ft, plug_in), or the federated one when only the
        federated job ran (``offsite demo`` by default): the gaps are taken on what was run."""
        value = self.accuracy(setting)
        return self.accuracy(f"federated_{setting}") if value is None else value

    @property
    def gaps_federated(self) -> bool:
        return self.accuracy("plug_in") is None and self.accuracy("federated_plug_in") is not None

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "test_rows": self.test_rows,
            "train_rows": self.train_rows,
            "results": self.results,
            "privacy_gap": self.privacy_gap,
            "utility_gap": self.utility_gap,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The inverse of :meth:`to_dict` (the gaps are recomputed, not read)."""
        if not isinstance(data, dict):
            raise TypeError(f"a report is a JSON object, not {type(data).__name__}")
        results = data.get("results", {})
        if not isinstance(results, dict):
            raise TypeError("'results' is not an object")
        for setting, result in results.items():
            if setting not in LABELS:
                raise ValueError(f"unknown setting {setting!r}; known: {', '.join(LABELS)}")
            if not isinstance(result, dict) or not all(isinstance(result.get(k), (int, float)) for k in ("accuracy", "stderr", "correct")):
                raise ValueError(f"{setting}: needs numeric 'accuracy', 'stderr' and 'correct'")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise TypeError("'meta' is not an object")
        task, test_rows, train_rows = data["task"], data["test_rows"], data["train_rows"]
        if not isinstance(task, str) or not all(isinstance(n, int) and n >= 0 for n in (test_rows, train_rows)):
            raise ValueError("'task' must be a string and 'test_rows', 'train_rows' counts")
        return cls(task=task, test_rows=test_rows, train_rows=train_rows, results=dict(results), meta=dict(meta))

    def markdown(self, label: str | None = None) -> str:
        lines = [
            f"### {label or self.task}: {self.test_rows} test rows (one standard error at 0.5 is {50 / self.test_rows ** 0.5:.1f} points)",
            "",
            "| setting | accuracy | ± s.e. | correct |",
            "|---|---|---|---|",
        ]
        for setting in ROWS:
            if setting in self.results:
                r = self.results[setting]
                label = LABELS[setting]
                if setting.endswith("plug_in") and self.meta.get("plugin_gain", 1.0) != 1.0:
                    label += f" (gain {self.meta['plugin_gain']:g})"
                lines.append(f"| {label} | {r['accuracy']:.3f} | {r['stderr']:.3f} | {r['correct']}/{self.test_rows} |")
        lines.append("")
        which = ", federated" if self.gaps_federated else ""
        if self.privacy_gap is not None:
            lines.append(f"privacy gap (plug-in - emulator-FT{which}): {100 * self.privacy_gap:+.1f} points")
        if self.utility_gap is not None:
            lines.append(f"utility gap (full FT - plug-in{which}): {100 * self.utility_gap:+.1f} points")
        federated, central = self.accuracy("federated_plug_in"), self.accuracy("plug_in")
        if federated is not None and central is not None:
            lines.append(f"federated plug-in - centralised plug-in: {100 * (federated - central):+.1f} points")
        if self.meta.get("middle_nmse_at_answer") is not None:
            lines.append(
                f"emulator vs real middle output at the answer position (normalised MSE, before tuning): "
                f"{self.meta['middle_nmse_at_answer']:.3f}"
            )
        return "\n".join(lines) + "\n"


def _record(report: Report, setting: str, result: MCResult, seconds: float) -> None:
    report.results[setting] = {
        "accuracy": result.accuracy,
        "stderr": result.stderr,
        "correct": result.correct,
        "seconds": round(seconds, 1),
    }
    log.info("%-20s %.3f (± %.3f, %d rows, %.0f s)", LABELS[setting], result.accuracy, result.stderr, result.rows, seconds)


def five_setting_eval(
    base: nn.Module,
    tokenizer,
    bundle: Bundle,
    train: list[Example],
    test: list[MCRow],
    tune: TuneConfig,
    config: EvalConfig = EvalConfig(),
    task: str = "task",
    adapter: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[Report, dict[str, torch.Tensor] | None]:
    """Run the chosen settings; returns the report and the emulator-tuned adapter update.

    When ``adapter`` is given (e.g. a federated result) it is used for emulator-FT and plug-in
    instead of tuning on the emulator here.
    """
    device = pick_device(config.device)
    report = Report(task=task, test_rows=len(test), train_rows=len(train))
    report.meta = {"tune": dataclasses.asdict(tune), "bundle": bundle.manifest.get("shape"), "device": str(device)}
    shape = bundle.shape
    adapter_blocks = bundle.adapter_blocks
    lora_alpha = tune.lora.alpha if tune.mode == "lora" else None

    def score(model: nn.Module, setting: str) -> None:
        started = time.perf_counter()
        model.to(device)
        result = score_mc(model, tokenizer, test, config.score_batch, device=device, desc=LABELS[setting], progress=progress)
        model.to("cpu")
        _record(report, setting, result, time.perf_counter() - started)

    if "full_zero_shot" in config.settings:
        score(base, "full_zero_shot")

    update = adapter
    needs_update = {"emulator_ft", "plug_in"} & set(config.settings)  # zero-shot and full FT alone tune nothing here
    needs_emulator = {"emulator_zero_shot", "emulator_ft"} & set(config.settings) or (update is None and "plug_in" in config.settings)
    if needs_emulator:
        emulator = load_emulator(bundle)
        if "emulator_zero_shot" in config.settings:
            score(emulator, "emulator_zero_shot")
        report.meta["middle_nmse_at_answer"] = _middle_gap(base, emulator, tokenizer, bundle, test)
        if update is None and needs_update:
            result = tune_adapter(emulator, tokenizer, bundle.layout, adapter_blocks, train, tune, a=shape["a"], progress=progress, desc="tuning on the emulator")
            update = result.adapter
            report.meta["emulator_tuning"] = {"seconds": round(result.seconds, 1), "tokens": result.tokens, "final_loss": _tail(result.losses)}
        elif update is not None and "emulator_ft" in config.settings:
            _load_update(emulator, bundle.layout, update, tune)
        if "emulator_ft" in config.settings:
            score(emulator, "emulator_ft")
        del emulator

    if "plug_in" in config.settings:
        plugged = plug_in_update(base, update, adapter_blocks, lora_alpha, config.plugin_gain)
        report.meta["plugin_gain"] = config.plugin_gain
        score(plugged, "plug_in")
        del plugged

    if "full_ft" in config.settings:
        n = num_blocks(base)
        full = with_layout(base, list(range(n)))  # a copy: the base stays untouched
        result = tune_adapter(full, tokenizer, list(range(n)), adapter_blocks, train, tune, a=shape["a"], progress=progress, desc="tuning with the real middle")
        report.meta["full_tuning"] = {"seconds": round(result.seconds, 1), "tokens": result.tokens, "final_loss": _tail(result.losses)}
        score(full, "full_ft")
        del full
    return report, update


def _middle_gap(base: nn.Module, emulator: nn.Module, tokenizer, bundle: Bundle, test: list[MCRow], rows: int = 32) -> float:
    """Emulator-vs-real middle output (normalised MSE) at the answer position of the first test prompts."""
    from offsite.emulator.distill import answer_position_kd

    prompts = [tokenizer(row.prompt, add_special_tokens=True)["input_ids"] for row in test[:rows]]
    shape = bundle.shape
    return answer_position_kd(base, emulator, bundle.layout, shape["a"], shape["b"], prompts)


def _tail(losses: list[float], n: int = 10) -> float:
    return sum(losses[-n:]) / max(1, len(losses[-n:]))


def _load_update(emulator: nn.Module, layout: list[int], update: dict[str, torch.Tensor], tune: TuneConfig) -> None:
    from offsite.emulator.lora import attach_lora, load_lora_state
    from offsite.emulator.sandwich import ADAPTER_KEY, load_adapter_state

    if tune.mode == "lora":
        blocks = sorted({int(ADAPTER_KEY.match(k).group(1)) for k in update})
        attach_lora(emulator, layout, blocks, tune.lora)
        load_lora_state(emulator, layout, update)
    else:
        load_adapter_state(emulator, layout, update)


def labels(reports: list[Report]) -> list[str]:
    """Each report's name in a table or chart: its task, and its preset when the reports are of
    more than one."""
    presets = {r.meta.get("preset") for r in reports}
    return [f"{r.meta.get('preset') or 'no preset'}: {r.task}" if len(presets) > 1 else r.task for r in reports]


def summary_table(reports: list[Report]) -> str:
    """A row per task (and preset), a column per setting any of them measured, then the two gaps."""
    settings = [s for s in ROWS if any(s in r.results for r in reports)]
    header = ["task (test rows)", *(LABELS[s] for s in settings), "privacy gap", "utility gap"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for report, label in zip(reports, labels(reports)):
        cells = [f"{label} ({report.test_rows})"]
        cells += [f"{report.accuracy(s):.3f}" if report.accuracy(s) is not None else "-" for s in settings]
        cells += [f"{100 * gap:+.1f}" if gap is not None else "-" for gap in (report.privacy_gap, report.utility_gap)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


REPORT_DIR = "report"  # where a job directory keeps its report (``offsite eval``, ``finish``, the demo)


def job_report_dir(job: Path | str) -> Path:
    """The folder :func:`write_report` writes a job's report to: ``job/report``."""
    return Path(job) / REPORT_DIR


def write_report(reports: list[Report], out: Path | str, title: str = "Offsite five-setting evaluation") -> dict[str, Path]:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in ROWS if any(s in r.results for r in reports)]
    width = 0.8 / max(1, len(settings))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(reports) + 2), 4))
    for i, setting in enumerate(settings):
        xs = [j + (i - (len(settings) - 1) / 2) * width for j in range(len(reports))]
        ys = [r.results.get(setting, {}).get("accuracy", 0.0) for r in reports]
        es = [r.results.get(setting, {}).get("stderr", 0.0) for r in reports]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=LABELS[setting])
    ax.set_xticks(range(len(reports)))
    ax.set_xticklabels([f"{label.replace(': ', chr(10))}\n({r.test_rows} rows)" for r, label in zip(reports, labels(reports))])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=min(4, len(settings)), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
