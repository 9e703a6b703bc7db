import json

import pytest
import torch
from safetensors.torch import load_file

from offsite.emulator.arch import blocks_of
from offsite.emulator.sandwich import SandwichShape, build_emulator
from offsite.protocol.bundle import (
    MANIFEST,
    WEIGHTS,
    BundleError,
    BundleReason,
    load_emulator,
    load_tokenizer,
    read_bundle,
    write_bundle,
)
from tests.conftest import VOCAB, tiny_model


def _write(tmp_path, tokenizer, family="llama"):
    model = tiny_model(family)
    shape = SandwichShape(2, 2, 2)
    emulator, layout = build_emulator(model, shape)
    info = {
        "family": family,
        "shape": {"a": 2, "k": 2, "b": 2, "n_blocks": 8},
        "layout": layout,
        "adapter_blocks": shape.adapter_blocks(8),
        "kept_middle": shape.kept_middle(8),
    }
    return emulator, write_bundle(tmp_path / "bundle", emulator, tokenizer, info)


def test_round_trip_is_bit_exact(tmp_path, tokenizer, family):
    emulator, bundle = _write(tmp_path, tokenizer, family)
    loaded = load_emulator(read_bundle(bundle.root))
    original, restored = emulator.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    for key in original:
        assert original[key].dtype == restored[key].dtype
        assert torch.equal(original[key], restored[key]), key
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, emulator(ids).logits)
    assert load_tokenizer(bundle)("hello a b")["input_ids"] == tokenizer("hello a b")["input_ids"]
    assert read_bundle(bundle.root).digest == bundle.digest


def test_bundle_holds_only_safetensors_and_json(tmp_path, tokenizer):
    _, bundle = _write(tmp_path, tokenizer)
    names = [p.name for p in bundle.root.rglob("*") if p.is_file()]
    assert all(n.endswith((".safetensors", ".json", ".jinja")) for n in names), names
    manifest = json.loads((bundle.root / MANIFEST).read_text())
    assert manifest["layout"] == [0, 1, 2, 5, 6, 7]
    assert set(manifest["files"]) == {
        n
        for n in (p.relative_to(bundle.root).as_posix() for p in bundle.root.rglob("*") if p.is_file())
        if n != MANIFEST
    }


def test_tampered_weights_are_refused(tmp_path, tokenizer):
    _, bundle = _write(tmp_path, tokenizer)
    path = bundle.root / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 does not match"):
        read_bundle(bundle.root)


def test_tampered_tokenizer_is_refused(tmp_path, tokenizer):
    _, bundle = _write(tmp_path, tokenizer)
    path = bundle.root / "tokenizer" / "tokenizer.json"
    path.write_text(path.read_text().replace("<eos>", "<EOS>"))
    with pytest.raises(BundleError, match="tokenizer.json"):
        read_bundle(bundle.root)


def test_unlisted_file_is_refused(tmp_path, tokenizer):
    _, bundle = _write(tmp_path, tokenizer)
    (bundle.root / "extra.bin").write_bytes(b"\x80\x04")
    with pytest.raises(BundleError, match="not in the manifest"):
        read_bundle(bundle.root)


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda m: m.update(format="other/9"), "format"),
        (lambda m: m.update(layout="0,1"), "layout"),
        (lambda m: m["files"].update({"../escape.json": {"sha256": "0" * 64, "bytes": 1}}), "escapes|missing"),
        (lambda m: m["files"][WEIGHTS].update(bytes=1), "bytes"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, tokenizer, edit, reason):
    _, bundle = _write(tmp_path, tokenizer)
    manifest = json.loads((bundle.root / MANIFEST).read_text())
    edit(manifest)
    (bundle.root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=reason):
        read_bundle(bundle.root)


