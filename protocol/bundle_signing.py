"""Signed emulator bundles: the coordinator signs the manifest, the data owner checks it first.

The manifest pins every other file of a bundle by sha256 and size, so one signature over its
exact bytes covers the whole bundle. ``manifest.sig`` is a small JSON object::

    {"format": "offsite-bundle-signature/1", "key": "<fingerprint of the signing key>",
     "signature": "<base64 Ed25519 signature over b'offsite-bundle-manifest/1\\0' + manifest bytes>"}

:func:`read_signed_bundle` (the data owner's side, with the coordinator's pinned signing key)
reads the manifest's bytes once (size-limited), checks the signature over those bytes, and only
then parses them and checks every listed file's size and sha256 (:func:`read_bundle`); nothing
is loaded before all of that passed. Every refusal is a :class:`BundleError` whose ``reason``
is a :class:`BundleReason`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .bundle import (
    SIGNATURE,
    Bundle,
    BundleError,
    BundleReason,
    read_bundle,
    read_limited,
    read_manifest_bytes,
)
from .keys import (
    CoordinatorKeys,
    CoordinatorPublicKeys,
    b64decode_strict,
    fingerprint,
    write_public_file,
)
from .safe_json import JSONRefused, parse_json

SIGNATURE_FORMAT = "offsite-bundle-signature/1"
SIGNATURE_CONTEXT = b"offsite-bundle-manifest/1\x00"
MAX_SIGNATURE_FILE_BYTES = 4096


def _signing_key(key: Ed25519PrivateKey | CoordinatorKeys) -> Ed25519PrivateKey:
    key = key.signing_key if isinstance(key, CoordinatorKeys) else key
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"expected the coordinator's Ed25519 signing key, got {type(key).__name__}")
    return key


def _verify_key(key: Ed25519PublicKey | CoordinatorPublicKeys) -> Ed25519PublicKey:
    key = key.signing_key if isinstance(key, CoordinatorPublicKeys) else key
    if not isinstance(key, Ed25519PublicKey):
        raise TypeError(f"expected the coordinator's Ed25519 public signing key, got {type(key).__name__}")
    return key


def sign_bundle(root: Path | str, key: Ed25519PrivateKey | CoordinatorKeys) -> Path:
    """Check the bundle (every hash) and write ``manifest.sig`` over its manifest; returns its path."""
    root = Path(root)
    signing_key = _signing_key(key)
    manifest_bytes = read_manifest_bytes(root)
    read_bundle(root, manifest_bytes)  # sign only a bundle whose files match its manifest
    signature = signing_key.sign(SIGNATURE_CONTEXT + manifest_bytes)
    body = {
        "format": SIGNATURE_FORMAT,
        "key": fingerprint(signing_key.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }
    return write_public_file(root / SIGNATURE, _render(body), force=True)


def _render(body: dict) -> bytes:
    """The one byte form of a signature file (anything else is refused, so nothing rides along)."""
    return (json.dumps(body, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()


def verify_manifest_signature(root: Path | str, key: Ed25519PublicKey | CoordinatorPublicKeys) -> bytes:
    """The manifest's bytes, once ``manifest.sig`` verifies over them with ``key``; BundleError otherwise."""
    root = Path(root)
    public_key = _verify_key(key)
    manifest_bytes = read_manifest_bytes(root)
    path = root / SIGNATURE
    if not path.is_file():
        raise BundleError(f"{path}: missing (the bundle is not signed)", BundleReason.UNSIGNED)
    raw = read_limited(path, MAX_SIGNATURE_FILE_BYTES)
    try:
        body = parse_json(raw)
    except JSONRefused as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(body, dict) or set(body) != {"format", "key", "signature"} or body["format"] != SIGNATURE_FORMAT:
        raise BundleError(f"{path}: not a {SIGNATURE_FORMAT} object with 'key' and 'signature'")
    if _render(body) != raw:
        raise BundleError(f"{path}: not in the canonical form `offsite cloud sign-bundle` writes")
    expected = fingerprint(public_key)
    if body["key"] != expected:
        raise BundleError(
            f"{path}: signed by key {str(body['key'])[:32]!r}, not by the coordinator's pinned key {expected}",
            BundleReason.WRONG_SIGNER,
        )
    try:
        signature = b64decode_strict(body["signature"], f"{path}: signature")
    except ValueError as error:
        raise BundleError(str(error)) from None
    if len(signature) != 64:
        raise BundleError(f"{path}: signature is {len(signature)} bytes, an Ed25519 signature has 64")
    try:
        public_key.verify(signature, SIGNATURE_CONTEXT + manifest_bytes)
    except InvalidSignature:
        raise BundleError(
            f"{path}: signature does not verify over {root / 'manifest.json'}", BundleReason.BAD_SIGNATURE
        ) from None
    return manifest_bytes


def read_signed_bundle(root: Path | str, key: Ed25519PublicKey | CoordinatorPublicKeys) -> Bundle:
    """Open a bundle only if the coordinator (``key``: its pinned signing key) signed its manifest
    and every file matches the manifest; the data owner's way to open a received bundle."""
    root = Path(root)
    return read_bundle(root, verify_manifest_signature(root, key))
