"""The privacy-utility frontier: ``offsite sweep`` scores several emulators on one task.

An operator chooses how lossy the emulator it ships is. Closer to the model, the tuned adapter
carries over better (utility) and the data owners hold more of the model (privacy lost). For each
emulator this measures emulator zero-shot, emulator-FT and the plug-in; full zero-shot and full FT
do not depend on the emulator and are measured once per adapter cut. It writes one table (the
five settings, the privacy and utility gaps, the recovery) and one frontier plot: emulator-FT
against the plug-in, one point per emulator, where everything above the diagonal is skill the
data owners did not get.

Emulators are written ``SHAPE[/kdSTEPS][/klWEIGHT][/cka][/qBITSgGROUP][/gainG]`` on top of a preset's
recipe: ``2-10-2/kd60`` keeps 10 middle blocks and distils them 60 steps (``/kl1``: with a KL term
to the full model's logits beside the hidden-state one; ``/cka``: the 10 blocks chosen by CKA,
not uniformly; ``/samples``: distilled on the model's own text); ``2-26-2/q2g16`` keeps every
block and rounds it to 2 bits in groups of 16 (``q34g16``: 3 and 4 bits in turn); ``gain1.5``
plugs in 1.5 x what tuning changed. A preset name (``smollm2-135m/q34g16``) is taken as it is.

Every result is appended to ``OUT/sweep.jsonl`` as it is measured, so an interrupted sweep
resumes; tuned adapters are kept in ``OUT/adapters`` and shared by emulators that differ only in
the gain.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from offsite.cloud.evaluate import LABELS, METRICS, EvalConfig, Report, five_setting_eval, write_report
from offsite.cloud.models import load_base
from offsite.cloud.prepare import config_for, prepare_bundle
from offsite.cloud.presets import PRESETS, Preset, check_gain
from offsite.emulator.corpus import MODEL_SAMPLES
from offsite.emulator.data import Example, MCRow, read_examples, read_test_rows
from offsite.emulator.quantize import Quantize
from offsite.emulator.sandwich import SandwichShape
from offsite.emulator.tune import TuneConfig, recorded_tuning
from offsite.protocol.adapter import load_update, save_update
from offsite.protocol.bundle import sha256_file
from offsite.protocol.safe_json import JSONRefused, parse_json

log = logging.getLogger(__name__)

SPEC = re.compile(
    r"(?P<shape>\d+-\d+-\d+)((/kd(?P<kd>\d+))|(/kl(?P<kl>\d+(\.\d+)?))|(/(?P<cka>cka))|(/(?P<samples>samples))"
    r"|(/q(?P<bits>[1-8]+)g(?P<group>\d+))|(/gain(?P<gain>[0-9.]+)))*"
)
SPEC_HELP = "SHAPE[/kdSTEPS][/klWEIGHT][/cka][/samples][/qBITSgGROUP][/gainG]"
BASELINES = ("full_zero_shot", "full_ft")
EMULATOR_SETTINGS = ("emulator_zero_shot", "emulator_ft", "plug_in")


def parse_emulator(text: str, base: Preset) -> Preset:
    """A preset name, or ``SHAPE[/kdSTEPS][/klWEIGHT][/cka][/samples][/qBITSgGROUP][/gainG]`` on top
    of ``base``'s recipe: ``kl`` adds a KL term to the full model's logits to the distillation,
    ``cka`` keeps the middle blocks chosen by CKA (emulator/select.py) instead of uniformly,
    ``samples`` distils on the model's own text (``--corpus model-samples``) whatever ``--corpus`` says."""
    if text in PRESETS:
        return PRESETS[text]
    match = SPEC.fullmatch(text)
    if match is None:
        raise ValueError(
            f"emulator {text!r}: expected a preset name or {SPEC_HELP}, e.g. 2-10-2/kd60 or 2-26-2/q34g16/gain1.5"
        )
    kd, kl, bits, group, gain = (match.group(k) for k in ("kd", "kl", "bits", "group", "gain"))
    distill = dataclasses.replace(base.distill, steps=int(kd)) if kd is not None else base.distill
    if kl is not None:
        distill = dataclasses.replace(distill, kl_weight=float(kl))
    return dataclasses.replace(
        base,
        name=text,
        shape=SandwichShape.parse(match.group("shape")),
        distill=distill,
        select="cka" if match.group("cka") else "uniform",
        corpus=MODEL_SAMPLES if match.group("samples") else base.corpus,
        quantize=Quantize(tuple(int(b) for b in bits), int(group)) if bits else None,
        plugin_gain=check_gain(float(gain)) if gain is not None else 1.0,
        description=f"sweep emulator {text}",
    )


