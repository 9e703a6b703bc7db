"""``offsite deploy ...``: TLS and SuperNode-authentication material for a Flower deployment."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from offsite.cloud.certs import CertError, public_key_path, write_deployment_certs, write_node_key
from offsite.cloud.superlink import (
    FederationError,
    KeyAlreadyRegistered,
    SuperLinkConnection,
    SuperLinkControl,
    wait_for_port,
)


def register(subparsers) -> None:
    deploy = subparsers.add_parser(
        "deploy", help="deployment material: TLS certificates, SuperNode keys", description=__doc__
    )
    commands = deploy.add_subparsers(dest="deploy_command", required=True, metavar="COMMAND")

    certs = commands.add_parser(
        "certs",
        help="make a CA, the SuperLink's TLS certificate and SuperNode authentication keys",
        description="Write ca.crt/ca.key, server.crt/server.key (SAN: 127.0.0.1, localhost and every --host) and "
        "nodes/node-I + nodes/node-I.pub (EC P-384, OpenSSH) under OUT. Private keys are written 0600. "
        "See deploy/README.md for which file goes where.",
    )
    certs.add_argument("--out", required=True, type=Path, help="directory for the material (keep it out of git)")
    certs.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make (default 3)")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP the SuperNodes use to reach the SuperLink (repeatable)",
    )
    certs.add_argument("--days", type=int, default=825, help="validity of the server certificate in days")
    certs.add_argument("--force", action="store_true", help="replace existing material (invalidates handed-out ca.crt)")
    certs.add_argument(
        "--skip-existing",
        action="store_true",
        help="do nothing (exit 0) if OUT already holds a CA: for container start-up",
    )
    certs.set_defaults(func=_certs)

    node_key = commands.add_parser(
        "node-key",
        help="make one SuperNode key pair (data owner side; send only the .pub to the operator)",
    )
    node_key.add_argument("--out", required=True, type=Path, help="private key path; the public key goes to OUT.pub")
    node_key.add_argument("--force", action="store_true", help="replace an existing key")
    node_key.set_defaults(func=_node_key)

    register_keys = commands.add_parser(
        "register",
        help="register SuperNode public keys with a SuperLink (flwr supernode register); already-known keys are fine",
        description="Write a flwr connection for the SuperLink into a private FLWR_HOME and run "
        "`flwr supernode register KEY.pub` for each key. A SuperLink started with --enable-supernode-auth accepts "
        "only registered keys.",
    )
    register_keys.add_argument(
        "public_keys", nargs="+", type=Path, metavar="KEY.pub", help="OpenSSH EC public key files"
    )
    register_keys.add_argument("--superlink", required=True, help="the SuperLink's address, HOST:PORT")
    register_keys.add_argument("--root-certificates", type=Path, help="CA certificate that signed the SuperLink's")
    register_keys.add_argument(
        "--flwr-home", type=Path, default=None, help="FLWR_HOME for the connection (default: a temporary one)"
    )
    register_keys.add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for the SuperLink's port to open (default 60)"
    )
    register_keys.set_defaults(func=_register)


def _certs(args: argparse.Namespace) -> int:
    if args.skip_existing and (args.out / "ca.key").exists():
        print(f"{args.out / 'ca.key'} exists: keeping the TLS material in {args.out}")
        return 0
    made = write_deployment_certs(args.out, nodes=args.nodes, hosts=args.host, force=args.force, days=args.days)
    print(f"CA certificate:      {made.ca_cert}   (give to every SuperNode and flwr CLI)")
    print(f"CA key:              {made.ca_key}   (keep offline)")
    print(f"SuperLink TLS:       {made.server_cert} + {made.server_key}")
    for key in made.node_keys:
        print(f"SuperNode key pair:  {key} (to its data owner) + {key}.pub (flwr supernode register)")
    return 0


def _node_key(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise CertError(f"{args.out}: already exists (pass --force to replace it)")
    path = write_node_key(args.out)
    print(f"private key {path} (stays here), public key {public_key_path(path)} (send to the operator)")
    return 0


def _register(args: argparse.Namespace) -> int:
    connection = SuperLinkConnection(args.superlink, root_certificates=args.root_certificates)
    try:
        wait_for_port(args.superlink, args.wait)
    except FederationError as error:
        print(f"offsite: error: {error}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="offsite-flwr-") as scratch:
        control = SuperLinkControl(args.flwr_home or Path(scratch), connection)
        failed = 0
        for key in args.public_keys:
            try:
                print(f"{key}: registered as node {control.register_supernode(key, name=key.stem)}")
            except KeyAlreadyRegistered:
                print(f"{key}: already registered")
            except FederationError as error:
                print(f"offsite: error: {error}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0
