"""`offsite report`: pieces of one five-setting table joined, and runs that are not one experiment refused."""

import dataclasses
import json
import math

import pytest

from offsite.cli import main
from offsite.cloud.combine import ReportError, combine
from offsite.cloud.evaluate import Report, write_report
from offsite.emulator.tune import TuneConfig

RECIPE = {"preset": "p/x", "test_sha256": "ab" * 32, "tune": {"lr": 1e-4, "steps": 120}, "bundle_digest": "cd" * 32}


def _result(correct: int, rows: int = 200) -> dict:
    accuracy = correct / rows
    return {"accuracy": accuracy, "stderr": (accuracy * (1 - accuracy) / rows) ** 0.5, "correct": correct}


def _run(tmp_path, name: str, results: dict[str, int], task: str = "hyperbaton", **meta) -> str:
    report = Report(
        task=task,
        test_rows=200,
        train_rows=800,
        results={k: _result(v) for k, v in results.items()},
        meta={**RECIPE, **meta},
    )
    write_report([report], tmp_path / name / "report")
    return tmp_path / name


def test_a_report_round_trips_through_json(tmp_path):
    run = _run(tmp_path, "a", {"full_zero_shot": 98, "plug_in": 130}, plugin_gain=1.5)
    saved = json.loads((run / "report" / "report.json").read_text())[0]
    again = Report.from_dict(saved)
    assert again.to_dict() == saved
    assert again.privacy_gap is None and again.accuracy("plug_in") == 0.65


def test_pieces_of_one_table_join_and_gaps_span_them(tmp_path):
    first = _run(tmp_path, "a", {"emulator_ft": 150, "plug_in": 130}, plugin_gain=1.5)
    rest = _run(tmp_path, "b", {"full_zero_shot": 98, "emulator_zero_shot": 99, "full_ft": 170})
    other = _run(tmp_path, "c", {"full_zero_shot": 100, "plug_in": 101}, task="sports_understanding")
    (joined, sports) = combine([first, rest / "report" / "report.json", other])
    assert [joined.task, sports.task] == ["hyperbaton", "sports_understanding"]
    assert {k: v["correct"] for k, v in joined.results.items()} == {
        "emulator_ft": 150,
        "plug_in": 130,
        "full_zero_shot": 98,
        "emulator_zero_shot": 99,
        "full_ft": 170,
    }
    assert joined.privacy_gap == pytest.approx(-0.1) and joined.utility_gap == pytest.approx(0.2)  # across the two runs
    assert joined.meta["plugin_gain"] == 1.5 and joined.meta["preset"] == "p/x"
    assert [s["settings"] for s in joined.meta["sources"]] == [
        ["emulator_ft", "plug_in"],
        ["full_zero_shot", "emulator_zero_shot", "full_ft"],
    ]


def test_the_same_setting_twice_must_agree_to_the_row(tmp_path):
    a = _run(tmp_path, "a", {"full_zero_shot": 98, "plug_in": 130})
    same = _run(tmp_path, "b", {"full_zero_shot": 98, "full_ft": 170})
    assert combine([a, same])[0].accuracy("full_zero_shot") == 0.49
    differs = _run(tmp_path, "c", {"full_zero_shot": 99})
    with pytest.raises(
        ReportError, match=r"full_zero_shot measured twice.*a/report/report.json 0.490.*c/report/report.json 0.495"
    ):
        combine([a, differs])


@pytest.mark.parametrize(
    "field, value",
    [
        ("test_sha256", "ef" * 32),  # another test file
        ("tune", {"lr": 3e-4, "steps": 120}),  # another learning rate
        ("bundle_digest", "00" * 32),  # another emulator
        ("plugin_gain", 2.0),  # another gain (the first run recorded 1.5)
    ],
)
def test_runs_of_another_recipe_are_refused_by_name(tmp_path, field, value):
    a = _run(tmp_path, "a", {"plug_in": 130}, plugin_gain=1.5)
    b = _run(tmp_path, "b", {"full_ft": 170}, **{field: value})
    with pytest.raises(
        ReportError, match=rf"hyperbaton: .*a/report/report.json and .*b/report/report.json differ in '{field}'"
    ):
        combine([a, b])


