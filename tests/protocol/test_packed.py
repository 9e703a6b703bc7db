"""Packed bundles: a quantised middle shipped as bit-packed codes rebuilds the emulator bit for bit,
is several times smaller, and a packed file that does not fit its manifest is refused by name."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from offsite.emulator.quantize import Quantize, quantize_blocks
from offsite.emulator.sandwich import SandwichShape, build_emulator
from offsite.protocol.bundle import MANIFEST, WEIGHTS, BundleError, load_emulator, read_bundle, sha256_file, write_bundle
from offsite.protocol.packed import pack_codes, packed_bytes, unpack_codes
from tests.conftest import VOCAB, tiny_model

MIDDLE = [2, 3]  # the kept middle of a 2-2-2 emulator of 8 blocks


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_round_trip_at_every_width(bits):
    generator = torch.Generator().manual_seed(bits)
    for count in (1, 7, 8, 9, 1001):
        codes = torch.randint(0, 2**bits, (count,), generator=generator, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes((1, count), bits)
        assert torch.equal(unpack_codes(packed, bits, count), codes)
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)


def _emulator(family):
    emulator, layout = build_emulator(tiny_model(family), SandwichShape(2, 2, 2))
    info = {"family": family, "shape": {"a": 2, "k": 2, "b": 2, "n_blocks": 8}, "layout": layout,
            "adapter_blocks": [0, 1, 6, 7], "kept_middle": [2, 5]}
    return emulator, info


def _packed_bundle(tmp_path, tokenizer, family="llama", spec=Quantize((3, 4), 16)):
    emulator, info = _emulator(family)
    rounded = quantize_blocks(emulator, MIDDLE, spec)
    return emulator, rounded, write_bundle(tmp_path / "packed", emulator, tokenizer, info, packed=rounded)


def test_a_packed_bundle_rebuilds_the_rounded_emulator_bit_for_bit(tmp_path, tokenizer, family):
    emulator, info = _emulator(family)
    rounded = quantize_blocks(emulator, MIDDLE, Quantize((3, 4), 16))
    bundle = write_bundle(tmp_path / "packed", emulator, tokenizer, info, packed=rounded)
    unpacked = write_bundle(tmp_path / "floats", emulator, tokenizer, info)
    loaded = load_emulator(read_bundle(bundle.root))
    original, restored = emulator.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    for key in original:
        assert original[key].dtype == restored[key].dtype and torch.equal(original[key], restored[key]), key
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, emulator(ids).logits)
    # the rounded weights travel as codes, not floats; nothing else is packed
    tensors = load_file(str(bundle.root / WEIGHTS))
    entries = bundle.manifest["packed"]["weights"]
    assert set(entries) == set(rounded) and rounded
    assert all(name.startswith(("model.layers.2.", "model.layers.3.", "transformer.h.2.", "transformer.h.3.",
                                "model.decoder.layers.2.", "model.decoder.layers.3.")) for name in entries)
    for name, entry in entries.items():
        assert name not in tensors and tensors[name + ".qcodes"].dtype == torch.uint8
        assert entry["bits"] == (3 if ".2." in name else 4) and entry["group"] == 16
        assert entry["transposed"] == (family == "gpt2")
    assert (bundle.root / WEIGHTS).stat().st_size < (unpacked.root / WEIGHTS).stat().st_size


def test_the_middle_packs_to_its_bits_plus_the_group_scales(tmp_path, tokenizer):
    emulator, rounded, bundle = _packed_bundle(tmp_path, tokenizer, spec=Quantize((4,), 16))
    tensors = load_file(str(bundle.root / WEIGHTS))
    floats = sum(emulator.state_dict()[name].numel() for name in rounded)
    packed = sum(tensors[name + suffix].numel() * tensors[name + suffix].element_size()
                 for name in rounded for suffix in (".qcodes", ".qscale", ".qlow"))
    # 4 bits a weight, plus two float32 per 16 weights: 1 byte a weight against float32's 4
    assert packed == floats * 4 // 8 + 2 * 4 * floats // 16


def test_a_weight_changed_after_rounding_is_not_packed(tmp_path, tokenizer):
    emulator, info = _emulator("llama")
    rounded = quantize_blocks(emulator, MIDDLE, Quantize((3,), 16))
    with torch.no_grad():
        emulator.model.layers[3].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.weight: its codes do not give back its weights"):
        write_bundle(tmp_path / "b", emulator, tokenizer, info, packed=rounded)
    assert not (tmp_path / "b").exists()


NAME = "model.layers.3.mlp.down_proj.weight"


def _edit(bundle, tensors_edit=None, packed_edit=None):
    """Rewrite a bundle's weights file and/or manifest, keeping the hashes consistent (so what is
    tested is the packed format's checks, not the sha256)."""
    root = bundle.root
    manifest = json.loads((root / MANIFEST).read_text())
    if tensors_edit is not None:
        tensors = load_file(str(root / WEIGHTS))
        tensors_edit(tensors)
        save_file(tensors, str(root / WEIGHTS))
        manifest["files"][WEIGHTS] = {"sha256": sha256_file(root / WEIGHTS), "bytes": (root / WEIGHTS).stat().st_size}
    if packed_edit is not None:
        packed_edit(manifest["packed"])
    (root / MANIFEST).write_text(json.dumps(manifest))
    return read_bundle(root)


@pytest.mark.parametrize("tensors_edit, packed_edit, message", [
    (None, lambda p: p["weights"][NAME].update(bits=3), f"{NAME}'.*codes must be"),
    (None, lambda p: p["weights"][NAME].update(bits=9), f"{NAME}'.*'bits' 1-8"),
    (None, lambda p: p["weights"][NAME].update(group=10), f"{NAME}'.*group 10 does not divide"),
    (None, lambda p: p["weights"][NAME].update(shape=[64, -1]), f"{NAME}'.*'shape'"),
    (None, lambda p: p["weights"][NAME].update(transposed="no"), f"{NAME}'.*'transposed'"),
    (None, lambda p: p.update(scheme="other/2"), "'packed' must be"),
    (None, lambda p: p["weights"].pop(NAME), "packed tensors that the manifest does not list"),
    (lambda t: t.pop(NAME + ".qscale"), None, f"{NAME}'.*lacks '{NAME}.qscale'"),
    (lambda t: t.update({NAME + ".qlow": t[NAME + ".qlow"].double()}), None, f"{NAME}'.*scale and low must be"),
    (lambda t: t.update({NAME + ".qcodes": t[NAME + ".qcodes"][:-1]}), None, f"{NAME}'.*codes must be"),
    (lambda t: t.update({NAME: torch.zeros(32, 64)}), None, f"{NAME}'.*both packed and as floats"),
])
def test_a_packed_file_that_does_not_fit_its_manifest_is_refused(tmp_path, tokenizer, tensors_edit, packed_edit, message):
    _, _, bundle = _packed_bundle(tmp_path, tokenizer)
    edited = _edit(bundle, tensors_edit, packed_edit)
    with pytest.raises(BundleError, match=message):
        load_emulator(edited)
