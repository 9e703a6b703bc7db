"""Serving many jobs on one base model: cross-job batching against the alternatives, one run.

On the embedded SmolLM2-135M (``offsite.cloud.models.load_base()``; converted once and cached,
never downloaded), K random perturbed adapters (whole adapter blocks 0, 1, 28, 29 by default, or
LoRA with ``--mode lora``) stand in for K finished jobs. A batch of ``--batch`` requests spread
evenly over K jobs is decoded greedily (``--new-tokens`` each, end of sequence ignored) three ways:

- ``multi-job``: one server, one shared base, the K jobs' rows in the same forward passes
  (``offsite cloud serve``'s engine);
- ``merged x1``: a single job's plugged-in model serving the same batch (the best case, no
  per-job work: what one job alone would get);
- ``one after another``: each job's plugged-in model serves its own rows, job after job (what a
  server without cross-job batching does with the same requests);

and prints decode tokens/s (decode forward passes only), end-to-end tokens/s (prefill included)
and p50/p99 request latency (all requests arrive at once). Wall-clock rates drift with whatever
else a shared machine runs, so it also times single decode steps in turn (multi-job, merged,
multi-job, ...) and prints their ratio. A last run lets requests for K=8 jobs arrive at random
(Poisson) times while others decode, and prints p50/p99 latency and time to first token. Same
engine code in every row, so only the batching differs; greedy tokens of the multi-job run are
compared with the one-after-another run's.

    .venv/bin/python benchmarks/serving.py engine             # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/serving.py engine --jobs 1,4,8 --batch 16 --new-tokens 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offsite.cloud.models import load_base
from offsite.cloud.plugin import plug_in_update
from offsite.cloud.serving.engine import LlamaStack, Request, SamplingParams, Scheduler
from offsite.cloud.serving.registry import served_job
from offsite.emulator.arch import blocks_of
from offsite.emulator.sandwich import adapter_state_dict


def random_adapters(
    model, k: int, mode: str, adapter_blocks: list[int], seed: int = 0
) -> list[tuple[dict, float | None]]:
    """K stand-in tuned adapters: the model's own adapter blocks plus 1% noise, or rank-8 LoRA."""
    generator = torch.Generator().manual_seed(seed)
    n = len(blocks_of(model))
    own = adapter_state_dict(model, list(range(n)), adapter_blocks)
    adapters = []
    for _ in range(k):
        if mode == "blocks":
            adapters.append(
                (
                    {
                        key: w + 0.01 * w.float().std() * torch.randn(w.shape, generator=generator)
                        for key, w in own.items()
                    },
                    None,
                )
            )
            continue
        factors = {}
        for key, w in own.items():
            stem = key[: -len(".weight")]
            if w.dim() == 2 and stem.rsplit(".", 1)[-1].endswith("proj"):
                factors[stem + ".lora_A"] = 0.02 * torch.randn(8, w.shape[1], generator=generator)
                factors[stem + ".lora_B"] = 0.02 * torch.randn(w.shape[0], 8, generator=generator)
        adapters.append((factors, 16.0))
    return adapters


