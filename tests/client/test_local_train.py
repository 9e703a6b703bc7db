"""``offsite client train`` on hostile local input: every bad data file is ``file:line: reason``
and exit 2 (never a traceback), a line is read with a bound (never the whole of an endless one),
and with ``--coordinator-key`` an edited bundle is refused before anything is trained on it."""

from __future__ import annotations

import json
import os
import tracemalloc

import pytest

from offsite.cli import main
from offsite.emulator.data import MAX_LINE_BYTES, DataFormatError, read_examples
from offsite.emulator.sandwich import SandwichShape, build_emulator
from offsite.protocol.adapter import load_update
from offsite.protocol.bundle import MANIFEST, SIGNATURE, write_bundle
from offsite.protocol.bundle_signing import sign_bundle
from offsite.protocol.keys import COORDINATOR_PUBLIC, CoordinatorKeys
from tests.conftest import make_tokenizer, tiny_model, write_jsonl

GOOD_ROW = '{"prompt": "q ", "completion": "a"}\n'


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """A tiny signed bundle (2-2-2 of 8 blocks) and the coordinator's key directory."""
    root = tmp_path_factory.mktemp("signed")
    shape = SandwichShape(2, 2, 2)
    emulator, layout = build_emulator(tiny_model("llama"), shape)
    info = {
        "family": "llama",
        "shape": {"a": 2, "k": 2, "b": 2, "n_blocks": 8},
        "layout": layout,
        "adapter_blocks": shape.adapter_blocks(8),
        "kept_middle": shape.kept_middle(8),
    }
    bundle = write_bundle(root / "bundle", emulator, make_tokenizer(root), info)
    keys = CoordinatorKeys.generate()
    keys.save(root / "coordinator")
    sign_bundle(bundle.root, keys)
    return bundle.root, root / "coordinator"


def train(bundle, data, out, *extra: str) -> int:
    return main(
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
            "1",
            "--batch-size",
            "1",
            "--device",
            "cpu",
            *extra,
        ]
    )


GOOD = GOOD_ROW.encode()
# name -> (the file's lines, or "dir"/"fifo"; what follows ``offsite: error: {path}``)
HOSTILE_DATA = {
    "nested-lists": ([GOOD, b"[" * 100_000 + b"\n"], ":2: not valid JSON (nested deeper"),
    "nested-objects": ([GOOD, GOOD, b'{"a":' * 50_000 + b"\n"], ":3: not valid JSON (nested deeper"),
    "deep-but-parseable": (
        [b'{"prompt": "q", "completion": "a", "x": ' + b"[" * 70 + b"]" * 70 + b"}\n"],
        ":1: not valid JSON (nested deeper than 64",
    ),
    "big-int": (
        [GOOD, GOOD, b'{"prompt": "q", "choices": ["a", "b"], "answer": ' + b"1" * 4301 + b"}\n"],
        ":3: not valid JSON (an integer of 4301 digits",
    ),
    "overflowing-float": (
        [b'{"prompt": "q", "choices": ["a", "b"], "answer": 1e999}\n'],
        ":1: not valid JSON (number 1e999 is not finite",
    ),
    "nan": ([GOOD, b'{"prompt": NaN, "completion": "a"}\n'], ":2: not valid JSON (non-finite number NaN"),
    "duplicate-key": (
        [b'{"prompt": "q", "completion": "a", "completion": "b"}\n'],
        ":1: not valid JSON (duplicate keys",
    ),
    "latin-1": (
        [GOOD, '{"prompt": "caf\u00e9", "completion": "a"}\n'.encode("latin-1")],
        ":2: not valid JSON (not UTF-8",
    ),
    "long-line": (
        [GOOD, b'{"prompt": "' + b"x" * (MAX_LINE_BYTES + 10) + b'", "completion": "a"}\n'],
        f":2: line longer than {MAX_LINE_BYTES} bytes",
    ),
    "no-newline": ([b"x" * (3 * MAX_LINE_BYTES)], f":1: line longer than {MAX_LINE_BYTES} bytes"),
    "directory": ("dir", ":0: not a regular file"),
    "fifo": ("fifo", ":0: not a regular file"),  # opening it would block until a writer came
}


@pytest.mark.parametrize("name", sorted(HOSTILE_DATA))
def test_every_hostile_data_file_is_file_line_reason_and_exit_2(tmp_path, signed, capsys, name):
    bundle, _ = signed
    lines, says = HOSTILE_DATA[name]
    path = tmp_path / f"{name}.jsonl"
    if lines == "dir":
        path.mkdir()
    elif lines == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"".join(lines))
    out = tmp_path / "update.safetensors"
    assert train(bundle, path, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"offsite: error: {path}{says}"), err[:300]
    assert "Traceback" not in err and len(err) < 1000 and not out.exists()


