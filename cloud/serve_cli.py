"""``offsite cloud serve`` (the query server) and ``offsite query`` (try a served model from a terminal)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from .models import DEFAULT_MODEL, load_base
from .presets import check_gain
from .serving import registry
from .serving.client import GrpcClient, HttpClient, Query, QueryError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "float64")


def register(commands) -> None:
    """Add ``serve`` to the ``offsite cloud`` subcommands."""
    serve = commands.add_parser(
        "serve",
        help="serve the base model and every registered job's adapter (OpenAI-compatible HTTP + gRPC)",
        description="Load the base model once and the adapters of finished jobs from a registry directory; serve them "
        "side by side, batching requests for different jobs into shared forward passes. HTTP (OpenAI-compatible, "
        "docs at /docs): /v1/completions, /v1/chat/completions, /v1/models (model 'base' is the bare base model), "
        "/metrics, /health (liveness), /ready (readiness) and the admin API under /admin/models; gRPC: "
        "protocol/serving.proto and grpc.health.v1. Base models of the llama family only "
        "(llama, mistral, qwen2, qwen3).",
    )
    _add_model_arguments(serve)
    _add_network_arguments(serve)
    _add_limit_arguments(serve)
    _add_runtime_arguments(serve)
    serve.set_defaults(func=_serve)


def _add_model_arguments(serve: argparse.ArgumentParser) -> None:
    """The registry, the base model and the jobs to register first."""
    serve.add_argument(
        "--registry",
        required=True,
        type=Path,
        help="registry directory: REGISTRY/<job>/{adapter.safetensors,meta.json} (created if missing)",
    )
    serve.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"base model: {DEFAULT_MODEL}, a local HF directory or a .gguf file (default {DEFAULT_MODEL})",
    )
    serve.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="register a finished job directory (or an adapter update file) as NAME before serving; repeatable",
    )
    serve.add_argument("--replace", action="store_true", help="--add replaces a job of the same name")
    serve.add_argument(
        "--plugin-gain",
        type=float,
        default=None,
        metavar="G",
        help="serve the --add jobs at plug-in gain G (real + G x (tuned - real); the recipe's, e.g. 1.5 for "
        "smollm2-135m/q34g16). Default: each source's own (a job directory's job.json, else the update "
        "file's metadata, else 1)",
    )


def _add_network_arguments(serve: argparse.ArgumentParser) -> None:
    """Addresses and credentials."""
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port; default 8000)")
    serve.add_argument(
        "--grpc-port", type=int, default=50051, help="gRPC port (0: any free port; -1: no gRPC; default 50051)"
    )
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the admin API's bearer token (else $OFFSITE_ADMIN_TOKEN; neither: admin API off)",
    )
    serve.add_argument(
        "--api-keys-file",
        type=Path,
        help="file of inference API keys, one a line (else $OFFSITE_API_KEYS, comma-separated; neither: open)",
    )


def _add_limit_arguments(serve: argparse.ArgumentParser) -> None:
    """Batch, context, queue and connection limits, and timeouts."""
    serve.add_argument(
        "--max-batch", type=int, default=32, help="most requests decoded together (KV-cache slots; default 32)"
    )
    serve.add_argument(
        "--max-context",
        type=int,
        default=2048,
        help="context limit per request, prompt + completion (default 2048, capped by the model's)",
    )
    serve.add_argument(
        "--max-tokens", type=int, default=256, help="completion length when a request does not say (default 256)"
    )
    serve.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting for a slot before new ones get 429 (default 256)"
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=256,
        metavar="N",
        help="at most N HTTP connections open at once, one thread each (one more is answered 503 and closed), "
        "and N gRPC calls in flight (one more gets RESOURCE_EXHAUSTED); default 256",
    )
    serve.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="close a connection whose client sends nothing for S seconds: an idle keep-alive, a stalled "
        "request or body (default 60)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM/SIGINT: stop taking requests, give running ones S seconds to finish (default 30)",
    )


def _add_runtime_arguments(serve: argparse.ArgumentParser) -> None:
    """TLS, logging, dtype and threads."""
    serve.add_argument(
        "--certfile", type=Path, help="PEM certificate (chain): serve HTTPS and gRPC over TLS (with --keyfile)"
    )
    serve.add_argument("--keyfile", type=Path, help="PEM private key of --certfile")
    serve.add_argument("--no-access-log", action="store_true", help="do not log one line per HTTP request")
    serve.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def register_query(subparsers) -> None:
    """Add ``offsite query``."""
    query = subparsers.add_parser(
        "query",
        help="ask a served model (offsite cloud serve) and stream the answer to the terminal",
        description="Send PROMPT to a job's model (or 'base') on a running `offsite cloud serve` and print the "
        "answer as it is decoded. Without PROMPT: read it from standard input, or, on a terminal, chat line by line.",
    )
    query.add_argument("prompt", nargs="?", help="the question (default: standard input)")
    query.add_argument("-m", "--model", default="base", help="a job's name, or 'base' (default)")
    query.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the server's HTTP address (default http://127.0.0.1:8000)"
    )
    query.add_argument("--grpc", metavar="HOST:PORT", help="use the gRPC service at HOST:PORT instead of HTTP")
    query.add_argument(
        "--raw", action="store_true", help="send PROMPT as raw text (/v1/completions), not as a chat message"
    )
    query.add_argument("--system", help="a system message (chat only)")
    query.add_argument("--max-tokens", type=int, default=None, help="completion length (default: the server's)")
    query.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    query.add_argument("--top-p", type=float, default=None)
    query.add_argument("--seed", type=int, default=None)
    query.add_argument("--list", action="store_true", help="list the served models and exit")
    query.add_argument("--api-key", default=None, help="inference API key (default $OFFSITE_API_KEY)")
    query.add_argument(
        "--cafile",
        type=Path,
        default=None,
        help="CA certificate to trust for an https:// --url or a TLS --grpc server (default: the system's for https, "
        "plain gRPC without it)",
    )
    query.set_defaults(func=_query)


# ---------------------------------------------------------------- serve


def _secret_file(path: Path | None, env: str) -> str | None:
    if path is not None:
        try:
            value = path.read_text().strip()
        except OSError as error:
            raise FileNotFoundError(f"{path}: cannot read ({error.strerror})") from None
        if not value:
            raise ValueError(f"{path}: empty")
        return value
    return os.environ.get(env) or None


def api_keys(path: Path | None) -> frozenset[str]:
    text = _secret_file(path, "OFFSITE_API_KEYS")
    if text is None:
        return frozenset()
    parts = text.splitlines() if path is not None else text.split(",")
    return frozenset(p.strip() for p in parts if p.strip() and not p.strip().startswith("#"))


def _serve(args: argparse.Namespace) -> int:
    # the HTTP/gRPC server stack (fastapi, uvicorn, pydantic) loads only for `offsite cloud serve`
    from .serving import server
    from .serving.http_server import TlsFiles
    from .serving.service import ServingService

    if args.threads:
        torch.set_num_threads(args.threads)
    adds = _parse_adds(args.add)
    if (args.certfile is None) != (args.keyfile is None):
        raise ValueError("--certfile and --keyfile go together")
    tls = TlsFiles(args.certfile, args.keyfile) if args.certfile else None
    _check_plugin_gain(args.plugin_gain, adds)
    config = _serve_config(args)
    model, tokenizer, where = load_base(args.model, dtype=getattr(torch, args.dtype))
    for name, path in adds:
        registry.add(args.registry, name, path, base=model, replace=args.replace, plugin_gain=args.plugin_gain)
        print(f"registered {name} from {path}")
    service = ServingService(model, tokenizer, config)
    servers = server.start(
        service,
        args.host,
        args.port,
        None if args.grpc_port < 0 else args.grpc_port,
        tls=tls,
        access_log=not args.no_access_log,
    )
    _print_serving(service, servers, where, tls is not None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print(f"stopping: running requests get {config.shutdown_timeout:g} s to finish", flush=True)
    servers.stop()
    print("stopped", flush=True)
    return 0


def _parse_adds(items: list[str]) -> list[tuple[str, Path]]:
    """``--add NAME=PATH`` arguments as (name, path)."""
    adds = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--add {item!r}: use NAME=PATH")
        adds.append((registry.check_name(name), Path(path)))
    return adds


def _check_plugin_gain(gain: float | None, adds: list[tuple[str, Path]]) -> None:
    """``--plugin-gain``, checked before the base model loads."""
    if gain is None:
        return
    try:
        check_gain(gain)
    except ValueError as error:
        raise ValueError(f"--plugin-gain: {error}") from None
    if not adds:
        raise ValueError("--plugin-gain applies to --add jobs; there are none")


def _serve_config(args: argparse.Namespace):
    """The ServeConfig of ``offsite cloud serve``'s arguments (its secrets read from their files or environment)."""
    from .serving.service import ServeConfig  # with the server stack: see _serve

    return ServeConfig(
        registry=args.registry,
        base_name=str(args.model),
        max_batch=args.max_batch,
        max_context=args.max_context,
        default_max_tokens=args.max_tokens,
        max_queue=args.max_queue,
        api_keys=api_keys(args.api_keys_file),
        admin_token=_secret_file(args.admin_token_file, "OFFSITE_ADMIN_TOKEN"),
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout,
        shutdown_timeout=args.shutdown_timeout,
    )


