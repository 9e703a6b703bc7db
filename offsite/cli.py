"""``offsite``: one command, subcommands per role. Parse -> build a config -> call a function."""

from __future__ import annotations

import argparse
import logging
import sys

from offsite import __version__
from offsite.client.cli import register as register_client
from offsite.cloud.cli import register as register_cloud
from offsite.cloud.presets import PRESETS
from offsite.cloud.serve_cli import register_query
from offsite.deploy_cli import register as register_deploy
from offsite.harness.cli import register as register_harness


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offsite",
        description="Federated offsite-tuning: the operator ships an emulator of its model, data owners tune an "
        "adapter on it locally, the operator plugs the adapter back into the full model.",
        epilog="Start with `offsite demo` (the whole pipeline on the embedded SmolLM2-135M). "
        "Caches live in $OFFSITE_CACHE (default ~/.cache/offsite).",
    )
    parser.add_argument("--version", action="version", version=f"offsite {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_harness(subparsers, register_cloud(subparsers))
    register_client(subparsers)
    register_deploy(subparsers)
    register_query(subparsers)  # offsite query
    presets = subparsers.add_parser("presets", help="list the named recipes")
    presets.set_defaults(func=_presets)
    return parser


def _presets(args: argparse.Namespace) -> int:
    for name, preset in sorted(PRESETS.items()):
        tune = preset.tune
        quantise = f"  quantise {preset.quantize}" if preset.quantize else ""
        gain = f"  plug-in gain {preset.plugin_gain:g}" if preset.plugin_gain != 1.0 else ""
        print(
            f"{name:28s} shape {preset.shape}  distil {preset.distill.steps} steps{quantise}  "
            f"tune {tune.mode} {tune.steps}x{tune.batch_size} lr {tune.lr:g} {tune.schedule}{gain}  "
            f"{preset.description}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "accelerate", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        logging.getLogger("offsite").debug("failed", exc_info=True)
        message = (
            error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else error
        )  # str(KeyError) is a repr
        print(f"offsite: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
