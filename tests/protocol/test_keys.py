"""Keys and the sender registry: files 0600 from creation, too-open key files refused, the
registry's rules, the CLI, and no secret in any log line or output."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat

import pytest
import torch
from cryptography.hazmat.primitives import serialization

from offsite.cli import main
from offsite.protocol.envelope import Rejected, UpdateOpener, seal_update
from offsite.protocol.keys import (
    CLIENT_KEY,
    CLIENT_PUBLIC,
    COORDINATOR_ENCRYPTION_KEY,
    COORDINATOR_PUBLIC,
    COORDINATOR_SIGNING_KEY,
    ClientIdentity,
    CoordinatorKeys,
    CoordinatorPublicKeys,
    KeyFileError,
    SenderRegistry,
    fingerprint,
    public_to_text,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    """Run with umask 000: the 0600 must come from how the file is created, not from the umask."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_key_files_are_0600_from_creation_without_chmod(tmp_path, open_umask, monkeypatch):
    def no_chmod(*args, **kwargs):
        raise AssertionError("chmod after writing a secret")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    paths = CoordinatorKeys.generate().save(tmp_path / "coordinator")
    assert mode(paths["encryption_key"]) == 0o600 and mode(paths["signing_key"]) == 0o600
    assert mode(paths["public"]) == 0o644
    identity_paths = ClientIdentity.generate("alice").save(tmp_path / "alice")
    assert mode(identity_paths["key"]) == 0o600 and mode(identity_paths["public"]) == 0o644
    assert not [p for p in tmp_path.rglob(".*.tmp")], "temporary files left behind"


def test_keys_round_trip_and_refuse_overwrite(tmp_path):
    keys = CoordinatorKeys.generate()
    keys.save(tmp_path)
    loaded = CoordinatorKeys.load(tmp_path)
    assert loaded.public().encryption_fingerprint == keys.public().encryption_fingerprint
    assert loaded.public().signing_fingerprint == keys.public().signing_fingerprint
    assert (
        CoordinatorPublicKeys.load(tmp_path / COORDINATOR_PUBLIC).signing_fingerprint
        == keys.public().signing_fingerprint
    )
    with pytest.raises(KeyFileError, match="already exists"):
        CoordinatorKeys.generate().save(tmp_path)
    CoordinatorKeys.generate().save(tmp_path, force=True)
    assert mode(tmp_path / COORDINATOR_SIGNING_KEY) == 0o600

    identity = ClientIdentity.generate()
    assert identity.sender_id == fingerprint(identity.public_key)  # no name: the fingerprint
    identity.save(tmp_path / "client")
    assert ClientIdentity.load(tmp_path / "client").sender_id == identity.sender_id


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o644, 0o660, 0o606])
def test_group_or_world_accessible_private_keys_are_refused(tmp_path, bits):
    CoordinatorKeys.generate().save(tmp_path)
    ClientIdentity.generate("alice").save(tmp_path / "alice")
    os.chmod(tmp_path / COORDINATOR_ENCRYPTION_KEY, bits)
    with pytest.raises(KeyFileError, match="chmod 600"):
        CoordinatorKeys.load(tmp_path)
    os.chmod(tmp_path / "alice" / CLIENT_KEY, bits)
    with pytest.raises(KeyFileError, match="group/others"):
        ClientIdentity.load(tmp_path / "alice")
    os.chmod(tmp_path / "alice" / CLIENT_KEY, 0o400)
    assert ClientIdentity.load(tmp_path / "alice").sender_id == "alice"


