"""Envelope cost: seal + verify + open of one adapter update, against one round of client training.

For two adapter shapes (2 + 2 whole blocks, float32, random weights from a ``LlamaConfig``;
nothing is downloaded):

- SmolLM2-135M (hidden 576, intermediate 1536, 9 heads, 3 kv heads, 30 layers, vocab 49152);
- a Llama-3.2-1B-like shape (hidden 2048, intermediate 8192, 32 heads, 8 kv heads, 16 layers,
  vocab 128256).

It times, as the median of several runs: ``seal_update`` (safetensors encoding, HPKE
encryption, Ed25519 signature: the client's cost), the coordinator's framing + signature check
("verify") and the whole ``UpdateOpener.open`` (verify, decryption, digest, tensor checks,
norm: the coordinator's cost). The client's training time for one round is measured, not
assumed: a few real AdamW steps of the SmolLM2 2-10-2 emulator (random init) with whole adapter
blocks trainable, batch 8 x 256 tokens, times the job's default steps per round
(``FEDERATED_TUNING.steps``). The 1B-class round is that time scaled by the ratio of training
FLOPs per token (stated in the output), not measured.

    python benchmarks/envelope.py [--runs 5] [--train-steps 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

SHAPES = {
    "SmolLM2-135M": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
    "Llama-3.2-1B-like": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
}
A, K, B = 2, 10, 2


def adapter_from_config(config) -> dict[str, torch.Tensor]:
    """The 2 + 2 adapter blocks of ``config``'s model, random weights, keyed like the real adapter."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    n = config.num_hidden_layers
    state = {}
    for index in [*range(A), *range(n - B, n)]:
        layer = LlamaDecoderLayer(config, layer_idx=index)
        for name, tensor in layer.state_dict().items():
            state[f"blocks.{index}.{name}"] = tensor.detach().clone()
        del layer
    return state


