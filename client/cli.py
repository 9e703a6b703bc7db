"""``offsite client ...``: the data owner's commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.emulator.options import add_tune_arguments, tune_config_from_args
from offsite.emulator.tune import TuneConfig

from .daemon import DaemonConfig, RestartPolicy, run_daemon
from .enroll_cli import register_enroll_command
from .local import train_local_to_file


def register(subparsers) -> None:
    client = subparsers.add_parser("client", help="data owner: tune the adapter on local data", description=__doc__)
    commands = client.add_subparsers(dest="client_command", required=True, metavar="COMMAND")
    _add_train_command(commands)  # offsite client train
    _add_start_command(commands)  # offsite client start
    register_enroll_command(commands)  # offsite client enroll


def _add_train_command(commands) -> None:
    train = commands.add_parser(
        "train",
        help="tune the adapter of an emulator bundle on a local JSONL file",
        description="Tune the bundle's adapter on local data and write the update as safetensors. "
        "The data file never leaves this machine.",
    )
    train.add_argument(
        "--bundle", required=True, type=Path, help="emulator bundle directory (from `offsite cloud prepare`)"
    )
    train.add_argument(
        "--data", required=True, type=Path, help='JSONL: {"prompt","choices","answer"} or {"prompt","completion"}'
    )
    train.add_argument("--out", required=True, type=Path, help="where to write the update (.safetensors)")
    train.add_argument(
        "--coordinator-key",
        type=Path,
        help="the coordinator's coordinator.pub.json, pinned out of band: the bundle must be signed by it "
        "(without it an edited manifest is caught only by its own consistency checks)",
    )
    train.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="less memory, more time: activations and the head's logits recomputed in the backward pass",
    )
    add_tune_arguments(train)
    train.set_defaults(func=_train)


def _add_start_command(commands) -> None:
    start = commands.add_parser(
        "start",
        help="run a Flower SuperNode with the offsite ClientApp, restarted if it crashes",
        description="Connect out to the operator's SuperLink and train on local data when asked. The SuperNode runs "
        "under a supervisor that restarts it after a crash (exponential backoff) and stops it on SIGTERM/SIGINT. "
        "The data file never leaves this machine.",
    )
    start.add_argument("--superlink", required=True, help="the SuperLink's address, HOST:PORT")
    start.add_argument(
        "--data", required=True, type=Path, help='JSONL: {"prompt","choices","answer"} or {"prompt","completion"}'
    )
    start.add_argument(
        "--root-certificates", type=Path, help="CA certificate (ca.crt) that signed the SuperLink's TLS certificate"
    )
    start.add_argument(
        "--auth-key",
        type=Path,
        help="this SuperNode's private key (OpenSSH EC P-384; the operator registered its .pub)",
    )
    start.add_argument("--cache-dir", type=Path, help="bundle cache (default $OFFSITE_CACHE/client)")
    start.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    start.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS: loopback tests only")
    start.add_argument(
        "--runtime-port",
        type=int,
        default=9094,
        help="the SuperNode's local runtime API port on 127.0.0.1 (default 9094)",
    )
    start.add_argument("--threads", type=int, help="torch CPU threads for training")
    start.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="tune with less memory and more time: activations and the head's logits recomputed in the backward pass",
    )
    start.add_argument("--max-restarts", type=int, help="give up after this many restarts (default: never)")
    start.add_argument(
        "--identity",
        type=Path,
        help="this data owner's identity directory (`offsite client enroll --out DIR`): signs sealed updates",
    )
    start.add_argument(
        "--coordinator-key",
        type=Path,
        help="the coordinator's coordinator.pub.json, pinned out of band: updates are sealed to it, "
        "bundles must be signed by it",
    )
    start.add_argument(
        "--audit-dir", type=Path, help="keep a copy (0600) of every update this node sends, as it left the node"
    )
    start.add_argument("--log-file", type=Path, help="append the SuperNode's output here (default: this terminal)")
    start.set_defaults(func=_start)


def _train(args: argparse.Namespace) -> int:
    config = tune_config_from_args(args, TuneConfig())
    path = train_local_to_file(
        args.bundle,
        args.data,
        config,
        args.out,
        coordinator_key=args.coordinator_key,
        checkpointing=args.activation_checkpointing,
    )
    print(f"adapter update written to {path}")
    return 0


def _start(args: argparse.Namespace) -> int:
    config = DaemonConfig(
        superlink=args.superlink,
        data_path=args.data,
        cache_dir=args.cache_dir,
        device=args.device,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
        insecure=args.insecure,
        runtime_port=args.runtime_port,
        threads=args.threads,
        activation_checkpointing=args.activation_checkpointing,
        identity_dir=args.identity,
        coordinator_key=args.coordinator_key,
        audit_dir=args.audit_dir,
    )
    return run_daemon(config, RestartPolicy(max_restarts=args.max_restarts), log_path=args.log_file)