@dataclass(frozen=True)
class SweepJob:
    emulators: tuple[Preset, ...]
    train: Path
    test: Path
    out: Path
    task: str
    tune: TuneConfig
    test_rows: int | None = None
    val_rows: int = 0  # > 0: score on the train file's last N rows, which tuning never sees
    model: str | None = None
    corpus: str = "python-docs"


def load_rows(job: SweepJob) -> tuple[str, list[Example], list[MCRow] | list[Example]]:
    """The task's kind, its training examples and the rows scored (test rows, or held-out train rows)."""
    train = read_examples(job.train)
    if not job.val_rows:
        kind, test = read_test_rows(job.test, limit=job.test_rows)
        return kind, train, test
    if job.val_rows >= len(train):
        raise ValueError(f"--val-rows {job.val_rows}: the train file {job.train} has only {len(train)} rows")
    kind, rows = read_test_rows(job.train)
    return kind, train[: -job.val_rows], rows[-job.val_rows :]


@dataclass
class _Inputs:
    """What every measurement of one sweep shares."""

    base: object
    tokenizer: object
    train: list[Example]
    test: list
    kind: str
    identity: dict  # what the records must agree on to be one sweep
    progress: bool


def run_sweep(job: SweepJob, progress: bool = True) -> list[Report]:
    """One report per emulator, each with the shared baselines of its adapter cut; written to ``job.out``."""
    kind, train, test = load_rows(job)
    job.out.mkdir(parents=True, exist_ok=True)
    identity = {
        "task": job.task,
        "rows": len(test),
        "val_rows": job.val_rows,
        "tune": dataclasses.asdict(job.tune),
        "test_sha256": sha256_file(job.train if job.val_rows else job.test),
        "model": job.model,
    }
    records = _read_records(job.out / "sweep.jsonl", identity)  # before minutes of loading
    base, tokenizer, where = load_base(job.model or job.emulators[0].base)
    log.info("base model from %s; %d emulators on %d %s rows", where, len(job.emulators), len(test), kind.upper())
    inputs = _Inputs(base, tokenizer, train, test, kind, identity, progress)
    reports = [_emulator_report(job, records, inputs, preset) for preset in job.emulators]
    where = "held-out train rows" if job.val_rows else "test rows"
    write_report(reports, job.out / "report", title=f"emulator sweep on {job.task} ({len(test)} {where})")
    plot_frontier(
        reports, job.out / "report" / "frontier.png", f"{job.task}: privacy-utility frontier ({len(test)} {where})"
    )
    return reports


def _emulator_report(job: SweepJob, records: dict, inputs: _Inputs, preset: Preset) -> Report:
    """The emulator's report: its cut's baselines and its own settings, measured unless recorded."""
    cut = f"{preset.shape.a}+{preset.shape.b}"
    if (cut, "baselines") not in records:
        key = inputs.identity | {"cut": cut, "what": "baselines"}
        records[cut, "baselines"] = _measure(job, key, inputs, preset, BASELINES)
    if (preset.name, "emulator") not in records:
        sibling = _same_emulator(records, preset.name)  # the same emulator and adapter at another gain
        settings = ("plug_in",) if sibling else EMULATOR_SETTINGS
        key = inputs.identity | {"emulator": preset.name, "what": "emulator"}
        shared = sibling["results"] if sibling else {}
        records[preset.name, "emulator"] = _measure(job, key, inputs, preset, settings, shared=shared)
    report = Report(task=job.task, test_rows=len(inputs.test), train_rows=len(inputs.train), kind=inputs.kind)
    for record in (records[cut, "baselines"], records[preset.name, "emulator"]):
        report.results.update(record["results"])
    emulator_meta = records[preset.name, "emulator"]["meta"]
    report.meta = {"preset": preset.name, "plugin_gain": preset.plugin_gain, "val_rows": job.val_rows, **emulator_meta}
    return report


def adapter_name(emulator: str) -> str:
    """Emulators that differ only in the plug-in gain share one tuned adapter."""
    return re.sub(r"/gain[0-9.]+", "", emulator)


def _same_emulator(records: dict, name: str) -> dict | None:
    """An emulator record measured with the same emulator and adapter (another gain), if any."""
    for (other, what), record in records.items():
        if what == "emulator" and other != name and adapter_name(other) == adapter_name(name):
            return record
    return None


