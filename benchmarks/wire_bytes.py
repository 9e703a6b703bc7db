"""Bytes per data owner per round on the wire: whole adapter blocks against LoRA, measured.

    python benchmarks/wire_bytes.py [--preset smollm2-135m/default] [--owners 2] [--rank 8]

A real SuperLink and ``--owners`` SuperNodes on loopback (Flower's deployment engine, insecure
HTTP so the relay can count: TLS adds its framing to both alike); every byte between them passes
through a relay (:class:`offsite.harness.wiretap.WireTap`) that counts it with a timestamp. One
2-round job per mode on the preset's emulator bundle (SmolLM2-135M 2-10-2 by default: 4 adapter
blocks), each owner tuning 1 step on 4 rows per round:

- ``blocks``: whole adapter blocks both ways;
- ``lora frozen-a``: rank-r LoRA on every linear of the adapter blocks; B down, B up;
- ``lora stack``: A and B up, the merged blocks down.

A round's bytes are those counted between the end of round 1 and the end of round 2 (the watcher
reads ``state.json``), so the bundle, sent in round 1, is not in them; Flower's own polling is.
Divided by the number of owners. The ratio column is against ``blocks``, measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "blocks": ("blocks", None),
    "lora frozen-a": ("lora", "frozen-a"),
    "lora stack": ("lora", "stack"),
}


def job_config(mode: str, aggregation: str | None, owners: int, rank: int):
    from offsite.cloud.fed_job import FEDERATED_TUNING, FedJobConfig
    from offsite.emulator.lora import LoRASpec

    tuning = dataclasses.replace(FEDERATED_TUNING, steps=1, batch_size=1, max_length=32)
    if mode == "lora":
        frozen = aggregation == "frozen-a"
        lora = LoRASpec(rank=rank, alpha=2.0 * rank, freeze_a=frozen, init_seed=0 if frozen else None)
        tuning = dataclasses.replace(tuning, mode="lora", lora=lora)
    return FedJobConfig(
        rounds=2,
        min_nodes=owners,
        min_replies=owners,
        tuning=tuning,
        lora_aggregation=aggregation or "frozen-a",
        bundle_part_bytes=64 << 20,
    )


def watch_rounds(job_dir: Path, marks: dict[int, float], stop: threading.Event) -> None:
    """Note the monotonic time at which each round's checkpoint lands in state.json."""
    while not stop.is_set():
        try:
            done = json.loads((job_dir / "state.json").read_text())["completed_round"]
        except (OSError, ValueError, KeyError):
            done = 0
        for number in range(1, done + 1):
            marks.setdefault(number, time.monotonic())
        time.sleep(0.05)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from offsite.cloud.fed_job import write_job
    from offsite.cloud.models import load_base
    from offsite.cloud.prepare import config_for, prepare_bundle
    from offsite.cloud.presets import get_preset
    from offsite.harness.federation import LocalFederation
    from offsite.harness.wiretap import WireTap

    scratch = Path(tempfile.mkdtemp(prefix="wire-bytes-"))
    preset = get_preset(args.preset)
    base, tokenizer, _ = load_base(preset.base)
    bundle = prepare_bundle(base, tokenizer, config_for(preset), scratch / "bundle", progress=False)
    del base
    rows = [{"prompt": f"note {i}: ", "completion": f"word {i}"} for i in range(4)]
    results = {}
    try:
        with LocalFederation(scratch / "federation") as federation:
            federation.start_superlink()
            tap = WireTap(federation.superlink.port, keep=False)
            for index in range(args.owners):
                data = scratch / f"owner-{index}.jsonl"
                data.write_text("".join(json.dumps(row) + "\n" for row in rows))
                config = {"data-path": data, "cache-dir": scratch / f"cache-{index}", "threads": 1}
                federation.start_supernode(config, superlink=tap.address)
            for label, (mode, aggregation) in MODES.items():
                job_dir = scratch / label.replace(" ", "-")
                shutil.copytree(bundle.root, job_dir / "bundle")
                write_job(job_dir, job_config(mode, aggregation, args.owners, args.rank))
                marks, stop = {}, threading.Event()
                watcher = threading.Thread(target=watch_rounds, args=(job_dir, marks, stop), daemon=True)
                watcher.start()
                print(f"{label}: 2 rounds on {args.owners} owners ...", file=sys.stderr, flush=True)
                run_id = federation.submit({"job-dir": job_dir})
                state = federation.wait(run_id, timeout=args.timeout)
                stop.set()
                watcher.join()
                if state != "finished:completed" or 2 not in marks:
                    raise RuntimeError(f"{label}: the job ended {state}: {federation.logs(run_id)[-2000:]}")
                counted = tap.bytes_between(marks[1], marks[2])
                results[label] = {key: value / args.owners for key, value in counted.items()}
            tap.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m/default", help="recipe whose bundle the owners get")
    parser.add_argument("--owners", type=int, default=2, help="SuperNodes (default 2)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per job (default 900)")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    results = run(args)
    blocks = results["blocks"]
    print(f"\n{args.preset}, {args.owners} owners, LoRA rank {args.rank} on every linear of the adapter blocks;")
    print("bytes per owner in round 2, counted on the wire (both directions, Flower's polling included)\n")
    print("| mode | up (MB) | down (MB) | up + down (MB) | of blocks |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        total = r["up"] + r["down"]
        share = total / (blocks["up"] + blocks["down"])
        print(f"| {label} | {r['up'] / 1e6:.3f} | {r['down'] / 1e6:.3f} | {total / 1e6:.3f} | {100 * share:.2f}% |")


if __name__ == "__main__":
    main()
