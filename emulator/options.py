"""Command-line options shared by the cloud and client commands (argparse <-> config dataclasses)."""

from __future__ import annotations

import argparse
import dataclasses

from .lora import LoRASpec
from .tune import TuneConfig


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adapter tuning (defaults come from the preset)")
    group.add_argument("--steps", type=int, help="optimiser steps")
    group.add_argument("--batch-size", type=int, help="examples per step")
    group.add_argument("--lr", type=float, help="learning rate (the peak, with the cosine schedule)")
    group.add_argument(
        "--schedule",
        choices=["cosine", "constant"],
        help="learning-rate schedule after the warm-up steps: cosine decay or constant",
    )
    group.add_argument("--mode", choices=["blocks", "lora"], help="train whole adapter blocks, or LoRA inside them")
    group.add_argument("--lora-rank", type=int, help="LoRA rank r")
    group.add_argument("--lora-alpha", type=float, help="LoRA alpha (scale alpha/r)")
    group.add_argument("--lora-targets", help="comma-separated module names inside a block (default: every linear)")
    group.add_argument("--train-blocks", choices=["both", "bottom", "top"], help="which adapter blocks train")
    group.add_argument("--prox", type=float, help="proximal weight mu: adds (mu/2)*||theta-theta_0||^2")
    group.add_argument("--seed", type=int, help="seed of the data order and LoRA init")
    group.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")


def tune_config_from_args(args: argparse.Namespace, base: TuneConfig) -> TuneConfig:
    """``base`` with every option the user gave on the command line replaced."""
    lora = base.lora
    if args.lora_rank is not None or args.lora_alpha is not None or args.lora_targets:
        lora = LoRASpec(
            rank=args.lora_rank if args.lora_rank is not None else lora.rank,
            alpha=args.lora_alpha if args.lora_alpha is not None else lora.alpha,
            targets=tuple(args.lora_targets.split(",")) if args.lora_targets else lora.targets,
        )
    given = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": args.schedule,
        "mode": args.mode,
        "train": args.train_blocks,
        "prox": args.prox,
        "seed": args.seed,
        "device": args.device,
    }
    return dataclasses.replace(base, lora=lora, **{k: v for k, v in given.items() if v is not None})
