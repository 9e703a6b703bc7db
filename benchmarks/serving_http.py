"""The HTTP server (FastAPI on uvicorn) against the one it replaced (the standard library's threading
server, as of commit 11e903a), in one run, under the same requests, through the official ``openai``
client; then a load test of the new server.

Both servers run in processes of their own on loopback, on the same base model (SmolLM2-135M by
default), the same registry of four jobs (two whole-block adapters, two LoRA; random stand-ins)
and the same settings, one torch thread each. The old server is the package ``cloud/serving`` of
``--before`` taken from git (``git archive``) and imported under another name; nothing of it is
kept in the tree.

1. **Same batch** (``--rounds`` alternations, old then new): ``--clients`` streaming clients,
   ``--per-client`` requests each (alternating chat and completions over the four jobs, seeded, so
   both servers get identical requests); wall time, tokens/s, p50/p99 latency and time to first
   token, errors, streams ending in ``data: [DONE]``.
2. **Load** (each server): ``--clients`` streaming clients for ``--seconds`` seconds; the same
   figures, and the server's RSS sampled every second, reported from the end of ``--warm-up``.

A stream counts as an error when the client raises, an event carries an error, or it ends
without ``[DONE]`` or without a ``finish_reason`` of ``stop``/``length``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import torch
from serving_engine import random_adapters
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from offsite.cloud.models import load_base, resolve_model_dir
from offsite.cloud.serving import registry
from offsite.emulator.arch import blocks_of
from offsite.protocol.adapter import save_update

REPO = Path(__file__).resolve().parents[1]
JOBS = ("blocks-a", "blocks-b", "lora-a", "lora-b")


@dataclass
class Outcome:
    latency: float
    ttft: float | None
    tokens: int
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


# ---------------------------------------------------------------- the servers


def extract_before(commit: str, root: Path) -> Path:
    """``cloud/serving`` at ``commit`` as the package ``offsite_serving_before`` under ``root``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "cloud/serving"], check=True, capture_output=True
    ).stdout
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        with tarfile.open(fileobj=handle) as tar:
            tar.extractall(root, filter="data")
    (root / "cloud" / "serving").rename(root / "offsite_serving_before")
    return root


def tiny_model(root: Path) -> Path:
    """SmolLM2-135M's architecture and tokenizer, shrunk to 4 blocks of width 64 and randomly
    initialised: a model whose forward costs little, so that the servers' own overhead shows."""
    source = resolve_model_dir("smollm2-135m")
    config = AutoConfig.from_pretrained(source)
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        }
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    AutoTokenizer.from_pretrained(source).save_pretrained(root)
    return root


def make_registry(model_source: str, registry_dir: Path) -> None:
    """Four stand-in jobs: two whole-block adapters, two LoRA (the first two and the last two blocks)."""
    base, _, _ = load_base(model_source)
    n = len(blocks_of(base))
    blocks = [0, 1, n - 2, n - 1]
    adapters = random_adapters(base, 2, "blocks", blocks, seed=1) + random_adapters(base, 2, "lora", blocks, seed=2)
    for name, (tensors, alpha) in zip(JOBS, adapters):
        path = save_update(
            registry_dir.parent / f"{name}.safetensors",
            tensors,
            {"mode": "lora" if alpha else "blocks", "lora_alpha": alpha},
        )
        registry.add(registry_dir, name, path, base=base)


def serve(which: str, before_root: str, model_source: str, registry_dir: str, threads: int) -> None:
    """Run one server (``before`` or ``after``) until SIGTERM; print its port."""
    torch.set_num_threads(threads)
    if which == "before":
        sys.path.insert(0, before_root)
        package = "offsite_serving_before"
    else:
        package = "offsite.cloud.serving"
    service_module, server_module = (
        importlib.import_module(package + ".service"),
        importlib.import_module(package + ".server"),
    )
    model, tokenizer, _ = load_base(model_source)
    config = service_module.ServeConfig(
        registry=Path(registry_dir), max_batch=32, max_context=512, default_max_tokens=32, max_queue=512
    )
    servers = server_module.start(service_module.ServingService(model, tokenizer, config), "127.0.0.1", 0, None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"port {servers.http.port}", flush=True)
    stop.wait()
    servers.stop()


