"""Federated rounds, from one simulated run: the coordinator's own time per round beside the
clients' training time, the bytes each client sends and receives per round (the emulator bundle
counted once per job), and the coordinator's peak memory with 100 virtual clients.

    make bench-rounds
    python benchmarks/rounds.py [--clients 100 [300 1000 ...]] [--rounds 3] [--local-steps 2] [--max-parallel 2]
                                [--mode blocks|lora] [--out DIR]

With several ``--clients`` sizes, one simulation per size and a closing table of how the
coordinator's time per round and its memory grow with the number of clients. ``--mode lora``:
rank-8 LoRA on every linear of the adapter blocks, ``frozen-a`` aggregation (B down, B up).

What runs: a tiny random-initialised llama (hidden 64, 6 blocks; emulator 1-2-1, so the adapter is
blocks 0 and 5) is cut into a bundle in a job directory; a BIG-bench training file is split among
``--clients`` data owners (Dirichlet alpha 0.5 over the labels); ``offsite cloud simulate``'s
:func:`simulate_job` runs the job (the deployment's ServerApp and ClientApp, on Flower's Ray
simulation engine) in a child process. Nothing is downloaded.

What is measured:

- time, from the round records in ``state.json`` (see ``offsite.cloud.federate.round.RoundRecord``):
  the coordinator's own work (the round minus the time spent waiting for nodes and replies:
  bundle reading and sending, building and pushing the train messages, decoding, checking and
  aggregating the updates; plus writing the checkpoint) beside the clients' own timings (the
  local tuning loop, and the whole ClientApp call: bundle verification, model build, data reading);
- bytes, computed by serializing the same messages the ServerApp and ClientApp build (Flower 1.41
  sends a message as a tree of content-addressed objects: the sum of their serialized bodies; gRPC
  framing and TLS not included): the train message (global adapter + instruction) and its reply
  (tuned adapter + metrics), and the bundle parts with their acknowledgements, once per job and client;
- memory: the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) of the child process that runs the
  ServerApp. In a simulation that process also holds Flower's in-memory SuperLink state (every
  message in flight) and the Ray driver; the Ray actor processes that run the ClientApps are not
  included. The RSS just before the simulation starts (imports done, job on disk) is printed beside it.

On a 2-core CPU machine the default run takes a few minutes; round 1's waiting time includes
starting Ray and sending the bundle to every client.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "data" / "bigbench" / "hyperbaton.train.jsonl"
MEMORY_FILE = "coordinator-memory.json"


# ---------------------------------------------------------------- the job


def tiny_tokenizer():
    """A byte-level BPE tokenizer over printable ASCII, built offline (as the tests' tiny tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1}
    for symbol in [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]:
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def make_job(job_dir: Path, args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from offsite.cloud.fed_job import FEDERATED_TUNING, FedJobConfig, write_job
    from offsite.emulator.lora import LoRASpec
    from offsite.emulator.sandwich import SandwichShape, build_emulator
    from offsite.protocol.bundle import write_bundle

    torch.manual_seed(0)
    blocks, shape = 6, SandwichShape(1, 2, 1)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    emulator, layout = build_emulator(LlamaForCausalLM(config).eval(), shape)
    write_bundle(
        job_dir / "bundle",
        emulator,
        tiny_tokenizer(),
        {
            "family": "llama",
            "shape": {"a": 1, "k": 2, "b": 1, "n_blocks": blocks},
            "layout": layout,
            "adapter_blocks": shape.adapter_blocks(blocks),
            "kept_middle": shape.kept_middle(blocks),
        },
    )
    tuning = dataclasses.replace(FEDERATED_TUNING, steps=args.local_steps, batch_size=8, lr=1e-3, max_length=64)
    if args.mode == "lora":
        lora = LoRASpec(rank=8, alpha=16.0, freeze_a=True, init_seed=tuning.seed)
        tuning = dataclasses.replace(tuning, mode="lora", lora=lora)
    write_job(
        job_dir,
        FedJobConfig(
            rounds=args.rounds,
            min_nodes=args.clients,
            min_replies=args.clients,
            round_timeout=3600,
            node_wait_timeout=120,
            bundle_timeout=3600,
            tuning=tuning,
        ),
    )


# ---------------------------------------------------------------- the child: the simulation


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> None:
    """Run the simulation in this process; write its peak RSS next to the job."""
    from offsite.harness.simulate import SimulationConfig, simulate_job

    for module in ("ray", "flwr.simulation.run_simulation", "offsite.cloud.federate.app", "offsite.client.client_app"):
        importlib.import_module(module)  # the run's imports, done before the baseline
    before = rss_mib()
    started = time.perf_counter()
    simulate_job(args.job, args.partitions, SimulationConfig(cpus_per_client=1.0, max_parallel=args.max_parallel))
    memory = {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "rss_before_mib": before,
        "seconds": time.perf_counter() - started,
    }
    (Path(args.job) / MEMORY_FILE).write_text(json.dumps(memory))


# ---------------------------------------------------------------- bytes


def serialized_bytes(message) -> int:
    """Bytes of a Flower message as it is sent: the serialized bodies of its object tree (each object once)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def message_bytes(job_dir: Path, state: dict) -> dict[str, int]:
    """Per client: the train message and its reply (a round), the bundle parts and their acknowledgements (a job)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from offsite.cloud.adapter_rule import AdapterRule
    from offsite.cloud.fed_job import read_job
    from offsite.protocol.adapter import load_update
    from offsite.protocol.bundle import read_bundle
    from offsite.protocol.messages import (
        ADAPTER,
        BUNDLE_PART,
        BUNDLE_STATUS,
        CONFIG,
        METRICS,
        TRAIN,
        bundle_part_to_content,
        plan_bundle_parts,
        read_bundle_part,
    )
    from offsite.protocol.records import state_to_record

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # what Flower's runtime sets

    def sent(content: RecordDict, message_type: str) -> Message:
        message = Message(content, dst_node_id=2, message_type=message_type, group_id="1")
        message.metadata.__dict__["_message_id"] = message.object_id  # as the Grid does on push
        return message

    job, bundle = read_job(job_dir), read_bundle(job_dir / "bundle")
    rule = AdapterRule.for_job(job, bundle)  # what travels: whole blocks, or (LoRA) the factors the job's rule sends
    adapter = rule.from_checkpoint(load_update(job_dir / state["checkpoint"])[0])
    tuning = job.tuning
    instruction = job.instruction(1, bundle.digest)
    train = sent(RecordDict({ADAPTER: state_to_record(adapter), CONFIG: instruction.to_record()}), TRAIN)
    metrics = {
        "num-examples": 50,
        "train-loss": 1.0,
        "train-loss-first": 1.0,
        "steps": tuning.steps,
        "tokens": 1000,
        "seconds": 1.0,
        "client-seconds": 1.0,
    }
    reply_like = rule.reply_like(adapter)
    reply = Message(RecordDict({ADAPTER: state_to_record(reply_like), METRICS: MetricRecord(metrics)}), reply_to=train)

    files = {name: meta["bytes"] for name, meta in bundle.manifest["files"].items()}
    files["manifest.json"] = (bundle.root / "manifest.json").stat().st_size
    plan = plan_bundle_parts(files, job.bundle_part_bytes)
    bundle_down = bundle_up = 0
    for index in range(len(plan)):
        part = sent(bundle_part_to_content(read_bundle_part(bundle.root, bundle.digest, plan, index)), BUNDLE_PART)
        ack = Message(
            RecordDict({BUNDLE_STATUS: ConfigRecord({"status": "installed", "digest": bundle.digest})}), reply_to=part
        )
        bundle_down, bundle_up = bundle_down + serialized_bytes(part), bundle_up + serialized_bytes(ack)
    return {
        "train_down": serialized_bytes(train),
        "train_up": serialized_bytes(reply),
        "bundle_down": bundle_down,
        "bundle_up": bundle_up,
        "bundle_files": sum(files.values()),
        "bundle_parts": len(plan),
        "adapter_tensor_bytes": sum(t.numel() * t.element_size() for t in adapter.values()),
    }


# ---------------------------------------------------------------- report


def stats(values) -> tuple[float, float, float]:
    values = [v for v in values if v is not None]
    return (sum(values) / len(values), max(values), sum(values)) if values else (float("nan"),) * 3


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def report(args: argparse.Namespace, job_dir: Path, split: dict, wall: float) -> None:
    state = json.loads((job_dir / "state.json").read_text())
    memory = json.loads((job_dir / MEMORY_FILE).read_text())
    sizes = [owner["rows"] for owner in split["owners"]]
    print(
        f"\n{args.clients} virtual clients, {args.rounds} rounds x {args.local_steps} local steps x batch 8, "
        f"tiny llama (hidden {args.hidden}, 6 blocks, emulator 1-2-1); {split['rows']} rows of "
        f"{Path(args.data).name} split Dirichlet(0.5), {min(sizes)}-{max(sizes)} rows per client; "
        f"Ray: {args.max_parallel} clients at a time, 1 CPU each; "
        f"whole simulation {memory['seconds']:.0f} s ({wall:.0f} s with setup)\n"
    )

    print("Time per round (seconds). coordinator = the round minus waiting on nodes, plus the checkpoint write;")
    print(
        "client columns: mean / max / sum over the clients of their own timings "
        "(train = local tuning loop, call = whole ClientApp call)"
    )
    rows = [
        [
            "round",
            "replied",
            "round",
            "waiting",
            "coordinator",
            "of which aggregate",
            "checkpoint",
            "client train mean",
            "max",
            "sum",
            "client call mean",
            "max",
            "sum",
        ]
    ]
    for record in state["history"]:
        train = stats(record.get("client_train_seconds", {}).values())
        call = stats(record.get("client_seconds", {}).values())
        own = record["coordinator_seconds"] + record["checkpoint_seconds"]
        rows.append(
            [
                str(record["round"]),
                str(len(record["replied"])),
                f"{record['seconds']:.2f}",
                f"{record['wait_seconds']:.2f}",
                f"{own:.3f}",
                f"{record['aggregate_seconds']:.3f}",
                f"{record['checkpoint_seconds']:.4f}",
                f"{train[0]:.3f}",
                f"{train[1]:.3f}",
                f"{train[2]:.2f}",
                f"{call[0]:.3f}",
                f"{call[1]:.3f}",
                f"{call[2]:.2f}",
            ]
        )
    print(table(rows))

    sizes_b = message_bytes(job_dir, state)
    rounds = args.rounds
    round_total = sizes_b["train_down"] + sizes_b["train_up"]
    bundle_total = sizes_b["bundle_down"] + sizes_b["bundle_up"]
    print(
        f"\nBytes per client (serialized Flower messages; adapter tensors {sizes_b['adapter_tensor_bytes']:,} B, "
        "bundle files "
        f"{sizes_b['bundle_files']:,} B in {sizes_b['bundle_parts']} part(s))"
    )
    rows = [
        ["", "to client", "from client", "both"],
        [
            "per round: train message / reply",
            f"{sizes_b['train_down']:,}",
            f"{sizes_b['train_up']:,}",
            f"{round_total:,}",
        ],
        [
            "once per job: bundle parts / acks",
            f"{sizes_b['bundle_down']:,}",
            f"{sizes_b['bundle_up']:,}",
            f"{bundle_total:,}",
        ],
        [
            f"per round, bundle amortised over {rounds}",
            f"{sizes_b['train_down'] + sizes_b['bundle_down'] / rounds:,.0f}",
            f"{sizes_b['train_up'] + sizes_b['bundle_up'] / rounds:,.0f}",
            f"{round_total + bundle_total / rounds:,.0f}",
        ],
        [
            f"whole job ({rounds} rounds)",
            f"{rounds * sizes_b['train_down'] + sizes_b['bundle_down']:,}",
            f"{rounds * sizes_b['train_up'] + sizes_b['bundle_up']:,}",
            f"{rounds * round_total + bundle_total:,}",
        ],
    ]
    print(table(rows))

    print(
        f"\nCoordinator memory ({args.clients} virtual clients): peak RSS {memory['peak_rss_mib']:.0f} MiB "
        f"(getrusage ru_maxrss of the process running the ServerApp, which in simulation also holds Flower's in-memory "
        f"SuperLink and the Ray driver; the Ray actors running the ClientApps are separate processes, not counted); "
        f"RSS before the simulation started (imports done): {memory['rss_before_mib']:.0f} MiB, so "
        f"{memory['peak_rss_mib'] - memory['rss_before_mib']:.0f} MiB for the run itself."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[100], help="virtual clients; several sizes run one after another"
    )
    parser.add_argument("--mode", choices=("blocks", "lora"), default="blocks", help="whole blocks or LoRA (frozen-a)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--local-steps", type=int, default=2, help="local steps per client and round (default 2)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny llama (default 64)")
    parser.add_argument("--max-parallel", type=int, default=2, help="clients training at once, 1 CPU each (default 2)")
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="task file to split (default: BIG-bench hyperbaton train)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the job here (default: a temporary directory, removed)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--partitions", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    growth = []
    for clients in args.clients:
        growth.append(run_size(argparse.Namespace(**{**vars(args), "clients": clients})))
    if len(growth) > 1:
        print("\nHow the coordinator grows with the clients (mean over rounds 2 on; round 1 also waits for Ray):")
        rows = [["clients", "coordinator s/round", "ms per client", "peak RSS MiB", "RSS for the run MiB"]]
        for clients, own, memory in growth:
            rows.append(
                [
                    str(clients),
                    f"{own:.3f}",
                    f"{1000 * own / clients:.2f}",
                    f"{memory['peak_rss_mib']:.0f}",
                    f"{memory['peak_rss_mib'] - memory['rss_before_mib']:.0f}",
                ]
            )
        print(table(rows))


def run_size(args: argparse.Namespace) -> tuple[int, float, dict]:
    """One simulation of ``args.clients`` clients: its report; (clients, coordinator s/round, memory)."""
    from offsite.harness.split import split_file

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-rounds-") as scratch:
        job_dir = (args.out / f"clients-{args.clients}" if args.out else Path(scratch) / "job").resolve()
        if (job_dir / "state.json").exists():
            raise SystemExit(f"{job_dir} already holds a run: pick another --out")
        make_job(job_dir, args)
        partitions = job_dir / "sim" / "partitions"
        split = split_file(args.data, partitions, args.clients, 0.5, seed=0, min_rows=2)
        command = [
            sys.executable,
            __file__,
            "--child",
            "--job",
            str(job_dir),
            "--partitions",
            str(partitions),
            "--max-parallel",
            str(args.max_parallel),
        ]
        print(
            f"simulating {args.clients} clients x {args.rounds} rounds in a child process (job {job_dir}) ...",
            flush=True,
        )
        subprocess.run(command, check=True, env={**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
        report(args, job_dir, split, time.perf_counter() - started)
        history = json.loads((job_dir / "state.json").read_text())["history"]
        later = history[1:] or history
        own = sum(r["coordinator_seconds"] + r["checkpoint_seconds"] for r in later) / len(later)
        return args.clients, own, json.loads((job_dir / MEMORY_FILE).read_text())


if __name__ == "__main__":
    main()