def train_step_seconds(config, batch: int, seq: int, steps: int, device: str) -> float:
    """Median seconds of one AdamW step of the 2-10-2 emulator with whole adapter blocks trainable."""
    from transformers import LlamaForCausalLM

    from offsite.emulator.data import Batch
    from offsite.emulator.sandwich import SandwichShape, build_emulator
    from offsite.emulator.score import answer_loss, autocast_for
    from offsite.emulator.tune import trainable_parameters

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    shape = SandwichShape(A, K, B)
    emulator, layout = build_emulator(model, shape)
    del model
    params = trainable_parameters(emulator, layout, shape.adapter_blocks(config.num_hidden_layers), "blocks")
    emulator.to(device).train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    data = Batch(ids, torch.ones_like(ids), ids.clone())
    autocast = autocast_for(torch.device(device))

    def step() -> float:
        started = time.perf_counter()
        with autocast:
            loss = answer_loss(emulator, data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()  # warm-up
    return statistics.median(step() for _ in range(steps))


def training_flops_per_token(config, seq: int) -> float:
    """Forward f per block (2 x block params + causal attention 2 x seq x hidden), head h = 2 x
    vocab x hidden; emulator tuning with whole adapter blocks costs 2((a+k+b) f + h) + (a+b) f
    (activation gradients through every kept block and the head, weight gradients in the adapter)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = hidden * config.num_key_value_heads // config.num_attention_heads
    block_params = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    f = 2 * block_params + 2 * seq * hidden
    h = 2 * config.vocab_size * hidden
    return 2 * ((A + K + B) * f + h) + (A + B) * f


def time_envelope(adapter: dict[str, torch.Tensor], runs: int) -> dict[str, float]:
    from offsite.protocol.envelope import (
        UpdateOpener,
        UpdatePolicy,
        parse_envelope,
        seal_update,
        signed_message,
    )
    from offsite.protocol.keys import ClientIdentity, CoordinatorKeys, SenderRegistry

    keys, identity, registry = CoordinatorKeys.generate(), ClientIdentity.generate("owner-0"), SenderRegistry()
    registry.register(identity.sender_id, identity.public_key)
    generator = torch.Generator().manual_seed(1)
    update = {key: tensor + 1e-3 * torch.randn(tensor.shape, generator=generator) for key, tensor in adapter.items()}
    policy = UpdatePolicy(max_update_norm=1e6)
    seal, verify, open_ = [], [], []
    size = 0
    for run in range(runs):
        started = time.perf_counter()
        envelope = seal_update(
            update,
            job="bench",
            round=1,
            identity=identity,
            recipient=keys.public(),
            metadata={"num-examples": 80, "train-loss": 1.0},
        )
        seal.append(time.perf_counter() - started)
        size = len(envelope)
        opener = UpdateOpener(keys, registry, "bench", 1, adapter, policy)
        started = time.perf_counter()
        parsed = parse_envelope(envelope, opener.max_payload_bytes)
        registry.lookup(parsed.header.sender).public_key.verify(
            parsed.signature, signed_message(parsed.header_bytes, parsed.ciphertext)
        )
        verify.append(time.perf_counter() - started)
        del parsed
        started = time.perf_counter()
        opened = opener.open(envelope)
        open_.append(time.perf_counter() - started)
        if run == 0:
            assert all(torch.equal(opened.tensors[k], update[k]) for k in update), "round trip is not exact"
        del envelope, opened, opener
        gc.collect()
    return {
        "seal": statistics.median(seal),
        "verify": statistics.median(verify),
        "open": statistics.median(open_),
        "bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", type=int, default=5, help="envelope runs per shape (median; the 1B shape uses min(runs, 3))"
    )
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument(
        "--device", default="cpu", help="where the training steps run (the envelope always runs on CPU)"
    )
    args = parser.parse_args()

    from transformers import LlamaConfig

    from offsite.cloud.fed_job import FEDERATED_TUNING

    round_steps = FEDERATED_TUNING.steps
    configs = {name: LlamaConfig(**values, max_position_embeddings=2048) for name, values in SHAPES.items()}
    small = configs["SmolLM2-135M"]
    print(f"measuring {args.train_steps} training step(s) of SmolLM2-135M 2-10-2 on {args.device} ...", flush=True)
    step_seconds = train_step_seconds(small, args.batch, args.seq, args.train_steps, args.device)
    threads = torch.get_num_threads()
    round_seconds = {
        name: step_seconds
        * round_steps
        * training_flops_per_token(config, args.seq)
        / training_flops_per_token(small, args.seq)
        for name, config in configs.items()
    }

    rows = []
    for name, config in configs.items():
        adapter = adapter_from_config(config)
        params = sum(t.numel() for t in adapter.values())
        print(f"timing envelopes for {name} ({params / 1e6:.1f} M adapter parameters) ...", flush=True)
        timing = time_envelope(adapter, args.runs if params < 1e8 else min(args.runs, 3))
        rows.append((name, params, timing))
        del adapter
        gc.collect()

    print()
    print(
        f"client training: SmolLM2-135M 2-10-2, whole adapter blocks, AdamW, batch {args.batch} x {args.seq} tokens on "
        f"{args.device} ({threads} threads): {step_seconds:.2f} s/step (median of {args.train_steps}), "
        f"x {round_steps} steps per round (FEDERATED_TUNING.steps) = {round_seconds['SmolLM2-135M']:.1f} s per round"
    )
    ratio = training_flops_per_token(configs["Llama-3.2-1B-like"], args.seq) / training_flops_per_token(small, args.seq)
    print(
        f"1B-class round: not measured; SmolLM2's round x {ratio:.1f} (training FLOPs per token of its 2-10-2 emulator "
        f"over SmolLM2's) = {round_seconds['Llama-3.2-1B-like']:.0f} s"
    )
    print("envelope: float32 update, HPKE X25519/HKDF-SHA256/AES-256-GCM + Ed25519, on CPU; median of runs\n")
    print(
        "| adapter (2+2 blocks) | params | envelope MiB | seal s | verify s | open s (incl. verify) | seal+open s "
        "| % of one round |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, params, t in rows:
        total = t["seal"] + t["open"]
        print(
            f"| {name} | {params / 1e6:.1f} M | {t['bytes'] / 2**20:.1f} | {t['seal']:.3f} | {t['verify']:.3f} "
            f"| {t['open']:.3f} "
            f"| {total:.3f} | {100 * total / round_seconds[name]:.2f}% |"
        )


if __name__ == "__main__":
    main()
