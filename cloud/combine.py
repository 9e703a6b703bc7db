"""One table from several evaluation runs: ``offsite report RUN [RUN ...] --out DIR``.

A five-setting table is often measured in pieces: one ``offsite eval --settings ...`` run per
group of settings (two jobs on two cores), one run per task. This reads each run's
``report/report.json``, joins the pieces that measured the same thing, and writes one report: a
summary table (a row per task, a column per setting, the two gaps), each task's own table, the
JSON and the bar chart.

Runs of the same task and preset join when they are the same experiment: the same test rows and
test file, and the same recipe wherever both runs recorded it (model, bundle, tuning,
distillation, plug-in gain); runs of other presets, or of other test rows, get rows of their own.
A setting measured by two runs must agree to the row. Anything else is refused with both files
named, because a table that silently mixes two recipes reads like a result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from offsite.emulator.tune import recorded_tuning
from offsite.protocol.safe_json import JSONRefused, parse_json

from .evaluate import ROWS, Report, job_report_dir

# meta keys that say what was measured: two pieces of one table must not disagree on any of them
IDENTITY = (
    "preset",
    "model",
    "bundle_digest",
    "bundle",
    "test_sha256",
    "train_sha256",
    "tune",
    "distill",
    "plugin_gain",
)


class ReportError(ValueError):
    pass


@dataclass
class Piece:
    report: Report
    source: Path


def report_path(run: Path) -> Path:
    """``run`` itself when it is a file, else the report a job directory holds."""
    run = Path(run)
    if run.is_file():
        return run
    for candidate in (job_report_dir(run) / "report.json", run / "report.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{run}: no report.json in it or in its report/ folder (is it an `offsite eval` job?)")


def read_reports(path: Path) -> list[Report]:
    """The reports in one ``report.json`` (a list of them, as :func:`write_report` writes)."""
    try:
        data = parse_json(Path(path).read_bytes(), finite=False)  # a diverged run may record NaN
    except JSONRefused as error:
        raise ReportError(f"{path}: not JSON ({error})") from None
    if not isinstance(data, list):
        raise ReportError(f"{path}: expected a list of reports, found {type(data).__name__}")
    reports = []
    for i, item in enumerate(data):
        try:
            reports.append(Report.from_dict(item))
        except KeyError as error:
            raise ReportError(f"{path}: report {i}: missing {error}") from None
        except (TypeError, ValueError) as error:
            raise ReportError(f"{path}: report {i}: {error}") from None
    return reports


def combine(runs: list[Path]) -> list[Report]:
    """The reports of ``runs`` (job directories or report.json files), pieces of one experiment
    joined; in the order each task first appears."""
    groups: dict[tuple, list[Piece]] = {}
    for run in runs:
        path = report_path(run)
        for report in read_reports(path):
            key = (report.task, report.test_rows, report.meta.get("preset"))
            groups.setdefault(key, []).append(Piece(report, path))
    return [_join(pieces) for pieces in groups.values()]


def _join(pieces: list[Piece]) -> Report:
    first = pieces[0]
    joined = Report(
        task=first.report.task,
        test_rows=first.report.test_rows,
        train_rows=first.report.train_rows,
        kind=first.report.kind,
    )
    joined.meta = {"sources": []}
    owner: dict[str, Piece] = {}  # who set each identity key and each setting
    for piece in pieces:
        report = piece.report
        if report.kind != joined.kind:
            raise ReportError(
                f"{report.task}: {first.source} scored {joined.kind.upper()} rows, "
                f"{piece.source} {report.kind.upper()} rows"
            )
        if report.train_rows != joined.train_rows:
            raise ReportError(
                f"{report.task}: {first.source} tuned on {joined.train_rows} train rows, "
                f"{piece.source} on {report.train_rows}"
            )
        if "tune" in report.meta:  # a tuning setting added since the report was written: its default
            report.meta["tune"] = recorded_tuning(report.meta["tune"])
        for key in IDENTITY:
            if key not in report.meta:
                continue
            if key in joined.meta and joined.meta[key] != report.meta[key]:
                raise ReportError(
                    f"{report.task}: {owner[key].source} and {piece.source} differ in {key!r} "
                    f"({_short(joined.meta[key])} against {_short(report.meta[key])}): not one experiment"
                )
            joined.meta[key] = report.meta[key]
            owner.setdefault(key, piece)
        for setting, result in report.results.items():
            if setting in joined.results:
                metric = joined.metric
                if joined.results[setting].get(metric) != result.get(metric):
                    raise ReportError(
                        f"{report.task}: {setting} measured twice with different results ({metric}): "
                        f"{owner[setting].source} {joined.results[setting][metric]:.3f}, "
                        f"{piece.source} {result[metric]:.3f}"
                    )
                continue
            joined.results[setting] = result
            owner[setting] = piece
        for key in ("middle_nmse_at_answer", "federated", "privacy"):
            if key in report.meta:
                joined.meta.setdefault(key, report.meta[key])
        joined.meta["sources"].append(
            {
                "report": str(piece.source),
                "settings": sorted(report.results, key=_order),
                "seconds": report.meta.get("seconds"),
            }
        )
    return joined


def _order(setting: str) -> int:
    return ROWS.index(setting) if setting in ROWS else len(ROWS)


def _short(value: object, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."
