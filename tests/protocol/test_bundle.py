import json

import pytest
import torch
from safetensors.torch import load_file

from offsite.emulator.sandwich import SandwichShape, build_emulator
from offsite.protocol.bundle import MANIFEST, WEIGHTS, BundleError, load_emulator, load_tokenizer, read_bundle, write_bundle
from tests.conftest import VOCAB, tiny_model


def _write(tmp_path, tokenizer, family="llama"):
    model = tiny_model(family)
    shape = SandwichShape(2, 2, 2)
    emulator, layout = build_emulator(model, shape)
    info = {"family": family, "shape": {"a": 2, "k": 2, "b": 2, "n_blocks": 8}, "layout": layout,
            "adapter_blocks": shape.adapter_blocks(8), "kept_middle": shape.kept_middle(8)}
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
    assert set(manifest["files"]) == {n for n in (p.relative_to(bundle.root).as_posix() for p in bundle.root.rglob("*") if p.is_file()) if n != MANIFEST}


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
