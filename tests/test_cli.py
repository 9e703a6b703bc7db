import subprocess
import sys

import pytest

from offsite.cli import build_parser, main
from tests.conftest import write_jsonl


def test_help_lists_every_command():
    text = build_parser().format_help()
    for command in ("cloud", "client", "eval", "report", "demo", "presets"):
        assert command in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["cloud", "--help"],
        ["client", "train", "--help"],
        ["eval", "--help"],
        ["report", "--help"],
        ["demo", "--help"],
    ],
)
def test_console_script_help(argv):
    result = subprocess.run([sys.executable, "-m", "offsite.cli", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: offsite" in result.stdout


def test_an_unknown_preset_is_named_plainly(tmp_path, capsys):
    code = main(["eval", "--preset", "nope/x", "--task", "hyperbaton", "--out", str(tmp_path / "job")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(
        "offsite: error: unknown preset 'nope/x'; known: "
    )  # not a KeyError's quoted repr
    assert "smollm2-135m/default" in err and not (tmp_path / "job").exists()


def test_tune_options_replace_only_what_is_given():
    from offsite.cloud.presets import get_preset
    from offsite.emulator.options import tune_config_from_args

    base = get_preset("smollm2-135m/q34g16").tune
    assert base.schedule == "constant"
    args = build_parser().parse_args(
        ["eval", "--preset", "smollm2-135m/q34g16", "--out", "j", "--schedule", "cosine", "--lr", "3e-4"]
    )
    tune = tune_config_from_args(args, base)
    assert (tune.schedule, tune.lr) == ("cosine", 3e-4)
    assert (tune.steps, tune.batch_size, tune.mode) == (
        base.steps,
        base.batch_size,
        base.mode,
    )  # the preset's, untouched
    assert tune_config_from_args(build_parser().parse_args(["eval", "--out", "j"]), base) == base
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--out", "j", "--schedule", "linear"])


def test_client_train_names_the_bad_line(tmp_path, capsys, tokenizer):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"prompt": "ok", "completion": " fine"}])
    with open(data, "a") as handle:
        handle.write('{"prompt": "x", "choices": [" a", " b"], "answer": 7}\n')
    bundle = _tiny_bundle(tmp_path, tokenizer)
    code = main(
        [
            "client",
            "train",
            "--bundle",
            str(bundle),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "u.safetensors"),
            "--steps",
            "1",
        ]
    )
    assert code == 2
    assert f"{data}:2:" in capsys.readouterr().err
    assert not (tmp_path / "u.safetensors").exists()


def test_client_train_writes_an_update(tmp_path, tokenizer):
    from offsite.protocol.adapter import load_update

    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"prompt": f"q{i}", "choices": [" a", " b"], "answer": i % 2} for i in range(6)])
    bundle = _tiny_bundle(tmp_path, tokenizer)
    out = tmp_path / "u.safetensors"
    assert (
        main(
            [
                "client",
                "train",
                "--bundle",
                str(bundle),
                "--data",
                str(data),
                "--out",
                str(out),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    tensors, meta = load_update(out)
    assert meta["mode"] == "blocks" and meta["num_examples"] == 6
    assert {int(k.split(".")[1]) for k in tensors} == {0, 1, 6, 7}


def _tiny_bundle(tmp_path, tokenizer):
    from offsite.emulator.sandwich import SandwichShape, build_emulator
    from offsite.protocol.bundle import write_bundle
    from tests.conftest import tiny_model

    shape = SandwichShape(2, 2, 2)
    emulator, layout = build_emulator(tiny_model("llama"), shape)
    info = {
        "family": "llama",
        "shape": {"a": 2, "k": 2, "b": 2, "n_blocks": 8},
        "layout": layout,
        "adapter_blocks": shape.adapter_blocks(8),
        "kept_middle": shape.kept_middle(8),
    }
    return write_bundle(tmp_path / "bundle", emulator, tokenizer, info).root