class Server:
    """A server process (``before`` or ``after``) on a free port."""

    def __init__(self, which: str, before_root: Path, args, registry_dir: Path, log: Path) -> None:
        command = [sys.executable, __file__, "--serve", which, str(before_root), args.model, str(registry_dir), "1"]
        self.which, self.log = which, log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            lines = [line for line in log.read_text().splitlines() if line.startswith("port ")]
            if lines:
                self.url = f"http://127.0.0.1:{int(lines[0].split()[1])}/v1"
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"the {which} server exited:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"the {which} server did not start")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user + system, all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---------------------------------------------------------------- the clients


def request_body(rng: random.Random, index: int, n: int) -> tuple[bool, dict]:
    model = JOBS[(index + n) % len(JOBS)]
    body = {
        "model": model,
        "max_tokens": rng.randint(8, 32),
        "temperature": 0.8,
        "seed": rng.randrange(1 << 30),
        "stream_options": {"include_usage": True},
    }
    if n % 2 == 0:
        return True, body | {
            "messages": [{"role": "user", "content": f"Tell me about item {index}.{n} in a few words."}]
        }
    return False, body | {"prompt": "Once upon a time " + "there was a story " * rng.randint(0, 6)}


def stream_once(client, chat: bool, body: dict) -> Outcome:
    """One streamed request through the client's streaming response (it shows the raw events)."""
    create = (
        client.chat.completions.with_streaming_response.create
        if chat
        else client.completions.with_streaming_response.create
    )
    start, first, tokens, done, finish = time.perf_counter(), None, 0, False, None
    try:
        with create(stream=True, **body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return Outcome(time.perf_counter() - start, None, 0, f"error event: {event['error']}")
                tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
                for choice in event.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    if first is None and ((choice.get("delta") or {}).get("content") or choice.get("text")):
                        first = time.perf_counter()
    except (openai.OpenAIError, OSError, ValueError) as error:
        return Outcome(time.perf_counter() - start, None, 0, f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - start
    if not done or finish not in ("stop", "length"):
        return Outcome(latency, None, tokens, f"incomplete stream (done={done}, finish_reason={finish})")
    return Outcome(latency, None if first is None else first - start, tokens)


def run_clients(
    url: str, clients: int, per_client: int | None = None, seconds: float | None = None, seed: int = 0
) -> tuple[list[Outcome], float]:
    """``clients`` threads, each with its own ``openai`` client: ``per_client`` requests each, or
    as many as fit in ``seconds``. Returns every outcome and the wall time."""
    outcomes: list[list[Outcome]] = [[] for _ in range(clients)]
    start = time.perf_counter()
    stop_at = None if seconds is None else start + seconds

    def client(index: int) -> None:
        own = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=300)
        rng = random.Random(seed * 1000 + index)
        n = 0
        while (per_client is None or n < per_client) and (stop_at is None or time.perf_counter() < stop_at):
            outcomes[index].append(stream_once(own, *request_body(rng, index, n)))
            n += 1
        own.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for own in outcomes for o in own], time.perf_counter() - start


def summary(outcomes: list[Outcome], wall: float, cpu: float) -> dict:
    """The figures of one phase; ``cpu``: the server's CPU seconds over it."""
    ok = [o for o in outcomes if o.error is None]
    return {
        "server_cpu_s": cpu, "server_cpu_ms_per_request": 1e3 * cpu / max(1, len(ok)),
        "requests": len(outcomes), "errors": len(outcomes) - len(ok), "tokens": sum(o.tokens for o in ok),
        "wall_s": wall,
        "tok_s": sum(o.tokens for o in ok) / wall, "req_s": len(ok) / wall,
        "p50_s": percentile([o.latency for o in ok], 50), "p99_s": percentile([o.latency for o in ok], 99),
        "ttft_p50_s": percentile([o.ttft for o in ok if o.ttft is not None], 50),
        "ttft_p99_s": percentile([o.ttft for o in ok if o.ttft is not None], 99),
        "first_errors": [o.error for o in outcomes if o.error][:3],
    }  # fmt: skip


def measured(server: Server, **kwargs) -> dict:
    """:func:`run_clients` against ``server``, summarised with the server's CPU time."""
    cpu = server.cpu_seconds()
    outcomes, wall = run_clients(server.url, **kwargs)
    return summary(outcomes, wall, server.cpu_seconds() - cpu)