def test_mismatched_or_malformed_key_files_are_refused(tmp_path):
    ClientIdentity.generate("alice").save(tmp_path / "alice")
    info = json.loads((tmp_path / "alice" / CLIENT_PUBLIC).read_text())
    info["public_key"] = public_to_text(ClientIdentity.generate().public_key)
    (tmp_path / "alice" / CLIENT_PUBLIC).write_text(json.dumps(info))
    with pytest.raises(KeyFileError, match="does not match"):
        ClientIdentity.load(tmp_path / "alice")
    CoordinatorKeys.generate().save(tmp_path / "c")
    (tmp_path / "c" / COORDINATOR_SIGNING_KEY).unlink()
    fd = os.open(tmp_path / "c" / COORDINATOR_SIGNING_KEY, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\x80\x04 not a key")
    os.close(fd)
    with pytest.raises(KeyFileError, match="not an unencrypted PKCS#8 PEM"):
        CoordinatorKeys.load(tmp_path / "c")
    with pytest.raises(KeyFileError, match="no such"):
        ClientIdentity.load(tmp_path / "nobody")


def test_registry_rules(tmp_path):
    alice, bob = ClientIdentity.generate("alice"), ClientIdentity.generate("bob")
    registry = SenderRegistry()
    registry.register("alice", alice.public_key)
    registry.register("alice", alice.public_key)  # same id, same key: fine
    with pytest.raises(ValueError, match="another key"):
        registry.register("alice", bob.public_key)
    with pytest.raises(ValueError, match="already registered as sender 'alice'"):
        registry.register("alice-2", alice.public_key)  # one key, one sender
    with pytest.raises(ValueError, match="sender id"):
        registry.register("../bob", bob.public_key)
    registry.register("bob", bob.public_key)
    registry.revoke("bob")
    with pytest.raises(ValueError, match="revoked"):
        registry.register("bob", bob.public_key)
    path = registry.save(tmp_path / "senders.json")
    loaded = SenderRegistry.load(path)
    assert not loaded.lookup("alice").revoked and loaded.lookup("bob").revoked and loaded.lookup("carol") is None
    data = json.loads(path.read_text())
    data["senders"]["alice"]["fingerprint"] = "0" * 16
    path.write_text(json.dumps(data))
    with pytest.raises(KeyFileError, match="fingerprint"):
        SenderRegistry.load(path)
    path.write_text('{"format": "offsite-senders/1", "senders": {"x": {"public_key": "AAAA", "revoked": false}}}')
    with pytest.raises(KeyFileError, match="32"):
        SenderRegistry.load(path)


def test_cli_keys_enroll_register_revoke(tmp_path, capsys):
    assert main(["cloud", "keys", "--out", str(tmp_path / "coordinator")]) == 0
    assert main(["client", "enroll", "--out", str(tmp_path / "alice"), "--name", "alice"]) == 0
    out = capsys.readouterr().out
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("offsite cloud enroll"))
    registry = tmp_path / "senders.json"
    argv = command.split()[1:]
    argv[argv.index("senders.json")] = str(registry)
    assert main(argv) == 0
    identity = ClientIdentity.load(tmp_path / "alice")
    assert SenderRegistry.load(registry).lookup("alice").fingerprint == identity.fingerprint
    assert (
        main(
            [
                "cloud",
                "register",
                "--registry",
                str(registry),
                "--sender",
                "bob",
                "--public-key",
                public_to_text(identity.public_key),
            ]
        )
        == 2
    )
    assert "already registered as sender 'alice'" in capsys.readouterr().err
    assert main(["cloud", "revoke", "--registry", str(registry), "--sender", "alice"]) == 0
    assert SenderRegistry.load(registry).lookup("alice").revoked
    assert main(["cloud", "senders", "--registry", str(registry)]) == 0
    assert "REVOKED" in capsys.readouterr().out
    assert main(["client", "enroll", "--out", str(tmp_path / "alice")]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def _secret_forms(key) -> list[str]:
    """Every way a private key could leak as text: PEM body lines, raw bytes in hex and base64."""
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    return [raw.hex(), base64.b64encode(raw).decode().rstrip("="), body, body[:24], repr(raw)[2:-1]]


def test_no_secret_in_logs_or_output(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    assert main(["-v", "cloud", "keys", "--out", str(tmp_path / "coordinator")]) == 0
    assert main(["-v", "client", "enroll", "--out", str(tmp_path / "alice"), "--name", "alice"]) == 0
    keys, alice = CoordinatorKeys.load(tmp_path / "coordinator"), ClientIdentity.load(tmp_path / "alice")
    registry = SenderRegistry()
    registry.register("alice", alice.public_key)
    reference = {"w": torch.zeros(3)}
    envelope = seal_update({"w": torch.ones(3)}, job="j", round=1, identity=alice, recipient=keys.public())
    opener = UpdateOpener(keys, registry, "j", 1, reference)
    logging.getLogger("offsite.test").info("opener %r, keys %r, identity %r", opener, keys, alice)
    opener.open(envelope, node=1)
    texts = []
    for round_number in (2, 1):  # stale, then replay: rejections with messages
        try:
            UpdateOpener(keys, registry, "j", round_number, reference, replay=opener.replay).open(envelope, node=1)
        except Rejected as error:
            texts.append(str(error))
    os.chmod(tmp_path / "alice" / CLIENT_KEY, 0o644)
    with pytest.raises(KeyFileError) as info:
        ClientIdentity.load(tmp_path / "alice")
    captured = capsys.readouterr()
    texts += [
        caplog.text,
        captured.out,
        captured.err,
        str(info.value),
        repr(keys),
        repr(alice),
        repr(opener),
        repr(keys.public()),
    ]
    haystack = "\n".join(texts)
    assert "alice" in haystack and keys.public().encryption_fingerprint in haystack  # the logs did say things
    for key in (keys.encryption_key, keys.signing_key, alice.signing_key):
        for secret in _secret_forms(key):
            assert secret not in haystack
