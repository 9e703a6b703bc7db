"""``offsite client ...``: the data owner's commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.emulator.tune import TuneConfig
from offsite.options import add_tune_arguments, tune_config_from_args


def register(subparsers) -> None:
    client = subparsers.add_parser("client", help="data owner: tune the adapter on local data", description=__doc__)
    commands = client.add_subparsers(dest="client_command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="tune the adapter of an emulator bundle on a local JSONL file",
        description="Tune the bundle's adapter on local data and write the update as safetensors. "
        "The data file never leaves this machine.",
    )
    train.add_argument("--bundle", required=True, type=Path, help="emulator bundle directory (from `offsite cloud prepare`)")
    train.add_argument("--data", required=True, type=Path, help='JSONL: {"prompt","choices","answer"} or {"prompt","completion"}')
    train.add_argument("--out", required=True, type=Path, help="where to write the update (.safetensors)")
    add_tune_arguments(train)
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from .local import train_local_to_file

    config = tune_config_from_args(args, TuneConfig())
    path = train_local_to_file(args.bundle, args.data, config, args.out)
    print(f"adapter update written to {path}")
    return 0
