"""The emulator bundle: what the operator ships to data owners.

A directory with

- ``emulator.safetensors``: every tensor of the emulator model (adapter blocks, kept middle
  blocks, embeddings, final norm, head); a quantised middle's weights bit-packed
  (:mod:`offsite.protocol.packed`, listed under the manifest's ``packed``);
- ``tokenizer/*.json`` (and the chat template): the tokenizer, JSON only;
- ``manifest.json``: format, family, the model config, the sandwich shape, the layout
  (original block index at each position), adapter and kept-middle indices, and the sha256
  and size of every other file;
- ``manifest.sig`` (once signed): the coordinator's Ed25519 signature over the manifest's exact
  bytes (JSON; see :mod:`offsite.protocol.bundle_signing`). It is the one file the manifest
  does not list.

A data owner builds the trainable model from the bundle alone. Only safetensors and JSON are
ever parsed, each with a size limit, and only after every hash has matched (and, with
:func:`~offsite.protocol.bundle_signing.read_signed_bundle`, after the signature has).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from . import files
from .files import replace_dir

if TYPE_CHECKING:  # torch is imported where weights are read or written, not by a manifest check
    from torch import nn

FORMAT = "offsite-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WEIGHTS = "emulator.safetensors"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MAX_MANIFEST_BYTES = 1 << 20
MAX_JSON_BYTES = 64 << 20
MAX_WEIGHTS_BYTES = 64 << 30
# what a manifest holds (write_bundle's keys); anything else is refused, so nothing rides along unchecked
REQUIRED_KEYS = frozenset(
    {"format", "family", "shape", "layout", "adapter_blocks", "kept_middle", "model_type", "config", "files"}
)
MANIFEST_KEYS = REQUIRED_KEYS | {"packed", "distill", "quantize"}


class BundleReason(str, Enum):
    """Why a bundle was refused."""

    MISSING = "missing"  # the manifest, or a file it lists, is absent
    OVERSIZED = "oversized"  # a file is over its size limit
    MALFORMED = "malformed"  # the manifest (or signature file) is not what it must be
    UNSAFE_PATH = "unsafe-path"  # a listed file name escapes the bundle
    UNLISTED_FILE = "unlisted-file"  # a file the manifest does not list
    SIZE_MISMATCH = "size-mismatch"  # a file's size is not the manifest's
    HASH_MISMATCH = "hash-mismatch"  # a file's sha256 is not the manifest's
    DIGEST_MISMATCH = "digest-mismatch"  # the manifest is not the one announced
    UNSIGNED = "unsigned"  # no manifest.sig where a signature is required
    WRONG_SIGNER = "wrong-signer"  # signed, but not by the pinned coordinator key
    BAD_SIGNATURE = "bad-signature"  # the signature does not verify over the manifest's bytes


class BundleError(ValueError):
    """A bundle is malformed, tampered with or oversized; the message names the file, ``reason`` says what."""

    def __init__(self, message: str, reason: BundleReason = BundleReason.MALFORMED) -> None:
        super().__init__(message)
        self.reason = reason


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict

    @property
    def layout(self) -> list[int]:
        return list(self.manifest["layout"])

    @property
    def adapter_blocks(self) -> list[int]:
        return list(self.manifest["adapter_blocks"])

    @property
    def shape(self) -> dict:
        return dict(self.manifest["shape"])

    @property
    def size(self) -> int:
        """Bytes of every file the manifest lists: what a data owner downloads."""
        return sum(entry["bytes"] for entry in self.manifest["files"].values())

    @property
    def digest(self) -> str:
        """sha256 of the manifest, which pins every file: the bundle's identity."""
        return hashlib.sha256(canonical_json(self.manifest)).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def write_bundle(
    root: Path | str, emulator: nn.Module, tokenizer, info: dict, packed: dict | None = None, grids: bool = True
) -> Bundle:
    """Write ``emulator`` (+ tokenizer) as a bundle at ``root``; ``info`` goes into the manifest
    (it must hold ``family``, ``shape``, ``layout``, ``adapter_blocks``, ``kept_middle``).

    ``packed``: rounded weights by parameter name (what
    :func:`offsite.emulator.quantize.quantize_blocks` returns), stored as bit-packed codes with
    their groups' scales and offsets instead of floats (:mod:`offsite.protocol.packed`).
    ``grids``: also pack every other weight that already lies on such a grid (a model converted
    from GGUF: its embeddings and the adapter shells), found by :func:`~offsite.protocol.packed.find_grid`.

    The bundle is assembled in a sibling temporary directory and renamed into place, so a
    crash never leaves a half-written bundle behind.
    """
    from safetensors.torch import save_model

    _check_info(info)
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        save_model(emulator, str(staging / WEIGHTS))  # safetensors drops tied duplicates; packing starts from that
        if packed or grids:
            entry = _pack_weights(staging / WEIGHTS, packed, grids)
            if entry is not None:
                info = {**info, "packed": entry}
        _save_tokenizer(tokenizer, staging / TOKENIZER_DIR)
        files = _list_files(staging)
        manifest = {
            "format": FORMAT,
            **info,
            "model_type": emulator.config.model_type,
            "config": emulator.config.to_dict(),
            "files": files,
        }
        (staging / MANIFEST).write_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode())
        replace_dir(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(root, manifest)


def _check_info(info: dict) -> None:
    """ValueError unless ``info`` holds the cut's keys and only manifest keys."""
    for key in ("family", "shape", "layout", "adapter_blocks", "kept_middle"):
        if key not in info:
            raise ValueError(f"bundle info lacks {key!r}")
    extra = sorted(set(info) - MANIFEST_KEYS)
    if extra:
        raise ValueError(f"bundle info keys {extra} are not manifest keys (read_bundle would refuse them)")


def _pack_weights(path: Path, packed: dict | None, grids: bool) -> dict | None:
    """Rewrite the weights file at ``path`` with ``packed`` (and, with ``grids``, every other weight
    found on a grid) bit-packed; the manifest's ``packed`` entry, or None where nothing is packed."""
    from safetensors.torch import load_file, save_file

    from .packed import find_grid, pack_state

    tensors = load_file(str(path))
    packed = dict(packed or {})
    if grids:
        found = {name: find_grid(tensor) for name, tensor in tensors.items() if name not in packed}
        packed.update((name, grid) for name, grid in found.items() if grid is not None)
    if not packed:
        return None
    tensors, entry = pack_state(tensors, packed)
    save_file(tensors, str(path))
    return entry


def _save_tokenizer(tokenizer, directory: Path) -> None:
    """The tokenizer's files named in :data:`TOKENIZER_FILES` (those ``save_pretrained`` writes), in ``directory``."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        directory.mkdir()
        for name in TOKENIZER_FILES:
            if (Path(scratch) / name).exists():
                shutil.copy(Path(scratch) / name, directory / name)


def _list_files(staging: Path) -> dict:
    """sha256 and size of every file under ``staging``, by relative POSIX path, sorted."""
    listed = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = path.relative_to(staging).as_posix()
        listed[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return listed


def read_limited(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` (a regular file, checked by the caller), refused (OVERSIZED) past
    ``limit`` without reading more than that."""
    return files.read_limited(path, limit, lambda message: BundleError(message, BundleReason.OVERSIZED))


def parse_json_object(path: Path, data: bytes) -> dict:
    return files.parse_json_object(path, data, BundleError)


def _read_json(path: Path, limit: int) -> dict:
    return parse_json_object(path, read_limited(path, limit))


def _check_manifest(root: Path, manifest: dict) -> None:
    where = root / MANIFEST
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{where}: format {str(manifest.get('format'))[:40]!r} is not {FORMAT!r}")
    unknown, missing = sorted(set(manifest) - MANIFEST_KEYS), sorted(REQUIRED_KEYS - set(manifest))
    if unknown or missing:
        raise BundleError(
            f"{where}: unknown keys {[k[:40] for k in unknown[:5]]}, missing keys {missing} "
            f"(a manifest holds {sorted(REQUIRED_KEYS)} and optionally {sorted(MANIFEST_KEYS - REQUIRED_KEYS)})"
        )
    files = manifest["files"]
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise BundleError(f"{where}: 'files' must list {WEIGHTS}")
    for key in ("layout", "adapter_blocks", "kept_middle"):
        value = manifest[key]
        if not isinstance(value, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
        ):
            raise BundleError(f"{where}: {key!r} must be a list of block indices")
    config = manifest["config"]
    if not isinstance(config, dict):
        raise BundleError(f"{where}: 'config' must be an object")
    if not isinstance(manifest["family"], str) or not isinstance(manifest["model_type"], str):
        raise BundleError(f"{where}: 'family' and 'model_type' must be strings")
    if config.get("model_type", manifest["model_type"]) != manifest["model_type"]:
        raise BundleError(
            f"{where}: 'model_type' {manifest['model_type'][:40]!r} "
            f"is not the config's {str(config['model_type'])[:40]!r}"
        )
    for key in ("packed", "distill", "quantize"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise BundleError(f"{where}: {key!r} must be an object")
    _check_cut(where, manifest)


def kept_middle_fits(kept: list[int], a: int, k: int, b: int, n_blocks: int) -> bool:
    """Whether ``kept`` is ``k`` strictly increasing block indices inside the middle
    ``a..n_blocks-b-1`` of an ``a-k-b`` cut (torch-free, for manifest checks and the sandwich alike)."""
    inside = all(a <= i < n_blocks - b for i in kept)
    return len(kept) == k and inside and all(x < y for x, y in zip(kept, kept[1:]))


def _check_cut(where: Path, manifest: dict) -> None:
    """The manifest's ``layout``, ``adapter_blocks`` and ``kept_middle`` are a cut its ``shape``
    names: the adapter blocks exactly, around ``k`` increasing middle blocks (chosen uniformly or
    otherwise, e.g. by CKA). An edited adapter (a middle block made trainable, a block dropped or
    repeated) is refused. (:func:`load_emulator` then checks that the weights hold ``len(layout)`` blocks.)"""
    shape = manifest["shape"]
    names = ("a", "k", "b", "n_blocks")
    if (
        not isinstance(shape, dict)
        or set(shape) != set(names)
        or not all(isinstance(shape[n], int) and not isinstance(shape[n], bool) and shape[n] >= 0 for n in names)
    ):
        raise BundleError(f"{where}: 'shape' must be an object of integers a, k, b, n_blocks")
    a, k, b, n = (shape[name] for name in names)
    if a + b < 1 or k < 1 or n - a - b < k or a + k + b != len(manifest["layout"]):
        raise BundleError(
            f"{where}: shape {a}-{k}-{b} of {n} blocks is not a cut of the {len(manifest['layout'])}-block layout"
        )
    kept = manifest["kept_middle"]
    if not kept_middle_fits(kept, a, k, b, n):
        raise BundleError(
            f"{where}: 'kept_middle' {str(kept)[:80]} is not the {a}-{k}-{b} cut of {n} blocks "
            f"({k} increasing block indices in the middle {a}..{n - b - 1})"
        )
    adapter = list(range(a)) + list(range(n - b, n))
    layout = adapter[:a] + kept + adapter[a:]
    for key, expected in (("layout", layout), ("adapter_blocks", adapter)):
        if manifest[key] != expected:
            raise BundleError(
                f"{where}: {key!r} {str(manifest[key])[:80]} is not the {a}-{k}-{b} cut of {n} blocks ({expected})"
            )


def read_manifest_bytes(root: Path) -> bytes:
    """The manifest's exact bytes (size-limited), for checking a signature before parsing."""
    manifest_path = Path(root) / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing", BundleReason.MISSING)
    return read_limited(manifest_path, MAX_MANIFEST_BYTES)


def read_bundle(root: Path | str, manifest_bytes: bytes | None = None) -> Bundle:
    """Open a bundle, checking the manifest and the sha256 and size of every file it lists.

    Files not named in the manifest are refused too (``manifest.sig`` aside): nothing unverified
    sits in a bundle. ``manifest_bytes``: the manifest as already read (and signature-checked)
    by the caller, so that what was verified is what is used.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    if manifest_bytes is None:
        manifest_bytes = read_manifest_bytes(root)
    manifest = parse_json_object(manifest_path, manifest_bytes)
    _check_manifest(root, manifest)
    listed = set(manifest["files"])
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST, SIGNATURE}
    if present - listed:
        raise BundleError(f"{root}: files not in the manifest: {sorted(present - listed)}", BundleReason.UNLISTED_FILE)
    for rel, meta in manifest["files"].items():
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or rel in (MANIFEST, SIGNATURE):
            raise BundleError(f"{manifest_path}: file name {rel!r} escapes the bundle", BundleReason.UNSAFE_PATH)
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("sha256"), str)
            or not isinstance(meta.get("bytes"), int)
        ):
            raise BundleError(f"{manifest_path}: entry for {rel!r} needs 'sha256' and 'bytes'")
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing", BundleReason.MISSING)
        size = path.stat().st_size
        limit = MAX_WEIGHTS_BYTES if rel.endswith(".safetensors") else MAX_JSON_BYTES
        if size != meta["bytes"] or size > limit:
            reason = BundleReason.OVERSIZED if size > limit else BundleReason.SIZE_MISMATCH
            raise BundleError(f"{path}: {size} bytes, manifest says {meta['bytes']} (limit {limit})", reason)
        if sha256_file(path) != meta["sha256"]:
            raise BundleError(f"{path}: sha256 does not match the manifest", BundleReason.HASH_MISMATCH)
    return Bundle(root, manifest)


def load_emulator(bundle: Bundle, dtype=None) -> nn.Module:
    """Build the emulator model from the bundle alone: the config from the manifest, then a
    strict load of every tensor from ``emulator.safetensors`` (packed weights rebuilt first)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    from .packed import unpack_state

    config_dict = dict(bundle.manifest["config"])
    model_type = config_dict.pop("model_type", bundle.manifest.get("model_type"))
    config = AutoConfig.for_model(model_type, **config_dict)
    with (
        no_init_weights()
    ):  # every tensor comes from the file (load_strict refuses a gap): no random init to throw away
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # skipped with the init; tied tensors are written once
    path = bundle.root / WEIGHTS
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error type for a malformed header
        raise BundleError(f"{path}: not a readable safetensors file ({error})") from None
    if "packed" in bundle.manifest:
        tensors = unpack_state(tensors, bundle.manifest["packed"], str(path), BundleError)
    load_strict(model, tensors, str(path))
    blocks = getattr(model.config, "num_hidden_layers", None)
    if blocks != len(bundle.layout):
        raise BundleError(
            f"{path}: the weights hold {blocks} blocks, the manifest's cut {len(bundle.layout)} ({bundle.layout})"
        )
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_strict(model: nn.Module, tensors: dict, where: str) -> None:
    """Load ``tensors`` into ``model``: every parameter and buffer the model saves must be there,
    with its shape, except a tied duplicate of one that is (as safetensors writes them), and
    nothing else may be."""
    own = model.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise BundleError(f"{where}: does not fit the manifest's config: it has no place for {unexpected[:5]}")
    loaded = {own[key].data_ptr() for key in tensors}
    missing = sorted(key for key in set(own) - set(tensors) if own[key].data_ptr() not in loaded)
    if missing:
        raise BundleError(f"{where}: does not fit the manifest's config: the file lacks {missing[:5]}")
    for key, tensor in tensors.items():
        if tensor.shape != own[key].shape:
            raise BundleError(
                f"{where}: does not fit the manifest's config: {key} is {tuple(tensor.shape)}, "
                f"the config needs {tuple(own[key].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def load_tokenizer(bundle: Bundle):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundle.root / TOKENIZER_DIR))
