"""The five settings of the Offsite-Tuning paper on one test file.

1. full zero-shot      the base model as it is
2. emulator zero-shot  the emulator (from the bundle) as it is
3. emulator-FT         the emulator with the adapter tuned on it
4. plug-in             the full model with that adapter around the real middle
5. full FT             the same adapter blocks tuned with the real middle in place
                       (same data, steps and optimiser)

A multiple-choice test file is scored by accuracy (lm-eval's ``acc``, with ``acc_norm`` beside it);
an SFT file (``{"prompt","completion"}``) by the mean negative log-likelihood of the completion
tokens in nats per token (lower is better), perplexity beside it. The rows decide which.

Privacy gap = how much better the plug-in is than emulator-FT (large is good: the emulator alone is
worth less); utility gap = how much worse the plug-in is than full FT (small is good); recovery =
(plug-in - zero-shot) / (full FT - zero-shot), the share of full FT's gain the plug-in keeps. Each is
stated so that it reads the same way for accuracy (points) and NLL (nats per token).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from offsite.emulator.data import Example, MCRow
from offsite.emulator.distill import answer_position_kd
from offsite.emulator.lora import attach_lora, load_lora_state
from offsite.emulator.sandwich import ADAPTER_KEY, load_adapter_state, num_blocks, with_layout
from offsite.emulator.score import MCResult, SFTResult, score_mc, score_sft
from offsite.emulator.tune import TuneConfig, pick_device, tune_adapter
from offsite.protocol.bundle import Bundle, load_emulator

from .plugin import plug_in_update
from .report import (
    LABELS,
    METRICS,
    REPORT_DIR,
    RESULT_FIELDS,
    ROWS,
    SETTINGS,
    Report,
    job_report_dir,
    labels,
    summary_table,
    write_report,
)

__all__ = [  # the report's names, where importers of this module have always found them
    "LABELS",
    "METRICS",
    "REPORT_DIR",
    "RESULT_FIELDS",
    "ROWS",
    "SETTINGS",
    "Report",
    "job_report_dir",
    "labels",
    "summary_table",
    "write_report",
    "EvalConfig",
    "five_setting_eval",
    "result_fields",
    "score_rows",
    "test_kind",
]

log = logging.getLogger(__name__)


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


def result_fields(result: MCResult | SFTResult) -> dict:
    """What a report keeps of one setting's score."""
    if isinstance(result, SFTResult):
        return {"nll": result.nll, "stderr": result.stderr, "ppl": result.perplexity, "tokens": result.tokens}
    return {
        "accuracy": result.accuracy,
        "stderr": result.stderr,
        "correct": result.correct,
        "acc_norm": result.acc_norm,
    }


def score_rows(
    model: nn.Module,
    tokenizer,
    test: list[MCRow] | list[Example],
    batch: int = 16,
    device="cpu",
    desc: str = "scoring",
    progress: bool = True,
) -> MCResult | SFTResult:
    """Accuracy of MC rows, completion NLL of SFT rows (a test file holds one kind)."""
    scorer = score_sft if isinstance(test[0], Example) else score_mc
    return scorer(model, tokenizer, test, batch, device=device, desc=desc, progress=progress)


def test_kind(test: list[MCRow] | list[Example]) -> str:
    return "sft" if isinstance(test[0], Example) else "mc"


def _record(report: Report, setting: str, result: MCResult | SFTResult, seconds: float) -> None:
    report.results[setting] = result_fields(result) | {"seconds": round(seconds, 1)}
    value = report.results[setting][report.metric]
    log.info(
        "%-20s %s %.3f (± %.3f, %d rows, %.0f s)",
        LABELS[setting],
        report.metric,
        value,
        result.stderr,
        result.rows,
        seconds,
    )