def run(scheduler: Scheduler, requests: list[Request], arrivals: list[float] | None = None) -> dict:
    """Submit (at once, or at ``arrivals`` seconds) and wait; tokens and timings of each request."""
    stats = scheduler.stats
    decode_tokens, decode_seconds = stats.decode_tokens, stats.decode_seconds
    start = time.perf_counter()
    if arrivals is None:
        for request in requests:
            scheduler.submit(request)
    pending = list(range(len(requests)))
    submitted = 0 if arrivals is not None else len(requests)
    outputs: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    done_at: dict[int, float] = {}
    first_at: dict[int, float] = {}
    while pending:
        now = time.perf_counter() - start
        while arrivals is not None and submitted < len(requests) and arrivals[submitted] <= now:
            requests[submitted].submitted = time.perf_counter()
            scheduler.submit(requests[submitted])
            submitted += 1
        for i in list(pending):
            if i >= submitted:
                continue
            while True:
                try:
                    kind, value = requests[i].events.get_nowait()
                except queue.Empty:
                    break
                if kind == "token":
                    outputs[i].append(value)
                    first_at.setdefault(i, time.perf_counter())
                elif kind == "done":
                    done_at[i] = time.perf_counter()
                    pending.remove(i)
                    break
                else:
                    raise RuntimeError(value)
        time.sleep(0.0005)
    wall = time.perf_counter() - start
    tokens = [outputs[i] for i in range(len(requests))]
    finished = [done_at[i] - requests[i].submitted for i in range(len(requests))]
    first = [first_at[i] - requests[i].submitted for i in range(len(requests))]
    generated = sum(len(t) for t in tokens)
    return {
        "tokens": tokens, "latency": finished, "ttft": first, "wall": wall, "generated": generated,
        "decode_tokens": stats.decode_tokens - decode_tokens, "decode_seconds": stats.decode_seconds - decode_seconds,
    }  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Setup:
    """What every part of the run shares: the base, the prompts, the K jobs and their adapters."""

    args: argparse.Namespace
    base: torch.nn.Module
    ks: list[int]
    adapter_blocks: list[int]
    prompts: list[list[int]]
    adapters: list[tuple[dict, float | None]]
    jobs: list
    params: SamplingParams
    context: int
    rows: list[dict] = field(default_factory=list)

    def row(self, setting: str, k: int, result: dict, matches: str = "") -> dict:
        self.rows.append({
            "setting": setting, "K": k, "requests": len(result["latency"]), "generated": result["generated"],
            "decode_tok_s": result["decode_tokens"] / result["decode_seconds"],
            "end_to_end_tok_s": result["generated"] / result["wall"],
            "p50_s": percentile(result["latency"], 50), "p99_s": percentile(result["latency"], 99),
            "same_tokens": matches,
        })  # fmt: skip
        r = self.rows[-1]
        print(
            f"  {setting:18s} K={k}: decode {r['decode_tok_s']:7.1f} tok/s, "
            f"end-to-end {r['end_to_end_tok_s']:7.1f} tok/s, "
            f"latency p50 {r['p50_s']:.2f} s p99 {r['p99_s']:.2f} s {matches}",
            flush=True,
        )
        return r


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serving.py engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--jobs", default="1,4,8", help="comma-separated K values")
    parser.add_argument("--batch", type=int, default=16, help="requests per batch, spread evenly over the K jobs")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--mode", choices=("blocks", "lora"), default="blocks", help="the jobs' adapters: whole blocks or LoRA"
    )
    parser.add_argument("--adapter-blocks", default="0,1,28,29")
    parser.add_argument("--arrivals", type=int, default=32, help="requests of the Poisson-arrival run (0: skip it)")
    parser.add_argument("--rate", type=float, default=1.0, help="Poisson arrival rate, requests/s")
    parser.add_argument(
        "--step-repeats", type=int, default=7, help="interleaved decode steps per setting for the step-time ratio"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a shared 2-core machine runs faster with 1)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


def setup(args: argparse.Namespace) -> Setup:
    ks = [int(k) for k in args.jobs.split(",")]
    adapter_blocks = [int(i) for i in args.adapter_blocks.split(",")]
    base, _, where = load_base(args.model)
    rng = random.Random(0)
    vocab = base.config.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_tokens)] for _ in range(args.batch)]
    adapters = random_adapters(base, max(ks), args.mode, adapter_blocks)
    jobs = [
        served_job(f"job{j}", t, {"mode": "lora" if a else "blocks", "lora_alpha": a}, base)
        for j, (t, a) in enumerate(adapters)
    ]
    print(
        f"{where}: {len(blocks_of(base))} blocks; {args.mode} adapters at blocks {adapter_blocks}; "
        f"batch {args.batch} x "
        f"({args.prompt_tokens} prompt + {args.new_tokens} new tokens), greedy; torch threads {args.threads}",
        flush=True,
    )
    return Setup(
        args,
        base,
        ks,
        adapter_blocks,
        prompts,
        adapters,
        jobs,
        SamplingParams(max_tokens=args.new_tokens, temperature=0),
        args.prompt_tokens + args.new_tokens + 8,
    )


