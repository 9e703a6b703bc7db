"""Signed bundles: the client opens a bundle only if the pinned coordinator key signed its manifest
and every file matches; a fuzz of hostile variants must all be refused with their family's reason."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from offsite.emulator.sandwich import SandwichShape, build_emulator
from offsite.protocol.bundle import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    SIGNATURE,
    WEIGHTS,
    BundleError,
    BundleReason,
    load_emulator,
    read_bundle,
    sha256_file,
    write_bundle,
)
from offsite.protocol.bundle_signing import read_signed_bundle, sign_bundle
from offsite.protocol.keys import CoordinatorKeys
from tests.conftest import VOCAB, make_tokenizer, tiny_model


def _bundle(root: Path, seed: int = 0):
    model = tiny_model("llama", seed=seed)
    shape = SandwichShape(2, 2, 2)
    emulator, layout = build_emulator(model, shape)
    info = {
        "family": "llama",
        "shape": {"a": 2, "k": 2, "b": 2, "n_blocks": 8},
        "layout": layout,
        "adapter_blocks": shape.adapter_blocks(8),
        "kept_middle": shape.kept_middle(8),
    }
    return emulator, write_bundle(root, emulator, make_tokenizer(root.parent), info)


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    root = tmp_path_factory.mktemp("signed") / "bundle"
    keys = CoordinatorKeys.generate()
    emulator, bundle = _bundle(root)
    sign_bundle(bundle.root, keys)
    other_root = tmp_path_factory.mktemp("other") / "bundle"
    _bundle(other_root, seed=1)
    sign_bundle(other_root, keys)
    return keys, emulator, bundle, other_root


def test_signed_bundle_opens_and_loads(signed):
    keys, emulator, bundle, _ = signed
    opened = read_signed_bundle(bundle.root, keys.public())
    assert opened.digest == bundle.digest
    loaded = load_emulator(opened)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, emulator(ids).logits)
    assert read_bundle(bundle.root).digest == bundle.digest  # the unsigned reader tolerates manifest.sig


def test_signing_refuses_a_bundle_whose_files_do_not_match(tmp_path):
    _, bundle = _bundle(tmp_path / "bundle")
    path = bundle.root / WEIGHTS
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BundleError) as info:
        sign_bundle(bundle.root, CoordinatorKeys.generate())
    assert info.value.reason in (BundleReason.HASH_MISMATCH, BundleReason.SIZE_MISMATCH)
    assert not (bundle.root / SIGNATURE).exists()


class Tamper:
    """Edit files of a bundle for one variant, then put every byte back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.original = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        self.touched: set[str] = set()
        self.patched: list[tuple[str, int]] = []

    def read(self, rel: str) -> bytes:
        return self.original[rel]

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.touched.add(rel)

    def flip(self, rel: str, position: int, bit: int) -> None:
        """Flip one bit in place (one byte written, one put back: fast on a slow disk)."""
        with open(self.root / rel, "r+b") as handle:
            handle.seek(position)
            handle.write(bytes([self.original[rel][position] ^ (1 << bit)]))
        self.patched.append((rel, position))

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink()
        self.touched.add(rel)

    def restore(self) -> None:
        for rel, position in self.patched:
            with open(self.root / rel, "r+b") as handle:
                handle.seek(position)
                handle.write(self.original[rel][position : position + 1])
        self.patched.clear()
        for rel in self.touched:
            path = self.root / rel
            if rel in self.original:
                path.write_bytes(self.original[rel])
            elif path.exists():
                path.unlink()
        self.touched.clear()


