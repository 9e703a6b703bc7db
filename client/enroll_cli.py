"""``offsite client enroll``: create this data owner's signing identity and print what the operator registers."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.protocol.keys import ClientIdentity


def register_enroll_command(commands) -> None:
    """Add ``enroll`` to ``offsite client``'s subparsers."""
    enroll = commands.add_parser(
        "enroll",
        help="create this data owner's identity key; prints the sender id and public key for the operator",
        description="Write OUT/identity.key (Ed25519, 0600: it never leaves this machine) and OUT/identity.json "
        "(sender id + public key). Send the printed sender id and public key to the operator, who registers them "
        "with `offsite cloud enroll`; compare the fingerprint with the operator over another channel.",
    )
    enroll.add_argument("--out", required=True, type=Path, help="directory for the identity")
    enroll.add_argument("--name", default=None, help="sender id to use (default: the key's fingerprint)")
    enroll.add_argument(
        "--force", action="store_true", help="replace an existing identity (the operator must register the new key)"
    )
    enroll.set_defaults(func=_enroll)


def _enroll(args: argparse.Namespace) -> int:
    identity = ClientIdentity.generate(args.name)
    paths = identity.save(args.out, force=args.force)
    info = identity.registration()
    print(f"identity: {paths['key']} (private, 0600: stays here) + {paths['public']} (public)")
    print(f"sender id:    {info['sender']}")
    print(f"public key:   {info['public_key']}")
    print(f"fingerprint:  {info['fingerprint']}")
    print("the operator registers it with:")
    print(f"  offsite cloud enroll --registry senders.json --sender {info['sender']} --public-key {info['public_key']}")
    return 0
