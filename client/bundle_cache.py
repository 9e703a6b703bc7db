"""The data owner's bundle cache: verified emulator bundles keyed by digest, assembled on disk
from parts that arrive in separate ClientApp processes, in any order.

Layout under ``root``::

    bundles/<digest>/            a verified bundle (read_bundle passed, digest matched)
    incoming/<digest>/files/...  the bundle being assembled
    incoming/<digest>/parts/<i>  one empty marker per part received
    locks/<digest>.lock          serialises processes working on the same digest (POSIX flock)

With ``signer`` (the coordinator's public keys, pinned by the data owner out of band: the
SuperNode's ``coordinator-key``, never a key taken from a message) a bundle is installed and
used only if its ``manifest.sig`` verifies with that key before anything else is parsed
(:func:`~offsite.protocol.bundle_signing.read_signed_bundle`). A cached copy that does not
verify (e.g. installed unsigned before the key was pinned) is assembled again from the parts
and replaced.
"""

from __future__ import annotations

import fcntl
import shutil
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite.protocol.bundle import Bundle, BundleError, read_bundle
from offsite.protocol.bundle_signing import read_signed_bundle, verify_manifest_signature
from offsite.protocol.files import replace_dir
from offsite.protocol.keys import CoordinatorPublicKeys
from offsite.protocol.messages import DIGEST, BundlePart, check_relative_path

MAX_FILE_OFFSET = 64 << 30


class BundleCache:
    def __init__(self, root: Path | str, signer: CoordinatorPublicKeys | Ed25519PublicKey | None = None) -> None:
        self.root = Path(root)
        self.signer = signer

    def _verified(self, path: Path) -> Bundle:
        """The bundle at ``path``: signature first (with a pinned key), then every file's hash."""
        return read_bundle(path) if self.signer is None else read_signed_bundle(path, self.signer)

    def bundle_dir(self, digest: str) -> Path:
        if not DIGEST.match(digest):
            raise BundleError(f"bundle digest {digest!r} is not a sha256 hex digest")
        return self.root / "bundles" / digest

    @contextmanager
    def _locked(self, digest: str):
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{digest}.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def lookup(self, digest: str) -> Bundle | None:
        """The cached bundle with this digest, verified again (every sha256); None if absent."""
        path = self.bundle_dir(digest)
        if not (path / "manifest.json").is_file():
            return None
        bundle = self._verified(path)
        if bundle.digest != digest:
            raise BundleError(f"{path}: manifest digest {bundle.digest} is not the directory's {digest}")
        return bundle

    def has(self, digest: str) -> bool:
        return (self.bundle_dir(digest) / "manifest.json").is_file()

    def receive(self, part: BundlePart) -> str:
        """Write one part; when all parts are in, verify and install. Returns ``cached`` (the
        bundle was already installed; nothing written), ``partial`` or ``installed``.

        A bundle that fails verification is deleted (so a resend starts clean) and raises
        :class:`BundleError`.
        """
        target = self.bundle_dir(part.digest)
        with self._locked(part.digest):
            if (target / "manifest.json").is_file() and self._still_valid(target):
                return "cached"
            incoming = self.root / "incoming" / part.digest
            files, markers = incoming / "files", incoming / "parts"
            markers.mkdir(parents=True, exist_ok=True)
            for segment in part.segments:
                path = files / check_relative_path(segment.path)
                if segment.offset + len(segment.data) > MAX_FILE_OFFSET:
                    raise BundleError(
                        f"bundle part {part.index}: {segment.path} would grow past {MAX_FILE_OFFSET} bytes"
                    )
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "r+b" if path.exists() else "w+b") as handle:
                    handle.seek(segment.offset)
                    handle.write(segment.data)
            (markers / f"{part.index}-of-{part.count}").touch()
            received = {p.name for p in markers.iterdir()}
            if not all(f"{i}-of-{part.count}" in received for i in range(part.count)):
                return "partial"
            try:
                bundle = self._verified(files)
                if bundle.digest != part.digest:
                    raise BundleError(f"{files}: manifest digest {bundle.digest} is not the announced {part.digest}")
            except BundleError:
                shutil.rmtree(incoming, ignore_errors=True)
                raise
            target.parent.mkdir(parents=True, exist_ok=True)
            replace_dir(files, target)  # over a cached copy that failed verification, if any
            shutil.rmtree(incoming, ignore_errors=True)
            return "installed"

    def _still_valid(self, target: Path) -> bool:
        """Whether the installed bundle's manifest is signed by the pinned key (its files are
        hashed again by :meth:`lookup` before every use); one that is not is kept until the
        bundle assembled from the parts replaces it."""
        if self.signer is None:
            return True
        try:
            verify_manifest_signature(target, self.signer)
        except BundleError:
            return False
        return True
