"""The operator's Flower ServerApp (Message API): rounds of offsite-tuning over the SuperNodes.

The run config (``flwr run -c "job-dir='/abs/path'"``) names a job directory prepared by the
operator (``job.json`` + ``bundle/``; see :mod:`offsite.cloud.fed_job`). Each round:

1. wait until ``min_nodes`` SuperNodes are connected (at most ``node_wait_timeout`` s);
2. send the bundle, in parts, to every node not yet known to hold it (once per job and node);
3. send ``train`` with the global adapter to every node holding the bundle; wait at most
   ``round_timeout`` s; log who replied, who failed (with the reason) and who dropped;
4. check each update against the global adapter (keys, shapes, finite values), aggregate with
   :mod:`offsite.cloud.aggregate` weighted by ``num-examples``;
5. checkpoint the new global adapter and ``state.json``.

A restarted ServerApp reads ``state.json`` and resumes after the last completed round.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode as FlowerErrorCode
from flwr.serverapp import Grid, ServerApp

from offsite.protocol.bundle import Bundle, load_emulator, read_bundle
from offsite.protocol.messages import (
    ADAPTER,
    BUNDLE_PART,
    BUNDLE_STATUS,
    CONFIG,
    METRICS,
    TRAIN,
    ErrorCode,
    TrainInstruction,
    bundle_part_to_content,
    plan_bundle_parts,
    read_bundle_part,
)
from offsite.protocol.records import RecordError, state_from_record, state_to_record

from .aggregate import aggregate
from .fed_job import (
    BUNDLE_DIR,
    FedJobConfig,
    JobError,
    JobState,
    load_checkpoint,
    load_state,
    read_job,
    record_client_update,
    save_checkpoint,
)

log = logging.getLogger("flwr").getChild("offsite")  # flwr's handlers reach `flwr log` / --stream

app = ServerApp()


class RoundFailed(RuntimeError):
    """Too few usable replies to complete a round."""


# Error replies the SuperLink writes itself when a node never answered (Flower's codes, below 100):
# the node dropped out of the round, it did not fail at something.
NO_REPLY_CODES = {
    FlowerErrorCode.MESSAGE_UNAVAILABLE: "MESSAGE_UNAVAILABLE",  # the instruction expired (TTL) unanswered
    FlowerErrorCode.REPLY_MESSAGE_UNAVAILABLE: "REPLY_MESSAGE_UNAVAILABLE",  # the reply expired before it was pulled
    FlowerErrorCode.NODE_UNAVAILABLE: "NODE_UNAVAILABLE",  # the node missed its heartbeats: offline
}


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return NO_REPLY_CODES.get(code, f"flower-{code}")


def error_text(code: int, reason: str) -> str:
    """``NAME: reason``, once (our ClientApp already starts its reasons with the code's name)."""
    name = error_name(code)
    return reason if reason.startswith(f"{name}:") else f"{name}: {reason}"


# ---------------------------------------------------------------- setup


def initial_adapter(bundle: Bundle) -> dict[str, torch.Tensor]:
    """The adapter blocks exactly as the bundle ships them."""
    from offsite.emulator.sandwich import adapter_state_dict

    emulator = load_emulator(bundle)
    return adapter_state_dict(emulator, bundle.layout, bundle.adapter_blocks)


def open_job(job_dir: Path) -> tuple[FedJobConfig, Bundle, JobState, dict[str, torch.Tensor]]:
    """Read the job, verify its bundle and return the state to resume from (round 0 if new)."""
    config = read_job(job_dir)
    bundle = read_bundle(job_dir / BUNDLE_DIR)
    state = load_state(job_dir)
    if state is None:
        state = JobState(bundle=bundle.digest)
        adapter = initial_adapter(bundle)
        save_checkpoint(job_dir, state, 0, adapter, None)
        return config, bundle, state, adapter
    if state.bundle != bundle.digest:
        raise JobError(f"{job_dir}/state.json belongs to bundle {state.bundle[:12]}, the job's bundle is {bundle.digest[:12]}")
    return config, bundle, state, load_checkpoint(job_dir, state)


class WaitClock:
    """Seconds a round spends waiting on the nodes: for them to connect and for their replies (the
    pull loops). The rest of a round is the coordinator's own work."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def waiting(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise RoundFailed(f"only {len(nodes)} SuperNodes connected after {timeout:.0f}s, need {minimum}")
        time.sleep(1.0)


def exchange(
    grid: Grid, messages: list[Message], timeout: float, poll: float = 0.5, clock: WaitClock | None = None
) -> tuple[list[tuple[int, Message]], list[int]]:
    """Push ``messages`` and pull replies until all are in or ``timeout`` s pass.

    Returns ``(destination node, reply)`` pairs, attributed by the id of the message replied to
    (an error reply the SuperLink makes itself, e.g. for an expired TTL, does not come from the
    node), and the destination of every message left unanswered. The pull loop's time is added
    to ``clock``, when given.
    """
    destinations = [message.metadata.dst_node_id for message in messages]
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages):  # flwr logs "payload too large" and returns []
        raise RoundFailed(f"the SuperLink accepted {len(ids)} of {len(messages)} messages (payload too large?)")
    unsent = [node for message_id, node in zip(ids, destinations) if message_id is None]
    if unsent:
        log.warning("messages to node(s) %s could not be pushed to the SuperLink", unsent)
    node_of = {message_id: node for message_id, node in zip(ids, destinations) if message_id is not None}
    waiting = set(node_of)
    replies: list[tuple[int, Message]] = []
    deadline = time.monotonic() + timeout
    with (clock or WaitClock()).waiting():
        while waiting and time.monotonic() < deadline:
            for reply in grid.pull_messages(list(waiting)):
                replied_to = reply.metadata.reply_to_message_id
                if replied_to in waiting:
                    waiting.discard(replied_to)
                    replies.append((node_of[replied_to], reply))
            if waiting:
                time.sleep(poll)
    return replies, sorted([node_of[i] for i in waiting] + unsent)


# ---------------------------------------------------------------- bundle distribution


def distribute_bundle(
    grid: Grid, bundle: Bundle, nodes: list[int], part_bytes: int, timeout: float, clock: WaitClock | None = None
) -> set[int]:
    """Send every part of the bundle to each node; return the nodes that installed it (or had it)."""
    if not nodes:
        return set()
    files = {name: meta["bytes"] for name, meta in bundle.manifest["files"].items()}
    files["manifest.json"] = (bundle.root / "manifest.json").stat().st_size
    plan = plan_bundle_parts(files, part_bytes)
    log.info("bundle %s: %d bytes in %d part(s) to nodes %s", bundle.digest[:12], sum(files.values()), len(plan), nodes)
    messages = []
    for index in range(len(plan)):
        content = bundle_part_to_content(read_bundle_part(bundle.root, bundle.digest, plan, index))
        for node in nodes:
            messages.append(
                Message(content, dst_node_id=node, message_type=BUNDLE_PART, group_id=f"bundle-{bundle.digest[:12]}", ttl=timeout)
            )
    replies, _ = exchange(grid, messages, timeout, clock=clock)
    statuses: dict[int, list[str]] = {node: [] for node in nodes}
    for node, reply in replies:
        if reply.has_error():
            log.warning("node %d: bundle part refused: %s", node, reply.error.reason)
            statuses[node].append("error")
        else:
            statuses[node].append(str(reply.content.config_records[BUNDLE_STATUS]["status"]))
    ready = set()
    for node, got in statuses.items():
        if any(status in ("installed", "cached") for status in got) and "error" not in got:
            ready.add(node)
        else:
            log.warning("node %d: bundle not installed (replies: %s of %d parts)", node, got or "none", len(plan))
    return ready


# ---------------------------------------------------------------- one round


def check_update(node: int, update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update cast to the global adapter's dtypes, or ValueError naming node and tensor."""
    if set(update) != set(reference):
        extra, missing = sorted(set(update) - set(reference)), sorted(set(reference) - set(update))
        raise ValueError(f"node {node}: unexpected tensors {extra[:3]}, missing {missing[:3]}")
    checked = {}
    for key, like in reference.items():
        tensor = update[key]
        if tuple(tensor.shape) != tuple(like.shape):
            raise ValueError(f"node {node}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}")
        if not tensor.dtype.is_floating_point or not torch.isfinite(tensor).all():
            raise ValueError(f"node {node}: tensor {key!r} is not finite floating point")
        checked[key] = tensor.to(like.dtype)
    return checked


def run_round(
    grid: Grid, job_dir: Path, config: FedJobConfig, bundle: Bundle, state: JobState, round_number: int, global_adapter: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """One round; returns the new global adapter and the round's record for ``state.json``.

    Timings in the record: ``seconds`` (the round, checkpoint excluded), ``wait_seconds`` (waiting
    for nodes to connect and reply), ``coordinator_seconds`` (the difference: reading and sending
    the bundle, building and pushing the train messages, checking and aggregating the updates),
    ``aggregate_seconds`` (decoding, checking and aggregating the updates), and per node
    ``client_train_seconds`` (the local tuning loop) and ``client_seconds`` (the whole ClientApp
    handler), as the clients report them. :func:`~offsite.cloud.fed_job.save_checkpoint` adds
    ``checkpoint_seconds``.
    """
    started, clock = time.perf_counter(), WaitClock()
    with clock.waiting():
        nodes = wait_for_nodes(grid, config.min_nodes, config.node_wait_timeout)
    fresh = [node for node in nodes if node not in state.nodes_with_bundle]
    installed = distribute_bundle(grid, bundle, fresh, config.bundle_part_bytes, config.bundle_timeout, clock)
    state.nodes_with_bundle = sorted(set(state.nodes_with_bundle) | installed)
    ready = [node for node in nodes if node in state.nodes_with_bundle]
    tuning = config.tuning
    instruction = TrainInstruction(
        round=round_number,
        bundle_digest=bundle.digest,
        lr=config.round_lr(round_number),
        steps=tuning.steps,
        batch_size=tuning.batch_size,
        warmup_steps=tuning.warmup_steps,
        schedule=tuning.schedule,
        max_length=tuning.max_length,
        max_grad_norm=tuning.max_grad_norm,
        seed=tuning.seed + round_number,
    )
    content = RecordDict({ADAPTER: state_to_record(global_adapter), CONFIG: instruction.to_record()})
    messages = [
        Message(content, dst_node_id=node, message_type=TRAIN, group_id=str(round_number), ttl=config.round_timeout)
        for node in ready
    ]
    log.info("round %d: train on %d node(s) %s (%d connected)", round_number, len(ready), ready, len(nodes))
    replies, unanswered = exchange(grid, messages, config.round_timeout, clock=clock)

    aggregating = time.perf_counter()
    updates, failed, metrics = {}, {}, {}
    no_reply = {node: f"no reply within {config.round_timeout:.0f}s" for node in unanswered}
    for node, reply in replies:
        if reply.has_error() and reply.error.code in NO_REPLY_CODES:
            no_reply[node] = f"the SuperLink answered for it: {error_text(reply.error.code, reply.error.reason)}"
            continue
        if reply.has_error():
            failed[node] = error_text(reply.error.code, reply.error.reason)
            if reply.error.code == ErrorCode.BUNDLE_MISSING:
                state.nodes_with_bundle = [n for n in state.nodes_with_bundle if n != node]
            continue
        try:
            record = reply.content.array_records[ADAPTER]
            node_metrics = dict(reply.content.metric_records[METRICS])
            num_examples = node_metrics.get("num-examples")
            if not isinstance(num_examples, (int, float)) or not math.isfinite(num_examples) or num_examples <= 0:
                raise ValueError(f"node {node}: num-examples {num_examples!r} is not a positive number")
            updates[node] = (check_update(node, state_from_record(record), global_adapter), float(num_examples))
            metrics[node] = node_metrics
        except (KeyError, ValueError, RecordError) as error:
            failed[node] = f"INVALID_UPDATE: {error}"
    dropped = sorted(no_reply)
    for node, reason in sorted(failed.items()):
        log.warning("round %d: node %d failed: %s", round_number, node, reason)
    for node in dropped:
        log.warning("round %d: node %d dropped: %s", round_number, node, no_reply[node])
    log.info("round %d: replies from %s", round_number, sorted(updates))
    if len(updates) < config.min_replies:
        raise RoundFailed(f"round {round_number}: {len(updates)} usable replies, need {config.min_replies} (failed: {failed}, dropped: {dropped})")

    ordered = sorted(updates)
    new_global = aggregate(config.aggregator, [updates[node] for node in ordered], config.trim_fraction)
    aggregate_seconds = time.perf_counter() - aggregating
    if config.record_updates:
        for node in ordered:
            record_client_update(job_dir, round_number, node, updates[node][0], int(updates[node][1]), bundle.digest)
    losses = {str(n): metrics[n].get("train-loss") for n in ordered}
    weights = {str(n): updates[n][1] for n in ordered}
    elapsed = time.perf_counter() - started
    history = {
        "round": round_number,
        "lr": instruction.lr,
        "connected": nodes,
        "sent": ready,
        "replied": ordered,
        "failed": {str(n): reason for n, reason in failed.items()},
        "dropped": dropped,
        "dropped_reasons": {str(n): no_reply[n] for n in dropped},
        "num_examples": weights,
        "train_loss": losses,
        "mean_train_loss": sum(losses[str(n)] * updates[n][1] for n in ordered) / sum(weights.values()),
        "client_train_seconds": {str(n): metrics[n].get("seconds") for n in ordered},
        "client_seconds": {str(n): metrics[n].get("client-seconds") for n in ordered},
        "seconds": round(elapsed, 2),
        "wait_seconds": round(clock.seconds, 4),
        "coordinator_seconds": round(elapsed - clock.seconds, 4),
        "aggregate_seconds": round(aggregate_seconds, 4),
    }
    log.info("round %d: aggregated %d update(s), weighted train loss %.4f", round_number, len(ordered), history["mean_train_loss"])
    return new_global, history


# ---------------------------------------------------------------- the app


def run_job(grid: Grid, job_dir: Path) -> JobState:
    config, bundle, state, global_adapter = open_job(job_dir)
    if state.completed_round:
        log.info("job %s: resuming after round %d of %d", job_dir, state.completed_round, config.rounds)
    for round_number in range(state.completed_round + 1, config.rounds + 1):
        global_adapter, history = run_round(grid, job_dir, config, bundle, state, round_number, global_adapter)
        save_checkpoint(job_dir, state, round_number, global_adapter, history)
    log.info("job %s: %d round(s) completed; global adapter at %s", job_dir, state.completed_round, job_dir / state.checkpoint)
    if config.base_model is not None:
        from .finish import finish_job

        finish_job(job_dir)
    return state


@app.main()
def main(grid: Grid, context: Context) -> None:
    job_dir = context.run_config.get("job-dir")
    if not isinstance(job_dir, str) or not job_dir:
        raise JobError("run config 'job-dir' is not set: flwr run <app> <connection> -c \"job-dir='/abs/path/to/job'\"")
    run_job(grid, Path(job_dir).expanduser())
