"""Identity and encryption keys of a federated job, and the registry of enrolled senders.

The coordinator (the operator's side) holds two key pairs, written by :meth:`CoordinatorKeys.save`
(``offsite cloud keys``)::

    coordinator-encryption.key  (0600)  X25519, PKCS#8 PEM: opens the clients' update envelopes
    coordinator-signing.key     (0600)  Ed25519, PKCS#8 PEM: signs emulator bundle manifests
    coordinator.pub.json                both public keys (raw, base64) + fingerprints: every data
                                        owner gets a copy, out of band, and pins it

A data owner holds one Ed25519 identity, written by :meth:`ClientIdentity.save`
(``offsite client enroll``)::

    identity.key   (0600)  Ed25519, PKCS#8 PEM: signs its update envelopes
    identity.json          sender id + public key (raw, base64): what the operator registers

The sender id is the name given at enrolment, or else the key's fingerprint (the first 16 hex
digits of the SHA-256 of the raw public key). The operator keeps the :class:`SenderRegistry`
(a JSON file: sender id -> public key, revoked flag); an envelope from an id not in it, or
revoked, is refused, and its signature is checked against the registered key only.

Private key files are created with mode 0600 from the start (``os.open(..., O_CREAT | O_EXCL,
0o600)`` on a temporary name, then renamed: no chmod after the secret is written), and loading
refuses a private key file that group or others may read. Nothing here logs, prints or puts in
an exception message any private key material: only fingerprints and public keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from . import files

COORDINATOR_ENCRYPTION_KEY = "coordinator-encryption.key"
COORDINATOR_SIGNING_KEY = "coordinator-signing.key"
COORDINATOR_PUBLIC = "coordinator.pub.json"
CLIENT_KEY = "identity.key"
CLIENT_PUBLIC = "identity.json"

COORDINATOR_FORMAT = "offsite-coordinator-keys/1"
IDENTITY_FORMAT = "offsite-client-identity/1"
REGISTRY_FORMAT = "offsite-senders/1"

MAX_KEY_FILE_BYTES = 64 << 10
MAX_PUBLIC_FILE_BYTES = 64 << 10
MAX_REGISTRY_BYTES = 16 << 20
SENDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FINGERPRINT_HEX = 16


class KeyFileError(ValueError):
    """A key or registry file is missing, malformed or too open; the message names the file (never its secret)."""


PublicKey = Ed25519PublicKey | X25519PublicKey


def raw_public(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: PublicKey) -> str:
    """Short identity of a public key: the first 16 hex digits of SHA-256 over its 32 raw bytes."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:FINGERPRINT_HEX]


def public_to_text(key: PublicKey) -> str:
    """The raw 32-byte public key, standard base64 (44 characters)."""
    return base64.b64encode(raw_public(key)).decode()


def b64decode_strict(text: str, what: str) -> bytes:
    """Standard base64, padded, canonical (re-encoding gives the same text); ValueError naming ``what``."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a base64 string, got {type(text).__name__}")  # noqa: TRY004 - untrusted input
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what}: not valid base64") from None
    if base64.b64encode(data).decode() != text:
        raise ValueError(f"{what}: not canonical base64")
    return data


def _raw32(text: str, what: str, kind: str) -> bytes:
    raw = b64decode_strict(text.strip() if isinstance(text, str) else text, what)
    if len(raw) != 32:
        raise ValueError(f"{what}: {len(raw)} bytes, an {kind} public key has 32")
    return raw


def ed25519_public_from_text(text: str, what: str = "public key") -> Ed25519PublicKey:
    """An Ed25519 public key from its raw 32 bytes in base64 (what ``offsite client enroll`` prints)."""
    return Ed25519PublicKey.from_public_bytes(_raw32(text, what, "Ed25519"))


def x25519_public_from_text(text: str, what: str = "public key") -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(_raw32(text, what, "X25519"))


def check_sender_id(sender: str) -> str:
    if not isinstance(sender, str) or not SENDER_ID.match(sender):
        raise ValueError(f"sender id {sender!r}: use 1-64 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    return sender


# ---------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes, mode: int, force: bool) -> Path:
    """Write ``data`` to ``path`` via a temporary file created with ``mode`` (O_EXCL), then rename.

    The file has its final permissions before a byte is written; ``force=False`` refuses to
    replace an existing file.
    """
    path = Path(path)
    if path.exists() and not force:
        raise KeyFileError(f"{path}: already exists (pass --force / force=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def write_private_key(path: Path, key: Ed25519PrivateKey | X25519PrivateKey, force: bool = False) -> Path:
    """``key`` as unencrypted PKCS#8 PEM, mode 0600 from creation."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return _atomic_write(path, pem, 0o600, force)