def test_a_line_is_read_with_a_bound_not_whole(tmp_path):
    """An 8 MiB file with no newline: the reader refuses it having held about one line limit of it
    (a whole-line read would hold all 8 MiB, a 1 GB file 1 GB and more)."""
    path = tmp_path / "endless.jsonl"
    with open(path, "wb") as handle:
        for _ in range(8):
            handle.write(b"[" * (1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(DataFormatError, match=rf"endless.jsonl:1: line longer than {MAX_LINE_BYTES} bytes"):
            read_examples(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_LINE_BYTES, f"peak {peak} bytes"  # about 2x the limit here; the whole-line read held 17 MB

    # the same bound on a file of good lines ending in an endless one: the good lines are read, then it is refused
    with open(path, "wb") as handle:
        handle.write(GOOD_ROW.encode() * 1000 + b"x" * (4 << 20))
    with pytest.raises(DataFormatError, match=r":1001: line longer"):
        read_examples(path)


def test_a_bom_and_blank_lines_still_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_ROW.encode() + b"\n  \n" + GOOD_ROW.encode())
    assert len(read_examples(path)) == 2


def edited_bundles(bundle, tmp_path) -> dict[str, object]:
    """Copies of the signed bundle whose manifest.json was edited after signing (plain JSON, the
    files untouched): the adapter changed, a key added."""
    import shutil

    edits = {
        "adapter": lambda m: m.update(adapter_blocks=[0, 1, 2, 6, 7]),
        "adapter-and-cut": lambda m: m.update(
            shape={"a": 3, "k": 1, "b": 2, "n_blocks": 8},
            adapter_blocks=[0, 1, 2, 6, 7],
            kept_middle=[3],
            layout=[0, 1, 2, 3, 6, 7],
        ),
        "extra-key": lambda m: m.update(notes="trust me"),
    }
    copies = {}
    for name, edit in edits.items():
        copy = tmp_path / f"bundle-{name}"
        shutil.copytree(bundle, copy)
        manifest = json.loads((copy / MANIFEST).read_text())
        edit(manifest)
        (copy / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        copies[name] = copy
    return copies


def test_coordinator_key_refuses_an_edited_or_unsigned_bundle_and_trains_on_the_signed_one(tmp_path, signed, capsys):
    bundle, keys_dir = signed
    data = tmp_path / "data.jsonl"
    write_jsonl(data, [{"prompt": f"q{i} ", "completion": "a"} for i in range(3)])
    out = tmp_path / "update.safetensors"
    key = ["--coordinator-key", str(keys_dir / COORDINATOR_PUBLIC)]
    for name, copy in edited_bundles(bundle, tmp_path).items():
        assert train(copy, data, out, *key) == 2, name
        err = capsys.readouterr().err
        assert f"{copy / SIGNATURE}: signature does not verify" in err, err
        assert not out.exists()
    # without the key, the manifest's own checks still refuse an edited adapter or an added key;
    # a whole re-cut that stays consistent (3-1-2, same six blocks) is what only the signature catches
    for name, copy in edited_bundles(bundle, tmp_path / "again").items():
        if name == "adapter-and-cut":
            continue
        assert train(copy, data, out) == 2, name
        err = capsys.readouterr().err
        assert f"{copy / MANIFEST}: " in err and ("is not the" in err or "unknown keys ['notes']" in err), err
    unsigned = tmp_path / "bundle-unsigned"
    import shutil

    shutil.copytree(bundle, unsigned)
    (unsigned / SIGNATURE).unlink()
    assert train(unsigned, data, out, *key) == 2
    assert "the bundle is not signed" in capsys.readouterr().err
    stranger = CoordinatorKeys.generate()
    stranger.save(tmp_path / "stranger")
    assert train(bundle, data, out, "--coordinator-key", str(tmp_path / "stranger")) == 2
    assert "not by the coordinator's pinned key" in capsys.readouterr().err
    assert train(bundle, data, out, "--coordinator-key", str(tmp_path / "missing.pub.json")) == 2
    assert "missing.pub.json" in capsys.readouterr().err

    assert train(bundle, data, out, *key) == 0
    tensors, meta = load_update(out)
    assert {int(k.split(".")[1]) for k in tensors} == {0, 1, 6, 7} and meta["num_examples"] == 3