def flip(data: bytes, position: int, bit: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def test_fuzz_hostile_bundles_are_all_refused(signed, tmp_path):
    """>= 1000 hostile variants of a signed bundle; 0 open; each refused with its family's reason."""
    keys, _, bundle, other_root = signed
    stranger = CoordinatorKeys.generate()
    root, tamper, rng = bundle.root, Tamper(bundle.root), random.Random(7)
    tokenizer_files = sorted(rel for rel in tamper.original if rel.startswith("tokenizer/"))
    assert tokenizer_files
    tally, reasons, accepted = Counter(), Counter(), []

    def expect(family: str, allowed: set) -> None:
        try:
            read_signed_bundle(root, keys.public())
        except BundleError as error:
            assert error.reason in allowed, (
                f"{family}: got {error.reason}, expected {sorted(r.value for r in allowed)}: {error}"
            )
            tally[family] += 1
            reasons[error.reason] += 1
        else:
            accepted.append(family)
        finally:
            tamper.restore()

    def resign_with(key, manifest_bytes: bytes | None = None) -> None:
        if manifest_bytes is not None:
            tamper.write(MANIFEST, manifest_bytes)
        sign_bundle_unchecked(root, key)
        tamper.touched.add(SIGNATURE)

    # bit flips in each file
    for rel, count, allowed in (
        (MANIFEST, 250, {BundleReason.BAD_SIGNATURE}),
        (SIGNATURE, 150, {BundleReason.MALFORMED, BundleReason.WRONG_SIGNER, BundleReason.BAD_SIGNATURE}),
        (WEIGHTS, 250, {BundleReason.HASH_MISMATCH}),
    ):
        for _ in range(count):
            tamper.flip(rel, rng.randrange(len(tamper.read(rel))), rng.randrange(8))
            expect(f"flip-{rel}", allowed)
    for _ in range(150):
        rel = rng.choice(tokenizer_files)
        tamper.flip(rel, rng.randrange(len(tamper.read(rel))), rng.randrange(8))
        expect("flip-tokenizer", {BundleReason.HASH_MISMATCH})
    for _ in range(30):
        for _ in range(rng.randint(2, 6)):
            rel = rng.choice(sorted(tamper.original))
            tamper.flip(rel, rng.randrange(len(tamper.read(rel))), rng.randrange(8))
        expect(
            "flip-many",
            {BundleReason.BAD_SIGNATURE, BundleReason.MALFORMED, BundleReason.WRONG_SIGNER, BundleReason.HASH_MISMATCH},
        )

    # truncation and extension of each file
    cases = {
        MANIFEST: {BundleReason.BAD_SIGNATURE},
        SIGNATURE: {BundleReason.MALFORMED},
        WEIGHTS: {BundleReason.SIZE_MISMATCH},
        tokenizer_files[0]: {BundleReason.SIZE_MISMATCH},
    }
    for rel, allowed in cases.items():
        data = tamper.read(rel)
        for cut in [0, len(data) - 1] + [rng.randrange(len(data)) for _ in range(23)]:
            tamper.write(rel, data[:cut])
            expect(f"truncate-{rel}", allowed)
        for tail in [b" ", b"\n", b"\x00", b"{}"] + [rng.randbytes(rng.randint(1, 512)) for _ in range(21)]:
            tamper.write(rel, data + tail)
            expect(f"extend-{rel}", allowed)

    # who signed
    for _ in range(5):
        resign_with(stranger)
        expect("signed-by-stranger", {BundleReason.WRONG_SIGNER})
        resign_with(stranger)
        body = json.loads((root / SIGNATURE).read_bytes())
        body["key"] = keys.public().signing_fingerprint
        tamper.write(SIGNATURE, (json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
        expect("stranger-claims-our-key", {BundleReason.BAD_SIGNATURE})
    tamper.delete(SIGNATURE)
    expect("unsigned", {BundleReason.UNSIGNED})
    tamper.write(SIGNATURE, (other_root / SIGNATURE).read_bytes())
    expect("signature-of-another-bundle", {BundleReason.BAD_SIGNATURE})
    tamper.write(MANIFEST, (other_root / MANIFEST).read_bytes())
    expect("manifest-of-another-bundle", {BundleReason.BAD_SIGNATURE})

    # a consistent re-hash without the coordinator's signature
    for index in range(5):
        weights = flip(tamper.read(WEIGHTS), rng.randrange(len(tamper.read(WEIGHTS))), index % 8)
        tamper.write(WEIGHTS, weights)
        manifest = json.loads(tamper.read(MANIFEST))
        manifest["files"][WEIGHTS]["sha256"] = sha256_file(root / WEIGHTS)
        tamper.write(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        expect("rehashed-unsigned", {BundleReason.BAD_SIGNATURE})

    # files added, removed or swapped under a valid signature
    for name in [
        "extra.bin",
        "evil.pkl",
        "model.pt",
        "tokenizer/added_tokens.json",
        "a/b/c.json",
        ".hidden",
        "manifest.json.bak",
    ] + [f"x{i}.safetensors" for i in range(13)]:
        tamper.write(name, b"\x80\x04\x95")
        expect("unlisted-file", {BundleReason.UNLISTED_FILE})
    for rel in [WEIGHTS, *tokenizer_files]:
        tamper.delete(rel)
        expect("missing-file", {BundleReason.MISSING})
    tamper.delete(MANIFEST)
    expect("missing-manifest", {BundleReason.MISSING})
    for _ in range(5):
        tamper.write(WEIGHTS, rng.randbytes(len(tamper.read(WEIGHTS))))
        expect("swapped-weights", {BundleReason.HASH_MISMATCH})

    # signed by the coordinator, still refused: unsafe names, wrong format, oversize
    manifest = json.loads(tamper.read(MANIFEST))
    for bad_name in ("../escape.json", "/etc/passwd", "tokenizer/../../x.json", SIGNATURE, MANIFEST):
        edited = json.loads(json.dumps(manifest))
        edited["files"][bad_name] = {"sha256": "0" * 64, "bytes": 1}
        resign_with(keys, json.dumps(edited).encode())
        expect("signed-unsafe-path", {BundleReason.UNSAFE_PATH, BundleReason.UNLISTED_FILE})
    for edit in (
        lambda m: m.update(format="offsite-bundle/9"),
        lambda m: m.update(layout="0,1"),
        lambda m: m.pop("files"),
    ):
        edited = json.loads(json.dumps(manifest))
        edit(edited)
        resign_with(keys, json.dumps(edited).encode())
        expect("signed-bad-manifest", {BundleReason.MALFORMED})
    tamper.write(MANIFEST, tamper.read(MANIFEST) + b" " * MAX_MANIFEST_BYTES)
    expect("oversize-manifest", {BundleReason.OVERSIZED})
    tamper.write(SIGNATURE, tamper.read(SIGNATURE) + b" " * 5000)
    expect("oversize-signature", {BundleReason.OVERSIZED})

    assert accepted == [], f"opened hostile bundles: {Counter(accepted)}"
    assert sum(tally.values()) >= 1000, sum(tally.values())
    assert read_signed_bundle(root, keys.public()).digest == bundle.digest  # everything was put back
    assert set(reasons) >= {
        BundleReason.BAD_SIGNATURE,
        BundleReason.WRONG_SIGNER,
        BundleReason.UNSIGNED,
        BundleReason.HASH_MISMATCH,
        BundleReason.SIZE_MISMATCH,
        BundleReason.UNLISTED_FILE,
        BundleReason.MISSING,
        BundleReason.UNSAFE_PATH,
        BundleReason.MALFORMED,
        BundleReason.OVERSIZED,
    }


SIGNATURE_BOMBS = [
    b"[" * 3000,
    b'{"format":' * 400,
    b'{"key": ' + b"7" * 4000 + b"}",
    b'{"signature": 1e999}',
    b"\xff" * 10,
]


def test_signature_files_and_signed_manifests_that_break_the_parser_are_refused(signed):
    """A ``manifest.sig`` (at most 4 KiB: 3,000 nested ``[`` fit) or a manifest signed by the
    coordinator itself that would raise RecursionError or a bare ValueError in ``json.loads``,
    and signed manifests with unknown keys or an edited cut: all MALFORMED, never a traceback."""
    keys, _, bundle, _ = signed
    root, tamper = bundle.root, Tamper(bundle.root)
    manifest = json.loads(tamper.read(MANIFEST))
    signed_manifests = [
        b"[" * 100_000,
        b'{"files":' * 50_000,
        b'{"format": ' + b"1" * 5000 + b"}",
        json.dumps({**manifest, "extra": 1}).encode(),
        json.dumps({**manifest, "adapter_blocks": [0, 1, 2, 6, 7]}).encode(),
        json.dumps({**manifest, "kept_middle": [3, 4]}).encode(),
    ]
    refused = 0
    for bomb in SIGNATURE_BOMBS:
        tamper.write(SIGNATURE, bomb)
        with pytest.raises(BundleError, match="not valid JSON") as caught:
            read_signed_bundle(root, keys.public())
        assert caught.value.reason is BundleReason.MALFORMED
        tamper.restore()
        refused += 1
    for manifest_bytes in signed_manifests:
        tamper.write(MANIFEST, manifest_bytes)
        sign_bundle_unchecked(root, keys)
        tamper.touched.add(SIGNATURE)
        with pytest.raises(BundleError) as caught:
            read_signed_bundle(root, keys.public())
        assert caught.value.reason is BundleReason.MALFORMED, caught.value
        tamper.restore()
        refused += 1
    assert refused == 11
    assert read_signed_bundle(root, keys.public()).digest == bundle.digest  # everything was put back


def sign_bundle_unchecked(root: Path, keys: CoordinatorKeys) -> None:
    """Sign whatever manifest is there (what a coordinator that signs a bad manifest would do)."""
    import base64

    from offsite.protocol.bundle_signing import SIGNATURE_CONTEXT, SIGNATURE_FORMAT

    manifest = (root / MANIFEST).read_bytes()
    body = {
        "format": SIGNATURE_FORMAT,
        "key": keys.public().signing_fingerprint,
        "signature": base64.b64encode(keys.signing_key.sign(SIGNATURE_CONTEXT + manifest)).decode(),
    }
    (root / SIGNATURE).write_bytes((json.dumps(body, indent=1, sort_keys=True) + "\n").encode())