def describe(label: str, s: dict) -> str:
    return (
        f"  {label:28s} {s['requests']:5d} streams, {s['errors']} errors, "
        f"{s['tokens']:6d} tokens in {s['wall_s']:6.1f} s: "
        f"{s['tok_s']:6.1f} tok/s, {s['req_s']:5.2f} req/s; latency p50 {s['p50_s']:.2f} s p99 {s['p99_s']:.2f} s; "
        f"first token p50 {s['ttft_p50_s']:.2f} s p99 {s['ttft_p99_s']:.2f} s; server CPU {s['server_cpu_s']:.1f} s "
        f"({s['server_cpu_ms_per_request']:.1f} ms/request)"
    )


def load_with_rss(server: Server, clients: int, seconds: float, warm_up: float) -> tuple[dict, list[float]]:
    """The load phase, sampling the server's RSS every second from the end of the warm-up."""
    rss: list[float] = []
    finished = threading.Event()

    def sample() -> None:
        time.sleep(warm_up)
        while not finished.is_set():
            rss.append(server.rss_mib())
            finished.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = measured(server, clients=clients, seconds=seconds, seed=7)
    finished.set()
    sampler.join()
    return result, rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serving.py http", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="a base model; 'tiny': SmolLM2's shape shrunk, random (the servers' overhead)",
    )
    parser.add_argument("--before", default="11e903a", help="the commit whose cloud/serving is the old server")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=4, help="requests per client in the same-batch comparison")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternations of the same batch (old, new, old, new, ...)"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the load phase")
    parser.add_argument(
        "--warm-up", type=float, default=10.0, help="RSS is watched from this many seconds into the load"
    )
    parser.add_argument("--load", choices=("both", "after"), default="both", help="which servers get the load phase")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="offsite-bench-http-"))
    if args.model == "tiny":
        args.model = str(tiny_model(work / "tiny-model"))
    make_registry(args.model, work / "registry")
    before_root = extract_before(args.before, work / "before")
    servers = {
        which: Server(which, before_root, args, work / "registry", work / f"{which}.log")
        for which in ("before", "after")
    }
    results: dict = {"batch": {"before": [], "after": []}, "load": {}}
    try:
        print(
            f"{args.model}; four jobs (2 whole-block, 2 LoRA); one torch thread per server; openai client, streaming, "
            f"temperature 0.8, 8-32 new tokens, chat and completions alternating",
            flush=True,
        )
        print(
            f"same batch: {args.clients} clients x {args.per_client} requests, {args.rounds} rounds "
            f"(before = {args.before}, stdlib; after = FastAPI/uvicorn)",
            flush=True,
        )
        for round_index in range(args.rounds):
            for which in ("before", "after"):
                result = measured(servers[which], clients=args.clients, per_client=args.per_client, seed=round_index)
                results["batch"][which].append(result)
                print(describe(f"round {round_index + 1} {which}", result), flush=True)
        for which in ("before", "after") if args.load == "both" else ("after",):
            result, rss = load_with_rss(servers[which], args.clients, args.seconds, args.warm_up)
            results["load"][which] = result | {"rss_mib": rss}
            print(f"load: {args.clients} clients for {args.seconds:g} s on {which}", flush=True)
            print(describe(which, result), flush=True)
            half = rss[len(rss) // 2]
            print(
                f"    RSS after {args.warm_up:g} s warm-up: {rss[0]:.0f} -> {rss[-1]:.0f} MiB (max {max(rss):.0f}, "
                f"{rss[-1] - rss[0]:+.1f} MiB; second half {rss[-1] - half:+.1f} MiB); "
                f"first errors {result['first_errors']}",
                flush=True,
            )
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)  # the old server's code, the registry, the tiny model
    for which in ("before", "after"):
        rows = results["batch"][which]
        print(
            f"same batch, {which}: tok/s "
            + " ".join(f"{r['tok_s']:.1f}" for r in rows)
            + "; p50 "
            + " ".join(f"{r['p50_s']:.2f}" for r in rows)
            + "; p99 "
            + " ".join(f"{r['p99_s']:.2f}" for r in rows)
            + "; server CPU ms/request "
            + " ".join(f"{r['server_cpu_ms_per_request']:.1f}" for r in rows)
            + f"; errors {sum(r['errors'] for r in rows)}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = sum(r["errors"] for rows in results["batch"].values() for r in rows) + sum(
        r["errors"] for r in results["load"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(*sys.argv[2:6], int(sys.argv[6]))
    else:
        sys.exit(main())