def write_public_file(path: Path, data: bytes, force: bool = False) -> Path:
    return _atomic_write(path, data, 0o644, force)


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    return files.read_limited(path, limit, KeyFileError, what)


def load_private_key(path: Path, kind: type) -> Ed25519PrivateKey | X25519PrivateKey:
    """A PKCS#8 PEM private key of type ``kind``; refused if the file is readable or writable by group or others."""
    path = Path(path)
    try:
        mode = path.stat().st_mode  # the target's mode (a Kubernetes secret mount is a symlink)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such private key file") from None
    if stat.S_ISREG(mode) and mode & 0o077:
        raise KeyFileError(
            f"{path}: private key file has mode {stat.S_IMODE(mode):04o}, group/others may read it; "
            f"run chmod 600 {path}"
        )
    data = _read_limited(path, MAX_KEY_FILE_BYTES, "private key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not an unencrypted PKCS#8 PEM private key") from None
    if not isinstance(key, kind):
        raise KeyFileError(f"{path}: holds a {type(key).__name__.removeprefix('_')}, expected {kind.__name__}")
    return key


def _read_json_object(path: Path, limit: int, what: str) -> dict:
    return files.read_json_object(path, limit, KeyFileError, what)


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------- coordinator


@dataclass(frozen=True)
class CoordinatorPublicKeys:
    """What every data owner pins: the key updates are sealed to, and the key bundles are signed with."""

    encryption_key: X25519PublicKey
    signing_key: Ed25519PublicKey

    @property
    def encryption_fingerprint(self) -> str:
        return fingerprint(self.encryption_key)

    @property
    def signing_fingerprint(self) -> str:
        return fingerprint(self.signing_key)

    def to_json(self) -> dict:
        return {
            "format": COORDINATOR_FORMAT,
            "encryption_public_key": public_to_text(self.encryption_key),
            "encryption_fingerprint": self.encryption_fingerprint,
            "signing_public_key": public_to_text(self.signing_key),
            "signing_fingerprint": self.signing_fingerprint,
        }

    @classmethod
    def from_json(cls, value: dict, where: str = COORDINATOR_PUBLIC) -> CoordinatorPublicKeys:
        if not isinstance(value, dict) or value.get("format") != COORDINATOR_FORMAT:
            raise KeyFileError(f"{where}: format is not {COORDINATOR_FORMAT!r}")
        try:
            keys = cls(
                x25519_public_from_text(value.get("encryption_public_key"), f"{where}: encryption_public_key"),
                ed25519_public_from_text(value.get("signing_public_key"), f"{where}: signing_public_key"),
            )
        except ValueError as error:
            raise KeyFileError(str(error)) from None
        for name in ("encryption", "signing"):
            stated = value.get(f"{name}_fingerprint")
            if stated is not None and stated != getattr(keys, f"{name}_fingerprint"):
                raise KeyFileError(f"{where}: {name}_fingerprint {stated!r} does not match the {name} public key")
        return keys

    @classmethod
    def load(cls, path: Path | str) -> CoordinatorPublicKeys:
        """From ``coordinator.pub.json``, or a directory holding it."""
        path = Path(path)
        if path.is_dir():
            path = path / COORDINATOR_PUBLIC
        return cls.from_json(_read_json_object(path, MAX_PUBLIC_FILE_BYTES, "coordinator public key file"), str(path))