def test_another_preset_gets_its_own_row(tmp_path):
    a = _run(tmp_path, "a", {"full_zero_shot": 98, "plug_in": 130})
    b = _run(tmp_path, "b", {"full_zero_shot": 98, "plug_in": 101}, preset="p/y", bundle_digest="ee" * 32)
    out = tmp_path / "out"
    assert main(["report", str(a), str(b), "--out", str(out), "--title", "two recipes"]) == 0
    text = (out / "report.md").read_text()
    assert (
        "| p/x: hyperbaton (200, acc) | 0.490 | 0.650 |" in text
        and "| p/y: hyperbaton (200, acc) | 0.490 | 0.505 |" in text
    )
    assert len(json.loads((out / "report.json").read_text())) == 2 and (out / "report.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not JSON"),
        ("[" * 100_000, "not JSON"),  # nesting past the recursion limit
        ('[{"task": 1' + "0" * 5000 + "}]", "not JSON"),  # an integer literal past Python's 4,300 digits
        ('{"task": "x"}', "expected a list of reports"),
        (
            '[{"task": "x", "test_rows": 10, "train_rows": 5, "results": {"best_setting": {}}}]',
            "report 0: unknown setting 'best_setting'",
        ),
        (
            '[{"task": "x", "test_rows": 10, "train_rows": 5, "results": {"plug_in": {"accuracy": "high"}}}]',
            "report 0: plug_in: needs numeric",
        ),
        ('[{"task": "x", "test_rows": -1, "train_rows": 5}]', "report 0: 'task' must be a string"),
        ('[{"task": "x", "train_rows": 5}]', "report 0: missing 'test_rows'"),
    ],
)
def test_a_bad_report_file_is_named(tmp_path, capsys, content, message):
    path = tmp_path / "report.json"
    path.write_text(content)
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and message in err
    assert not (tmp_path / "out").exists()


def test_a_run_without_a_report_is_named(tmp_path, capsys):
    (tmp_path / "job").mkdir()
    assert main(["report", str(tmp_path / "job"), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'job'}: no report.json" in capsys.readouterr().err


def _sft_result(nll: float, tokens: int = 4000) -> dict:
    return {"nll": nll, "stderr": 0.05, "ppl": math.exp(nll), "tokens": tokens}


def test_an_sft_report_round_trips_through_offsite_report_with_its_gaps_the_right_way_round(tmp_path):
    """Lower NLL is better: the plug-in 0.3 nats under emulator-FT is a privacy gap of +0.3, and a
    piece scoring the other settings joins it."""
    nll = {"full_zero_shot": 4.3, "emulator_zero_shot": 6.9, "emulator_ft": 5.4, "plug_in": 5.1, "full_ft": 3.6}
    pieces = [("a", ("emulator_ft", "plug_in")), ("b", ("full_zero_shot", "emulator_zero_shot", "full_ft"))]
    for name, settings in pieces:
        report = Report(
            task="jargon_entries",
            test_rows=300,
            train_rows=1788,
            kind="sft",
            results={s: _sft_result(nll[s]) for s in settings},
            meta=dict(RECIPE),
        )
        write_report([report], tmp_path / name / "report")
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    (joined,) = [Report.from_dict(r) for r in json.loads((out / "report.json").read_text())]
    assert joined.kind == "sft" and joined.metric == "nll" and joined.value("plug_in") == 5.1
    assert math.isclose(joined.privacy_gap, 0.3) and math.isclose(joined.utility_gap, 1.5)
    assert math.isclose(joined.recovery, (5.1 - 4.3) / (3.6 - 4.3))  # negative: the plug-in is worse than zero-shot
    text = (out / "report.md").read_text()
    assert "privacy gap (emulator-FT - plug-in): +0.300 nats/token" in text
    assert "| plug-in | 5.100 | 0.050 | 164.02 |" in text and "4000 completion tokens" in text


def test_an_mc_piece_does_not_join_an_sft_piece(tmp_path):
    _run(tmp_path, "a", {"plug_in": 130}, task="t")
    write_report(
        [
            Report(
                task="t",
                test_rows=200,
                train_rows=800,
                kind="sft",
                results={"full_ft": _sft_result(3.0)},
                meta=dict(RECIPE),
            )
        ],
        tmp_path / "b" / "report",
    )
    with pytest.raises(ReportError, match="scored MC rows, .*b/report/report.json SFT rows"):
        combine([tmp_path / "a", tmp_path / "b"])


def test_a_report_written_before_a_tuning_setting_existed_still_joins(tmp_path):
    today = dataclasses.asdict(TuneConfig())
    older = json.loads(json.dumps(today))
    del older["lora"]["freeze_a"], older["lora"]["init_seed"]  # LoRASpec before federated LoRA
    first = _run(tmp_path, "a", {"full_zero_shot": 98, "full_ft": 170}, tune=older)
    rest = _run(tmp_path, "b", {"emulator_ft": 150, "plug_in": 130}, tune=today)
    (joined,) = combine([first, rest])
    assert set(joined.results) == {"full_zero_shot", "full_ft", "emulator_ft", "plug_in"}
    changed = _run(tmp_path, "c", {"plug_in": 131}, tune={**older, "lr": 3e-4})
    with pytest.raises(ReportError, match="differ in 'tune'"):
        combine([first, changed])