def one_after_another(run_: Setup, k: int, owner: list[int], merged_done: bool) -> tuple[dict, bool]:
    """Each job's plugged-in model serves its own rows, job after job (and, once, a single merged
    job serves the whole batch: the "merged x1" row)."""
    batch, params = run_.args.batch, run_.params
    sequential = {
        "tokens": [None] * batch,
        "latency": [0.0] * batch,
        "wall": 0.0,
        "generated": 0,
        "decode_tokens": 0,
        "decode_seconds": 0.0,
    }
    for j in range(k):
        mine = [i for i in range(batch) if owner[i] == j]
        merged = plug_in_update(run_.base, run_.adapters[j][0], run_.adapter_blocks, run_.adapters[j][1])
        alone = Scheduler(LlamaStack(merged, max_context=run_.context, slots=len(mine)), eos_ids=set())
        result = run(alone, [Request(None, run_.prompts[i], params) for i in mine])
        alone.close()
        for n, i in enumerate(mine):
            sequential["tokens"][i] = result["tokens"][n]
            sequential["latency"][i] = sequential["wall"] + result["latency"][n]  # it waited for the jobs before it
        for key in ("wall", "generated", "decode_tokens", "decode_seconds"):
            sequential[key] += result[key]
        if j == 0 and not merged_done:
            whole = Scheduler(LlamaStack(merged, max_context=run_.context, slots=batch), eos_ids=set())
            run_.row("merged x1", 1, run(whole, [Request(None, p, params) for p in run_.prompts]))
            whole.close()
            merged_done = True
        del merged
    return sequential, merged_done


def compare_batching(run_: Setup, shared: Scheduler) -> None:
    merged_done = False
    for k in run_.ks:
        owner = [j % k for j in range(run_.args.batch)]
        multi = run(
            shared, [Request(run_.jobs[owner[i]], run_.prompts[i], run_.params) for i in range(run_.args.batch)]
        )
        multi_row = run_.row("multi-job", k, multi)
        sequential, merged_done = one_after_another(run_, k, owner, merged_done)
        same = sum(a == b for a, b in zip(multi["tokens"], sequential["tokens"]))
        multi_row["same_tokens"] = f"{same}/{run_.args.batch}"
        run_.row("one after another", k, sequential)
        print(
            f"    greedy tokens identical to the one-after-another run for {same}/{run_.args.batch} requests",
            flush=True,
        )


def step_times(run_: Setup) -> None:
    """Wall-clock rates drift with whatever else the machine runs; decode steps timed in turn
    (multi-job, merged, multi-job, ...) on the same rows see the same conditions."""
    args, batch = run_.args, run_.args.batch
    merged_model = plug_in_update(run_.base, run_.adapters[0][0], run_.adapter_blocks, run_.adapters[0][1])
    multi_stack = LlamaStack(run_.base, max_context=run_.context, slots=batch)
    merged_stack = LlamaStack(merged_model, max_context=run_.context, slots=batch)
    slots = list(range(batch))
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        merged_stack.forward([None] * batch, run_.prompts, [0] * batch, slots)
        for k in run_.ks:
            multi_stack.forward([run_.jobs[i % k] for i in slots], run_.prompts, [0] * batch, slots)
        for _ in range(args.step_repeats):
            for k in run_.ks:
                for name, stack, batch_jobs in (
                    ("multi", multi_stack, [run_.jobs[i % k] for i in slots]),
                    ("merged", merged_stack, [None] * batch),
                ):
                    t0 = time.perf_counter()
                    stack.forward(batch_jobs, [[5]] * batch, [args.prompt_tokens] * batch, slots)
                    times.setdefault((name, k), []).append(time.perf_counter() - t0)
    print(
        f"  decode step of {batch} rows, interleaved with a single merged job's (median of {args.step_repeats}):",
        flush=True,
    )
    for k in run_.ks:
        multi, merged = percentile(times[("multi", k)], 50), percentile(times[("merged", k)], 50)
        print(
            f"    K={k}: {1e3 * multi:.0f} ms vs {1e3 * merged:.0f} ms merged: {multi / merged:.2f}x the time",
            flush=True,
        )
        run_.rows.append(
            {
                "setting": "step time vs merged",
                "K": k,
                "multi_ms": 1e3 * multi,
                "merged_ms": 1e3 * merged,
                "ratio": multi / merged,
            }
        )


