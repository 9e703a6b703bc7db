"""How does one adapter update move the emulator, and how does it move the real model?

Tunes the adapter on a bundle's emulator for a few steps, then compares, at the last prompt
token of the first 64 test rows: the middle's output (emulator vs real), the change the update
makes to the residual stream entering the final norm (norm and cosine, emulator vs real), and
the mean log-probability of each choice (its first token) before and after, on both.

    python experiments/pliability.py runs/bundles/kd-2-10-2 vitaminc_fact_verification --steps 20 --train top
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from offsite.cloud.models import load_base
from offsite.cloud.plugin import plug_in_update
from offsite.emulator.arch import get_path, spec_for
from offsite.emulator.data import read_examples, read_mc_jsonl
from offsite.emulator.tune import TuneConfig, tune_adapter
from offsite.harness.pipeline import task_files
from offsite.protocol.bundle import load_emulator, read_bundle


@torch.no_grad()
def probe(model, tokenizer, rows, top_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(middle output, residual entering the final norm, choice log-probs), at each prompt's last token."""
    spec = spec_for(model)
    blocks = get_path(model, spec.blocks)
    middle, final = [], []
    hooks = [
        blocks[len(blocks) - top_blocks].register_forward_hook(lambda m, i, o: middle.append(i[0][:, -1])),
        get_path(model, spec.final_norm).register_forward_hook(lambda m, i, o: final.append(i[0][:, -1])),
    ]
    choice_ids = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in rows[0].choices]
    logprobs = []
    try:
        for row in rows:
            ids = tokenizer(row.prompt, return_tensors="pt").input_ids
            logprobs.append(model(ids).logits[0, -1].log_softmax(-1)[choice_ids])
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(middle), torch.cat(final), torch.stack(logprobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("task")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train", choices=("both", "bottom", "top"), default="top")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    base, tokenizer, _ = load_base()
    bundle = read_bundle(args.bundle)
    emulator = load_emulator(bundle)
    train_path, test_path = task_files(args.task)
    rows = read_mc_jsonl(test_path, limit=args.rows)
    b = bundle.shape["b"]
    emu_mid, emu_before, emu_lp0 = probe(emulator, tokenizer, rows, b)
    real_mid, real_before, real_lp0 = probe(base, tokenizer, rows, b)
    config = TuneConfig(steps=args.steps, batch_size=16, lr=1e-4, train=args.train, schedule="constant")
    result = tune_adapter(
        emulator,
        tokenizer,
        bundle.layout,
        bundle.adapter_blocks,
        read_examples(train_path),
        config,
        a=bundle.shape["a"],
        progress=False,
    )
    _, emu_after, emu_lp1 = probe(emulator, tokenizer, rows, b)
    _, real_after, real_lp1 = probe(plug_in_update(base, result.adapter, bundle.adapter_blocks), tokenizer, rows, b)

    def norm(x):
        return x.norm(dim=-1).mean().item()

    print(
        json.dumps(
            {
                "rows": len(rows),
                "middle_norm": {"emulator": norm(emu_mid), "real": norm(real_mid)},
                "middle_cosine": F.cosine_similarity(emu_mid, real_mid).mean().item(),
                "update_norm": {"emulator": norm(emu_after - emu_before), "real": norm(real_after - real_before)},
                "update_cosine": F.cosine_similarity(emu_after - emu_before, real_after - real_before).mean().item(),
                "choice_logprobs": {
                    "choices": rows[0].choices,
                    "emulator_before": emu_lp0.mean(0).tolist(),
                    "emulator_after": emu_lp1.mean(0).tolist(),
                    "real_before": real_lp0.mean(0).tolist(),
                    "real_after": real_lp1.mean(0).tolist(),
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