def _measure(job: SweepJob, key: dict, inputs: _Inputs, preset: Preset, settings, shared: dict | None = None) -> dict:
    """Score ``settings`` and append the record; ``shared``: results of another gain's record that hold
    here too (emulator zero-shot and emulator-FT do not depend on the gain)."""
    base, tokenizer, train, test, progress = inputs.base, inputs.tokenizer, inputs.train, inputs.test, inputs.progress
    bundle = prepare_bundle(
        base, tokenizer, config_for(preset, job.corpus), job.out / "bundles" / slug(preset.name), progress=progress
    )
    adapter_file = job.out / "adapters" / f"{slug(adapter_name(preset.name))}.safetensors"
    adapter = None
    if {"emulator_ft", "plug_in"} & set(settings) and adapter_file.is_file():
        adapter, meta = load_update(adapter_file)
        if meta.get("bundle") != bundle.digest:
            adapter = None
    config = EvalConfig(settings=settings, plugin_gain=preset.plugin_gain)
    report, update = five_setting_eval(
        base, tokenizer, bundle, train, test, job.tune, config, task=job.task, adapter=adapter, progress=progress
    )
    if adapter is None and update is not None:
        alpha = job.tune.lora.alpha if job.tune.mode == "lora" else None
        save_update(adapter_file, update, {"mode": job.tune.mode, "lora_alpha": alpha, "bundle": bundle.digest})
    meta = {k: report.meta[k] for k in ("middle_nmse_at_answer", "emulator_tuning", "full_tuning") if k in report.meta}
    record = key | {"results": {**(shared or {}), **report.results}, "meta": meta | {"bundle_digest": bundle.digest}}
    with open(job.out / "sweep.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def _read_records(path: Path, identity: dict) -> dict[tuple[str, str], dict]:
    """What an earlier run of the same sweep measured, keyed by (cut or emulator, what). A record
    measured on other rows, another task, tuning or model is refused: that is another sweep."""
    records = {}
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = parse_json(line)
            key = (record.get("cut") or record["emulator"], record["what"])
        except (JSONRefused, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{path}:{number}: not a sweep record ({error}); move the file away to start afresh"
            ) from None
        record = {**record, "tune": recorded_tuning(record.get("tune"))}  # a setting added since: its default
        differs = sorted(k for k, v in identity.items() if record.get(k) != v)
        if differs:
            raise ValueError(
                f"{path}:{number}: measured with another {', '.join(differs)}: that is another sweep; "
                "give another --out"
            )
        records[key] = record
    return records


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name)


def plot_frontier(reports: list[Report], path: Path, title: str) -> None:
    """Emulator-FT (what the data owners' tuned emulator is worth) against the plug-in (what the
    operator gets), one point per emulator with ± one s.e.; full zero-shot and full FT as lines.
    Points above the diagonal keep a privacy gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, higher, _ = METRICS[reports[0].kind]
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    xs = [r.value("emulator_ft") for r in reports]
    ys = [r.value("plug_in") for r in reports]
    ax.errorbar(
        xs,
        ys,
        xerr=[r.results["emulator_ft"]["stderr"] for r in reports],
        yerr=[r.results["plug_in"]["stderr"] for r in reports],
        fmt="o",
        capsize=3,
    )
    names = []  # points are numbered; the legend names them (names of close points would overlap)
    for number, (r, x, y) in enumerate(zip(reports, xs, ys), 1):
        ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        names.append(f"{number}: {r.meta['preset']}")
    values = xs + ys + [r.value(s) for r in reports for s in BASELINES]
    low, high = min(values), max(values)
    pad = 0.08 * (high - low or 1)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], ":", color="grey", label="plug-in = emulator-FT")
    for setting, style in zip(BASELINES, ("--", "-.")):
        for value in sorted({r.value(setting) for r in reports}):
            ax.axhline(
                value,
                linestyle=style,
                color="tab:red" if setting == "full_ft" else "tab:green",
                linewidth=1,
                label=f"{LABELS[setting]} {value:.3f}",
            )
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    if not higher:  # NLL: lower is better, so flip the axes and "better" stays up and to the right
        ax.invert_xaxis()
        ax.invert_yaxis()
    name = "accuracy" if metric == "accuracy" else "completion NLL, nats/token"
    ax.set_xlabel(f"emulator-FT {name}: what the data owners get")
    ax.set_ylabel(f"plug-in {name}: what the operator gets")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.text(1.02, 1.0, "\n".join(names), transform=ax.transAxes, fontsize=7, va="top", family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