def test_manifest_that_is_not_json_is_refused(tmp_path, tokenizer):
    _, bundle = _write(tmp_path, tokenizer)
    (bundle.root / MANIFEST).write_bytes(b"\x80\x04\x95 pickle-ish")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(bundle.root)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tokenizer):
    _, bundle = _write(tmp_path, tokenizer)
    manifest = json.loads((bundle.root / MANIFEST).read_text())
    manifest["config"]["num_hidden_layers"] = 3
    (bundle.root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not fit"):
        load_emulator(read_bundle(bundle.root))


def test_weights_file_is_plain_safetensors(tmp_path, tokenizer):
    emulator, bundle = _write(tmp_path, tokenizer)
    tensors = load_file(str(bundle.root / WEIGHTS))
    assert "model.layers.5.mlp.up_proj.weight" in tensors


# edits of an unsigned bundle's manifest, each written back as plain JSON (the files' hashes are
# untouched, so only the manifest's own checks can catch them), and the words the refusal uses
MANIFEST_EDITS = [
    (lambda m: m.update(extra=1), "unknown keys \\['extra'\\]"),
    (lambda m: m.update(adapter_override=[2, 3]), "unknown keys"),
    (lambda m: m.update(trust_remote_code=True), "unknown keys"),
    (lambda m: m.pop("model_type"), "missing keys \\['model_type'\\]"),
    (lambda m: m.pop("shape"), "missing keys \\['shape'\\]"),
    (
        lambda m: m.update(adapter_blocks=[0, 1, 2, 6, 7]),
        "'adapter_blocks' .* is not the 2-2-2 cut",
    ),  # a middle block made trainable
    (lambda m: m.update(adapter_blocks=[0, 1, 5, 7]), "'adapter_blocks'"),
    (lambda m: m.update(adapter_blocks=[0, 1]), "'adapter_blocks'"),
    (lambda m: m.update(adapter_blocks=[]), "'adapter_blocks'"),
    (lambda m: m.update(adapter_blocks=[7, 6, 1, 0]), "'adapter_blocks'"),
    (lambda m: m.update(adapter_blocks=[0, 1, 6, 7, 7]), "'adapter_blocks'"),
    (lambda m: m.update(kept_middle=[3, 4]), "'layout'"),  # other kept blocks than the layout holds
    (lambda m: m.update(kept_middle=[5, 2], layout=[0, 1, 5, 2, 6, 7]), "'kept_middle'"),  # out of order
    (lambda m: m.update(kept_middle=[2, 2], layout=[0, 1, 2, 2, 6, 7]), "'kept_middle'"),  # a block repeated
    (lambda m: m.update(kept_middle=[1, 5], layout=[0, 1, 1, 5, 6, 7]), "'kept_middle'"),  # an adapter block
    (lambda m: m.update(kept_middle=[2, 6], layout=[0, 1, 2, 6, 6, 7]), "'kept_middle'"),
    (lambda m: m.update(layout=[0, 1, 3, 4, 6, 7]), "'layout'"),
    (lambda m: m.update(layout=[0, 1, 2, 5, 6]), "not a cut of the 5-block layout"),
    (lambda m: m["shape"].update(a=3), "not a cut"),
    (
        lambda m: m["shape"].update(a=3, k=1),
        "is not the 3-1-2 cut of 8 blocks",
    ),  # a plausible shape, not the listed cut
    (lambda m: m["shape"].update(n_blocks=9), "is not the 2-2-2 cut of 9 blocks"),
    (lambda m: m["shape"].update(k=10**9), "not a cut"),
    (lambda m: m["shape"].update(a=-1), "'shape' must be"),
    (lambda m: m["shape"].update(b=True), "'shape' must be"),
    (lambda m: m["shape"].update(extra=1), "'shape' must be"),
    (lambda m: m.update(shape=[2, 2, 2, 8]), "'shape' must be"),
    (lambda m: m.update(model_type="gpt2"), "'model_type' 'gpt2' is not the config's 'llama'"),
    (lambda m: m.update(family=None), "'family' and 'model_type' must be strings"),
    (lambda m: m.update(packed=[1]), "'packed' must be an object"),
    (lambda m: m.update(distill="x"), "'distill' must be an object"),
]


@pytest.mark.parametrize(("edit", "says"), MANIFEST_EDITS)
def test_an_edited_manifest_of_an_unsigned_bundle_is_refused(tmp_path, tokenizer, edit, says):
    """No key to check a signature with: the manifest must still hold only known keys and exactly
    the cut its shape names, so an edited adapter (or anything riding along) is refused."""
    _, bundle = _write(tmp_path, tokenizer)
    manifest = json.loads((bundle.root / MANIFEST).read_text())
    edit(manifest)
    (bundle.root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=says) as caught:
        read_bundle(bundle.root)
    assert caught.value.reason is BundleReason.MALFORMED and str(bundle.root / MANIFEST) in str(caught.value)


@pytest.mark.parametrize(
    "bomb", [b"[" * 1500, b'{"a":' * 100_000, b'{"format": ' + b"1" * 5000 + b"}", b'{"x": 1e999}', b'{"a":1,"a":2}']
)
def test_a_manifest_that_breaks_the_json_parser_is_refused(tmp_path, tokenizer, bomb):
    _, bundle = _write(tmp_path, tokenizer)
    (bundle.root / MANIFEST).write_bytes(bomb)
    with pytest.raises(BundleError, match="not valid JSON") as caught:
        read_bundle(bundle.root)
    assert caught.value.reason is BundleReason.MALFORMED


def test_a_consistent_cut_that_the_weights_do_not_hold_is_refused(tmp_path, tokenizer):
    """Shape, layout, adapter and kept blocks edited together into a 2-1-2 cut: the manifest is
    consistent, but the weights hold six blocks, not five."""
    _, bundle = _write(tmp_path, tokenizer)
    manifest = json.loads((bundle.root / MANIFEST).read_text())
    manifest.update(shape={"a": 2, "k": 1, "b": 2, "n_blocks": 8}, layout=[0, 1, 2, 6, 7], kept_middle=[2])
    (bundle.root / MANIFEST).write_text(json.dumps(manifest))
    edited = read_bundle(bundle.root)
    with pytest.raises(BundleError, match="the weights hold 6 blocks, the manifest's cut 5"):
        load_emulator(edited)


def test_a_cut_that_keeps_other_middle_blocks_than_the_uniform_choice_is_read(tmp_path, tokenizer):
    """A CKA-chosen emulator keeps middle blocks 3 and 4 of 2..5, not the uniform 2 and 5: the
    manifest names them, and the bundle reads and loads as that cut."""
    shape, model = SandwichShape(2, 2, 2), tiny_model("llama")
    emulator, layout = build_emulator(model, shape, kept=[3, 4])
    info = {"family": "llama", "shape": {"a": 2, "k": 2, "b": 2, "n_blocks": 8}, "layout": layout}
    info |= {"adapter_blocks": shape.adapter_blocks(8), "kept_middle": [3, 4]}
    bundle = read_bundle(write_bundle(tmp_path / "b", emulator, tokenizer, info).root)
    assert bundle.manifest["layout"] == [0, 1, 3, 4, 6, 7]
    loaded = blocks_of(load_emulator(bundle))
    assert len(loaded) == 6
    for position, original in ((2, 3), (3, 4), (4, 6)):
        for (name, got), want in zip(
            loaded[position].state_dict().items(), blocks_of(model)[original].state_dict().values()
        ):
            assert torch.equal(got, want), (position, name)


def test_write_bundle_refuses_info_a_reader_would_refuse(tmp_path, tokenizer):
    emulator, layout = build_emulator(tiny_model("llama"), SandwichShape(2, 2, 2))
    info = {
        "family": "llama",
        "shape": {"a": 2, "k": 2, "b": 2, "n_blocks": 8},
        "layout": layout,
        "adapter_blocks": [0, 1, 6, 7],
        "kept_middle": [2, 5],
        "notes": "x",
    }
    with pytest.raises(ValueError, match="'notes'"):
        write_bundle(tmp_path / "b", emulator, tokenizer, info)
