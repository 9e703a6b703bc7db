"""``offsite cloud keys | enroll | revoke | senders | sign-bundle``: the coordinator's keys, the
registry of enrolled data owners, and bundle signatures. Only public keys and fingerprints are
ever printed."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.protocol.bundle_signing import sign_bundle
from offsite.protocol.keys import CoordinatorKeys, SenderRegistry, ed25519_public_from_text


def register_key_commands(commands) -> None:
    """Add the key and registry subcommands to ``offsite cloud``'s subparsers."""
    keys = commands.add_parser(
        "keys",
        help="create the coordinator's key pairs (update encryption, bundle signing)",
        description="Write coordinator-encryption.key (X25519) and coordinator-signing.key (Ed25519), both 0600, "
        "and coordinator.pub.json (the public keys: give it to every data owner) under OUT. Prints fingerprints only.",
    )
    keys.add_argument(
        "--out", required=True, type=Path, help="directory for the keys (keep it out of git and off the SuperLink)"
    )
    keys.add_argument(
        "--force", action="store_true", help="replace existing keys (every data owner must pin the new public file)"
    )
    keys.set_defaults(func=_keys)

    enroll = commands.add_parser(
        "enroll",
        aliases=["register"],
        help="register a data owner's identity (sender id + public key) in the sender registry",
        description="Add a sender to the registry JSON (created if missing). Take the id and key from what "
        "`offsite client enroll` printed on the data owner's machine; "
        "check the fingerprint with the owner out of band.",
    )
    enroll.add_argument("--registry", required=True, type=Path, help="sender registry JSON file")
    enroll.add_argument("--sender", required=True, help="the sender id")
    enroll.add_argument("--public-key", required=True, help="the sender's Ed25519 public key (base64, 44 characters)")
    enroll.set_defaults(func=_enroll)

    revoke = commands.add_parser("revoke", help="revoke a sender: its updates are refused from now on")
    revoke.add_argument("--registry", required=True, type=Path, help="sender registry JSON file")
    revoke.add_argument("--sender", required=True, help="the sender id")
    revoke.set_defaults(func=_revoke)

    senders = commands.add_parser("senders", help="list the sender registry")
    senders.add_argument("--registry", required=True, type=Path, help="sender registry JSON file")
    senders.set_defaults(func=_senders)

    sign = commands.add_parser(
        "sign-bundle",
        help="sign an emulator bundle's manifest with the coordinator's signing key",
        description="Check every file of the bundle against its manifest, then write BUNDLE/manifest.sig.",
    )
    sign.add_argument("--bundle", required=True, type=Path, help="bundle directory (e.g. JOB/bundle)")
    sign.add_argument("--keys", required=True, type=Path, help="directory written by `offsite cloud keys`")
    sign.set_defaults(func=_sign)


def _keys(args: argparse.Namespace) -> int:
    keys = CoordinatorKeys.generate()
    paths = keys.save(args.out, force=args.force)
    public = keys.public()
    print(f"encryption key (X25519):  {paths['encryption_key']}  (0600; fingerprint {public.encryption_fingerprint})")
    print(f"signing key (Ed25519):    {paths['signing_key']}  (0600; fingerprint {public.signing_fingerprint})")
    print(f"public keys:              {paths['public']}  (give this file to every data owner)")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    registry = SenderRegistry.load_or_new(args.registry)
    entry = registry.register(args.sender, ed25519_public_from_text(args.public_key, "--public-key"))
    registry.save(args.registry)
    print(f"sender {entry.sender_id!r} registered in {args.registry} (key fingerprint {entry.fingerprint})")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    registry = SenderRegistry.load(args.registry)
    entry = registry.revoke(args.sender)
    registry.save(args.registry)
    print(f"sender {entry.sender_id!r} revoked in {args.registry} (key fingerprint {entry.fingerprint})")
    return 0


def _senders(args: argparse.Namespace) -> int:
    registry = SenderRegistry.load(args.registry)
    for sender, entry in sorted(registry.entries.items()):
        print(f"{sender:24s} {entry.fingerprint}  {'REVOKED' if entry.revoked else 'active'}")
    if not registry.entries:
        print(f"{args.registry}: no senders")
    return 0


def _sign(args: argparse.Namespace) -> int:
    keys = CoordinatorKeys.load(args.keys)
    path = sign_bundle(args.bundle, keys)
    print(f"signed {args.bundle} with key {keys.public().signing_fingerprint}: {path}")
    return 0