@dataclass(frozen=True)
class CoordinatorKeys:
    """The coordinator's private keys. ``repr`` shows fingerprints only."""

    encryption_key: X25519PrivateKey = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> CoordinatorKeys:
        return cls(X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    def public(self) -> CoordinatorPublicKeys:
        return CoordinatorPublicKeys(self.encryption_key.public_key(), self.signing_key.public_key())

    def __repr__(self) -> str:
        public = self.public()
        return f"CoordinatorKeys(encryption={public.encryption_fingerprint}, signing={public.signing_fingerprint})"

    def save(self, directory: Path | str, force: bool = False) -> dict[str, Path]:
        """Write the two private keys (0600) and ``coordinator.pub.json``; returns the paths by role."""
        directory = Path(directory)
        paths = {
            "encryption_key": directory / COORDINATOR_ENCRYPTION_KEY,
            "signing_key": directory / COORDINATOR_SIGNING_KEY,
            "public": directory / COORDINATOR_PUBLIC,
        }
        existing = [path for path in paths.values() if path.exists()]
        if existing and not force:
            raise KeyFileError(
                f"{existing[0]}: already exists (pass --force to replace the coordinator's keys in {directory})"
            )
        write_private_key(paths["encryption_key"], self.encryption_key, force=force)
        write_private_key(paths["signing_key"], self.signing_key, force=force)
        write_public_file(paths["public"], _json_bytes(self.public().to_json()), force=force)
        return paths

    @classmethod
    def load(cls, directory: Path | str) -> CoordinatorKeys:
        directory = Path(directory)
        keys = cls(
            load_private_key(directory / COORDINATOR_ENCRYPTION_KEY, X25519PrivateKey),
            load_private_key(directory / COORDINATOR_SIGNING_KEY, Ed25519PrivateKey),
        )
        public_path = directory / COORDINATOR_PUBLIC
        if public_path.exists():
            stated = CoordinatorPublicKeys.load(public_path)
            if raw_public(stated.encryption_key) != raw_public(keys.encryption_key.public_key()) or raw_public(
                stated.signing_key
            ) != raw_public(keys.signing_key.public_key()):
                raise KeyFileError(f"{public_path}: public keys do not match the private keys in {directory}")
        return keys


# ---------------------------------------------------------------- clients


@dataclass(frozen=True)
class ClientIdentity:
    """A data owner's signing identity. ``repr`` shows the sender id and fingerprint only."""

    sender_id: str
    signing_key: Ed25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        check_sender_id(self.sender_id)

    @classmethod
    def generate(cls, name: str | None = None) -> ClientIdentity:
        key = Ed25519PrivateKey.generate()
        return cls(check_sender_id(name) if name else fingerprint(key.public_key()), key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def __repr__(self) -> str:
        return f"ClientIdentity(sender_id={self.sender_id!r}, fingerprint={self.fingerprint})"

    def registration(self) -> dict:
        """What the operator registers: sender id and public key (no secret)."""
        return {
            "format": IDENTITY_FORMAT,
            "sender": self.sender_id,
            "public_key": public_to_text(self.public_key),
            "fingerprint": self.fingerprint,
        }

    def save(self, directory: Path | str, force: bool = False) -> dict[str, Path]:
        directory = Path(directory)
        paths = {"key": directory / CLIENT_KEY, "public": directory / CLIENT_PUBLIC}
        existing = [path for path in paths.values() if path.exists()]
        if existing and not force:
            raise KeyFileError(f"{existing[0]}: already exists (pass --force to replace this identity)")
        write_private_key(paths["key"], self.signing_key, force=force)
        write_public_file(paths["public"], _json_bytes(self.registration()), force=force)
        return paths

    @classmethod
    def load(cls, directory: Path | str) -> ClientIdentity:
        directory = Path(directory)
        key = load_private_key(directory / CLIENT_KEY, Ed25519PrivateKey)
        public_path = directory / CLIENT_PUBLIC
        info = _read_json_object(public_path, MAX_PUBLIC_FILE_BYTES, "identity file")
        if info.get("format") != IDENTITY_FORMAT:
            raise KeyFileError(f"{public_path}: format is not {IDENTITY_FORMAT!r}")
        if info.get("public_key") != public_to_text(key.public_key()):
            raise KeyFileError(f"{public_path}: public_key does not match {directory / CLIENT_KEY}")
        try:
            return cls(info.get("sender"), key)
        except ValueError as error:
            raise KeyFileError(f"{public_path}: {error}") from None


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SenderEntry:
    sender_id: str
    public_key: Ed25519PublicKey
    revoked: bool = False

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


@dataclass
class SenderRegistry:
    """Enrolled senders: id -> Ed25519 public key and revoked flag. One key, one id."""

    entries: dict[str, SenderEntry] = field(default_factory=dict)

    def lookup(self, sender_id: str) -> SenderEntry | None:
        return self.entries.get(sender_id)

    def register(self, sender_id: str, public_key: Ed25519PublicKey) -> SenderEntry:
        """Add a sender; registering the same id with the same key again is a no-op. A revoked
        id is not re-enabled here: enrol a fresh id."""
        check_sender_id(sender_id)
        raw = raw_public(public_key)
        current = self.entries.get(sender_id)
        if current is not None:
            if raw_public(current.public_key) != raw:
                raise ValueError(f"sender {sender_id!r} is already registered with another key ({current.fingerprint})")
            if current.revoked:
                raise ValueError(f"sender {sender_id!r} is revoked; enrol the owner under a new id")
            return current
        for other in self.entries.values():
            if raw_public(other.public_key) == raw:
                raise ValueError(
                    f"public key {fingerprint(public_key)} is already registered as sender {other.sender_id!r}"
                )
        entry = SenderEntry(sender_id, public_key)
        self.entries[sender_id] = entry
        return entry

    def revoke(self, sender_id: str) -> SenderEntry:
        if sender_id not in self.entries:
            raise ValueError(f"sender {sender_id!r} is not in the registry")
        entry = SenderEntry(sender_id, self.entries[sender_id].public_key, revoked=True)
        self.entries[sender_id] = entry
        return entry

    def to_json(self) -> dict:
        return {
            "format": REGISTRY_FORMAT,
            "senders": {
                sender: {
                    "public_key": public_to_text(entry.public_key),
                    "fingerprint": entry.fingerprint,
                    "revoked": entry.revoked,
                }
                for sender, entry in sorted(self.entries.items())
            },
        }

    @classmethod
    def from_json(cls, value: dict, where: str = "registry") -> SenderRegistry:
        if (
            not isinstance(value, dict)
            or value.get("format") != REGISTRY_FORMAT
            or not isinstance(value.get("senders"), dict)
        ):
            raise KeyFileError(f"{where}: not a sender registry (format {REGISTRY_FORMAT!r} with a 'senders' object)")
        registry = cls()
        for sender, item in value["senders"].items():
            if not isinstance(item, dict) or not isinstance(item.get("revoked", False), bool):
                raise KeyFileError(f"{where}: sender {sender!r} needs 'public_key' and a boolean 'revoked'")
            try:
                entry = registry.register(
                    sender, ed25519_public_from_text(item.get("public_key"), f"{where}: sender {sender!r}")
                )
            except ValueError as error:
                raise KeyFileError(f"{where}: {error}") from None
            if item.get("fingerprint", entry.fingerprint) != entry.fingerprint:
                raise KeyFileError(
                    f"{where}: sender {sender!r}: fingerprint {str(item['fingerprint'])[:32]!r} "
                    "does not match its public key"
                )
            if item.get("revoked", False):
                registry.revoke(entry.sender_id)
        return registry

    @classmethod
    def load(cls, path: Path | str) -> SenderRegistry:
        return cls.from_json(_read_json_object(Path(path), MAX_REGISTRY_BYTES, "sender registry"), str(path))

    @classmethod
    def load_or_new(cls, path: Path | str) -> SenderRegistry:
        return cls.load(path) if Path(path).exists() else cls()

    def save(self, path: Path | str) -> Path:
        return write_public_file(Path(path), _json_bytes(self.to_json()), force=True)
