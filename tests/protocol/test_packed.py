"""Packed bundles: a quantised middle shipped as bit-packed codes rebuilds the emulator bit for bit,
is several times smaller, and a packed file that does not fit its manifest is refused by name.
Weights that already lie on a GGUF block grid (a converted model's shells and embeddings) are found
and packed the same way."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from safetensors.torch import load_file, save_file

from offsite.emulator.quantize import Quantize, quantize_blocks
from offsite.emulator.sandwich import SandwichShape, build_emulator
from offsite.protocol.bundle import (
    MANIFEST,
    WEIGHTS,
    BundleError,
    load_emulator,
    read_bundle,
    sha256_file,
    write_bundle,
)
from offsite.protocol.packed import dequantize, find_grid, pack_codes, packed_bytes, same_bits, unpack_codes
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


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_are_laid_out_as_documented(bits):
    """Code i occupies bits i*bits .. i*bits + bits - 1 of the stream, least significant first,
    at every width (4 and 8 take shortcuts that must write the same bytes)."""
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    stream = sum(int(code) << (i * bits) for i, code in enumerate(codes))
    expected = stream.to_bytes(packed_bytes((1, 37), bits), "little")
    assert bytes(pack_codes(codes, bits).tolist()) == expected


def _emulator(family):
    emulator, layout = build_emulator(tiny_model(family), SandwichShape(2, 2, 2))
    info = {
        "family": family,
        "shape": {"a": 2, "k": 2, "b": 2, "n_blocks": 8},
        "layout": layout,
        "adapter_blocks": [0, 1, 6, 7],
        "kept_middle": [2, 5],
    }
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
        assert original[key].dtype == restored[key].dtype and same_bits(original[key], restored[key]), key
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, emulator(ids).logits)
    # the rounded weights travel as codes, not floats; nothing else is packed
    tensors = load_file(str(bundle.root / WEIGHTS))
    entries = bundle.manifest["packed"]["weights"]
    assert set(entries) == set(rounded) and rounded
    assert all(
        name.startswith(
            (
                "model.layers.2.",
                "model.layers.3.",
                "transformer.h.2.",
                "transformer.h.3.",
                "model.decoder.layers.2.",
                "model.decoder.layers.3.",
            )
        )
        for name in entries
    )
    for name, entry in entries.items():
        assert name not in tensors and tensors[name + ".qcodes"].dtype == torch.uint8
        assert entry["bits"] == (3 if ".2." in name else 4) and entry["group"] == 16
        assert entry["transposed"] == (family == "gpt2")
    assert (bundle.root / WEIGHTS).stat().st_size < (unpacked.root / WEIGHTS).stat().st_size


def test_the_middle_packs_to_its_bits_plus_the_group_scales(tmp_path, tokenizer):
    emulator, rounded, bundle = _packed_bundle(tmp_path, tokenizer, spec=Quantize((4,), 16))
    tensors = load_file(str(bundle.root / WEIGHTS))
    floats = sum(emulator.state_dict()[name].numel() for name in rounded)
    packed = sum(
        tensors[name + suffix].numel() * tensors[name + suffix].element_size()
        for name in rounded
        for suffix in (".qcodes", ".qscale", ".qlow")
    )
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


@pytest.mark.parametrize(
    "tensors_edit, packed_edit, message",
    [
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
    ],
)
def test_a_packed_file_that_does_not_fit_its_manifest_is_refused(
    tmp_path, tokenizer, tensors_edit, packed_edit, message
):
    _, _, bundle = _packed_bundle(tmp_path, tokenizer)
    edited = _edit(bundle, tensors_edit, packed_edit)
    with pytest.raises(BundleError, match=message):
        load_emulator(edited)


GGUF_TYPES = {"Q4_1": 4, "Q8_0": 8}


def _gguf_round(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``weight`` quantised to a GGUF block type and dequantised, as a converted model holds it."""
    kind = GGMLQuantizationType[kind]
    data = quants.dequantize(quants.quantize(weight.detach().numpy(), kind), kind)
    return torch.from_numpy(data.astype(np.float32)).reshape(weight.shape)


@pytest.mark.parametrize("kind", sorted(GGUF_TYPES))
def test_gguf_grids_are_found_and_give_back_every_value(kind):
    for magnitude in (1e-3, 1.0, 300.0):
        weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(7)) * magnitude
        weight[0, :32], weight[1, 32:64] = 0.0, -0.25  # a group of zeros, a constant group
        rounded = _gguf_round(weight, kind)
        grid = find_grid(rounded)
        assert grid is not None and grid.bits == GGUF_TYPES[kind]
        assert grid.codes.dtype == torch.uint8 and grid.codes.shape == (24, 3, 32)
        assert same_bits(dequantize(grid.codes, grid.scale, grid.low), rounded)


def test_weights_off_any_grid_are_left_as_floats():
    weight = _gguf_round(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)), "Q4_1")
    assert find_grid(torch.randn(8, 64)) is None  # random floats
    nudged = weight.clone()
    nudged[3, 5] = torch.nextafter(nudged[3, 5], torch.tensor(10.0))  # one value one ulp off its level
    assert find_grid(nudged) is None
    broken = weight.clone()
    broken[0, 0] = float("nan")
    assert find_grid(broken) is None
    assert find_grid(weight[:, :48]) is None  # 48 columns: no whole groups of 32
    signed = weight.clone()
    signed[2, :32] = torch.tensor([-0.0, 0.0] * 16)  # rebuilt as +0.0: equal as numbers, not as bits
    assert find_grid(signed) is None
    assert (
        find_grid(_gguf_round(torch.randn(8, 64, generator=torch.Generator().manual_seed(2)), "Q4_0")) is None
    )  # its -0.0s
    assert find_grid(weight[0]) is None  # a norm's vector


def test_a_converted_models_shells_and_embeddings_ship_packed(tmp_path, tokenizer):
    """A model converted from GGUF holds its embeddings as Q8_0 and its blocks as Q4_1 values: the
    bundle packs both (the distilled middle stays float) and loads bit for bit."""
    emulator, info = _emulator("llama")
    shells = []
    with torch.no_grad():
        for name, param in emulator.named_parameters():  # the tied head is the embedding, listed once
            if name == "model.embed_tokens.weight":
                param.copy_(_gguf_round(param, "Q8_0"))
            elif (
                param.dim() == 2 and ".layers.2." not in name and ".layers.3." not in name
            ):  # the middle stays trained floats
                param.copy_(_gguf_round(param, "Q4_1"))
                shells.append(name)
    bundle = write_bundle(tmp_path / "grids", emulator, tokenizer, info)
    floats = write_bundle(tmp_path / "floats", emulator, tokenizer, info, grids=False)
    entries = dict(bundle.manifest["packed"]["weights"])
    tied = [name for name in ("model.embed_tokens.weight", "lm_head.weight") if name in entries]
    assert len(tied) == 1 and entries.pop(tied[0])["bits"] == 8  # tied: packed once, under the name the file keeps
    assert len(shells) == 4 * 7 and sorted(entries) == sorted(shells)
    assert all(entries[name]["bits"] == 4 for name in shells)
    assert "packed" not in floats.manifest
    assert bundle.manifest["files"][WEIGHTS]["bytes"] < 0.5 * floats.manifest["files"][WEIGHTS]["bytes"]
    loaded, expected = load_emulator(read_bundle(bundle.root)).state_dict(), emulator.state_dict()
    assert loaded.keys() == expected.keys() and all(same_bits(loaded[k], expected[k]) for k in expected)