def _print_serving(service, servers, where: str, tls: bool) -> None:
    """What is served where, and with which limits."""
    config = service.config
    jobs = service.jobs()
    print(f"serving {where} as 'base' and {len(jobs)} job(s): {', '.join(sorted(jobs)) or '-'}", flush=True)
    print(
        f"http: {servers.http_url}  (OpenAI API: {servers.http_url}/v1, docs: {servers.http_url}/docs, "
        f"metrics: {servers.http_url}/metrics)",
        flush=True,
    )
    if servers.grpc:
        print(f"grpc: {servers.grpc_target}{' (TLS)' if tls else ''}", flush=True)
    print(
        f"admin API: {'on' if config.admin_token else 'off'}; API keys: {len(config.api_keys) or 'off'}; "
        f"context {service.context_length} tokens, batch {config.max_batch}; "
        f"at most {config.max_connections} connections, "
        f"idle ones closed after {config.idle_timeout:g} s",
        flush=True,
    )


# ---------------------------------------------------------------- query


def _query(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("OFFSITE_API_KEY")
    client = (
        GrpcClient(args.grpc, api_key, cafile=args.cafile)
        if args.grpc
        else HttpClient(args.url, api_key, cafile=args.cafile)
    )
    try:
        if args.list:
            for model in client.models():
                blocks = ",".join(str(i) for i in model["adapter_blocks"]) or "-"
                print(f"{model['id']:32s} {model['kind']:7s} blocks {blocks:16s} context {model['context_length']}")
            return 0
        history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
        interactive = args.prompt is None and sys.stdin.isatty()
        prompts = (
            iter([args.prompt]) if args.prompt is not None else (_lines() if interactive else iter([sys.stdin.read()]))
        )
        for prompt in prompts:
            query = Query(
                args.model, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
            )
            if args.raw:
                query.prompt = prompt
            else:
                query.messages = history + [{"role": "user", "content": prompt}]
            answer = []
            for piece in client.stream(query):
                answer.append(piece)
                print(piece, end="", flush=True)
            print()
            if interactive and not args.raw:
                history = query.messages + [{"role": "assistant", "content": "".join(answer)}]
        return 0
    except QueryError as error:
        print(f"offsite: error: {error}", file=sys.stderr)
        return 1


def _lines():
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip():
            yield line