def poisson(run_: Setup, shared: Scheduler) -> None:
    """Requests for the most jobs arriving at random (Poisson) times while others decode."""
    args, k = run_.args, max(run_.ks)
    arrival_rng = random.Random(1)
    times, t = [], 0.0
    for _ in range(args.arrivals):
        t += arrival_rng.expovariate(args.rate)
        times.append(t)
    requests = [
        Request(
            run_.jobs[i % k],
            run_.prompts[i % args.batch],
            SamplingParams(max_tokens=arrival_rng.randint(8, 2 * args.new_tokens), temperature=0),
        )
        for i in range(args.arrivals)
    ]
    result = run(shared, requests, arrivals=times)
    ttft = result["ttft"]
    print(
        f"  poisson arrivals   K={k}: {args.arrivals} requests at {args.rate:g}/s, "
        f"{result['generated']} tokens in {result['wall']:.1f} s; "
        f"latency p50 {percentile(result['latency'], 50):.2f} s p99 {percentile(result['latency'], 99):.2f} s; "
        f"time to first token p50 {percentile(ttft, 50):.2f} s p99 {percentile(ttft, 99):.2f} s; "
        f"most rows in a step {shared.stats.max_rows}",
        flush=True,
    )
    run_.rows.append(
        {
            "setting": "poisson arrivals",
            "K": k,
            "requests": args.arrivals,
            "rate": args.rate,
            "generated": result["generated"],
            "p50_s": percentile(result["latency"], 50),
            "p99_s": percentile(result["latency"], 99),
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p99_s": percentile(ttft, 99),
        }
    )


def print_table(rows: list[dict], ks: list[int]) -> None:
    print()
    print("| setting | K | decode tok/s | end-to-end tok/s | latency p50 (s) | latency p99 (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "decode_tok_s" in r:
            print(
                f"| {r['setting']} | {r['K']} | {r['decode_tok_s']:.1f} | {r['end_to_end_tok_s']:.1f} "
                f"| {r['p50_s']:.2f} | {r['p99_s']:.2f} |"
            )
    speedups = {r["K"]: r["decode_tok_s"] for r in rows if r["setting"] == "multi-job"}
    after = {r["K"]: r["decode_tok_s"] for r in rows if r["setting"] == "one after another"}
    merged = next((r["decode_tok_s"] for r in rows if r["setting"] == "merged x1"), None)
    for k in ks:
        line = f"K={k}: multi-job decode is {speedups[k] / after[k]:.2f}x one-after-another"
        if merged:
            line += f", {speedups[k] / merged:.2f}x a single merged job"
        print(line)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run_ = setup(args)
    shared = Scheduler(LlamaStack(run_.base, max_context=run_.context, slots=args.batch), eos_ids=set())
    run(
        shared, [Request(None, run_.prompts[0], SamplingParams(max_tokens=4, temperature=0)) for _ in range(2)]
    )  # warm-up
    compare_batching(run_, shared)
    step_times(run_)
    if args.arrivals:
        poisson(run_, shared)
    shared.close()
    print_table(run_.rows, run_.ks)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(run_.rows, indent=1))


if __name__ == "__main__":
    main()