@dataclass
class _Run:
    """One evaluation's fixed inputs: what each setting is scored on and how."""

    base: nn.Module
    tokenizer: object
    bundle: Bundle
    train: list[Example]
    test: list[MCRow] | list[Example]
    tune: TuneConfig
    config: EvalConfig
    report: Report
    device: torch.device
    progress: bool

    def score(self, model: nn.Module, setting: str) -> None:
        started = time.perf_counter()
        model.to(self.device)
        result = score_rows(
            model,
            self.tokenizer,
            self.test,
            self.config.score_batch,
            device=self.device,
            desc=LABELS[setting],
            progress=self.progress,
        )
        model.to("cpu")
        _record(self.report, setting, result, time.perf_counter() - started)

    def tune_on(self, model: nn.Module, layout: list[int], desc: str, key: str) -> dict[str, torch.Tensor]:
        result = tune_adapter(
            model,
            self.tokenizer,
            layout,
            self.bundle.adapter_blocks,
            self.train,
            self.tune,
            a=self.bundle.shape["a"],
            progress=self.progress,
            desc=desc,
        )
        self.report.meta[key] = {
            "seconds": round(result.seconds, 1),
            "tokens": result.tokens,
            "final_loss": _tail(result.losses),
        }
        return result.adapter


def five_setting_eval(
    base: nn.Module,
    tokenizer,
    bundle: Bundle,
    train: list[Example],
    test: list[MCRow] | list[Example],
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
    report = Report(task=task, test_rows=len(test), train_rows=len(train), kind=test_kind(test))
    report.meta = {"tune": dataclasses.asdict(tune), "bundle": bundle.manifest.get("shape"), "device": str(device)}
    run = _Run(base, tokenizer, bundle, train, test, tune, config, report, device, progress)
    settings = set(config.settings)
    if "full_zero_shot" in settings:
        run.score(base, "full_zero_shot")
    update = adapter
    if {"emulator_zero_shot", "emulator_ft"} & settings or (update is None and "plug_in" in settings):
        update = _emulator_settings(run, update)
    if "plug_in" in settings:
        lora_alpha = tune.lora.alpha if tune.mode == "lora" else None
        plugged = plug_in_update(base, update, bundle.adapter_blocks, lora_alpha, config.plugin_gain)
        report.meta["plugin_gain"] = config.plugin_gain
        run.score(plugged, "plug_in")
        del plugged
    if "full_ft" in settings:
        n = num_blocks(base)
        full = with_layout(base, list(range(n)))  # a copy: the base stays untouched
        run.tune_on(full, list(range(n)), "tuning with the real middle", "full_tuning")
        run.score(full, "full_ft")
        del full
    return report, update


def _emulator_settings(run: _Run, update: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Emulator zero-shot, then the adapter tuned on it (unless one is given), then emulator-FT."""
    settings = set(run.config.settings)
    emulator = load_emulator(run.bundle)
    if "emulator_zero_shot" in settings:
        run.score(emulator, "emulator_zero_shot")
    run.report.meta["middle_nmse_at_answer"] = _middle_gap(run.base, emulator, run.tokenizer, run.bundle, run.test)
    if update is None and {"emulator_ft", "plug_in"} & settings:  # zero-shot alone tunes nothing
        update = run.tune_on(emulator, run.bundle.layout, "tuning on the emulator", "emulator_tuning")
    elif update is not None and "emulator_ft" in settings:
        _load_update(emulator, run.bundle.layout, update, run.tune)
    if "emulator_ft" in settings:
        run.score(emulator, "emulator_ft")
    return update


def _middle_gap(
    base: nn.Module, emulator: nn.Module, tokenizer, bundle: Bundle, test: list[MCRow], rows: int = 32
) -> float:
    """Emulator-vs-real middle output (normalised MSE) at the answer position of the first test prompts."""
    prompts = [tokenizer(row.prompt, add_special_tokens=True)["input_ids"] for row in test[:rows]]
    shape = bundle.shape
    return answer_position_kd(base, emulator, bundle.layout, shape["a"], shape["b"], prompts)


def _tail(losses: list[float], n: int = 10) -> float:
    return sum(losses[-n:]) / max(1, len(losses[-n:]))


def _load_update(emulator: nn.Module, layout: list[int], update: dict[str, torch.Tensor], tune: TuneConfig) -> None:
    if tune.mode == "lora":
        blocks = sorted({int(ADAPTER_KEY.match(k).group(1)) for k in update})
        attach_lora(emulator, layout, blocks, tune.lora)
        load_lora_state(emulator, layout, update)
    else:
        load_adapter_state(emulator, layout, update)
