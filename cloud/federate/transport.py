"""Node transport: waiting for SuperNodes, one exchange of messages and their replies, and the
bundle sent in parts. The strategy and the channels reach the nodes only through a
:class:`NodeTransport`, which also clocks the time spent waiting on them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from offsite.protocol.bundle import SIGNATURE, Bundle
from offsite.protocol.messages import (
    BUNDLE_PART,
    BUNDLE_STATUS,
    bundle_part_to_content,
    plan_bundle_parts,
    read_bundle_part,
)

from .round import RoundFailed

log = logging.getLogger("flwr").getChild("offsite")  # flwr's handlers reach `flwr log` / --stream

Replies = tuple[list[tuple[int, Message]], list[int]]  # (destination node, reply), unanswered nodes


class WaitClock:
    """Seconds a round spends waiting on the nodes: for them to connect and for their replies (the
    pull loops). The rest of a round is the coordinator's own work."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started


class NodeTransport:
    """One round's way to the nodes through Flower's ``Grid``, with its :class:`WaitClock`."""

    def __init__(self, grid: Grid, poll: float = 0.5) -> None:
        self.grid = grid
        self.poll = poll
        self.clock = WaitClock()

    def wait_for_nodes(self, minimum: int, timeout: float) -> list[int]:
        """The connected node ids, once there are ``minimum``; :class:`RoundFailed` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self.clock.waiting():
            while True:
                nodes = sorted(self.grid.get_node_ids())
                if len(nodes) >= minimum:
                    return nodes
                if time.monotonic() > deadline:
                    raise RoundFailed(f"only {len(nodes)} SuperNodes connected after {timeout:.0f}s, need {minimum}")
                time.sleep(1.0)

    def send(self, requests: Mapping[int, RecordDict], message_type: str, group_id: str, timeout: float) -> Replies:
        """One message per node (``requests``: node -> content, sent in node order); see :meth:`exchange`."""
        messages = [
            Message(content, dst_node_id=node, message_type=message_type, group_id=group_id, ttl=timeout)
            for node, content in sorted(requests.items())
        ]
        return self.exchange(messages, timeout)

    def exchange(self, messages: list[Message], timeout: float) -> Replies:
        """Push ``messages`` and pull replies until all are in or ``timeout`` s pass.

        Returns ``(destination node, reply)`` pairs, attributed by the id of the message replied to
        (an error reply the SuperLink makes itself, e.g. for an expired TTL, does not come from the
        node), and the destination of every message left unanswered.
        """
        destinations = [message.metadata.dst_node_id for message in messages]
        ids = list(self.grid.push_messages(messages))
        if len(ids) != len(messages):  # flwr logs "payload too large" and returns []
            raise RoundFailed(f"the SuperLink accepted {len(ids)} of {len(messages)} messages (payload too large?)")
        unsent = [node for message_id, node in zip(ids, destinations, strict=True) if message_id is None]
        if unsent:
            log.warning("messages to node(s) %s could not be pushed to the SuperLink", unsent)
        sent = zip(ids, destinations, strict=True)
        node_of = {message_id: node for message_id, node in sent if message_id is not None}
        waiting = set(node_of)
        replies: list[tuple[int, Message]] = []
        deadline = time.monotonic() + timeout
        with self.clock.waiting():
            while waiting and time.monotonic() < deadline:
                for reply in self.grid.pull_messages(list(waiting)):
                    replied_to = reply.metadata.reply_to_message_id
                    if replied_to in waiting:
                        waiting.discard(replied_to)
                        replies.append((node_of[replied_to], reply))
                if waiting:
                    time.sleep(self.poll)
        return replies, sorted([node_of[i] for i in waiting] + unsent)

    def distribute_bundle(self, bundle: Bundle, nodes: list[int], part_bytes: int, timeout: float) -> set[int]:
        """Send every part of the bundle to each node; return the nodes that installed it (or had it)."""
        if not nodes:
            return set()
        files = bundle_files(bundle)
        plan = plan_bundle_parts(files, part_bytes)
        log.info(
            "bundle %s: %d bytes in %d part(s) to nodes %s", bundle.digest[:12], sum(files.values()), len(plan), nodes
        )
        group = f"bundle-{bundle.digest[:12]}"
        messages = []
        for index in range(len(plan)):
            content = bundle_part_to_content(read_bundle_part(bundle.root, bundle.digest, plan, index))
            for node in nodes:
                messages.append(
                    Message(content, dst_node_id=node, message_type=BUNDLE_PART, group_id=group, ttl=timeout)
                )
        replies, _ = self.exchange(messages, timeout)
        return installed_nodes(nodes, replies, len(plan))


def bundle_files(bundle: Bundle) -> dict[str, int]:
    """The bundle's files and their sizes, as they travel: the manifest and, when signed, its signature."""
    files = {name: meta["bytes"] for name, meta in bundle.manifest["files"].items()}
    files["manifest.json"] = (bundle.root / "manifest.json").stat().st_size
    if (bundle.root / SIGNATURE).is_file():  # a data owner with a pinned coordinator key installs only a signed bundle
        files[SIGNATURE] = (bundle.root / SIGNATURE).stat().st_size
    return files


def installed_nodes(nodes: list[int], replies: list[tuple[int, Message]], parts: int) -> set[int]:
    """The nodes whose bundle-part replies say the bundle is installed, with no part refused."""
    statuses: dict[int, list[str]] = {node: [] for node in nodes}
    for node, reply in replies:
        try:
            if reply.has_error():
                log.warning("node %d: bundle part refused: %s", node, str(reply.error.reason)[:300])
                statuses[node].append("error")
            else:
                statuses[node].append(str(reply.content.config_records[BUNDLE_STATUS]["status"])[:40])
        except Exception as error:  # noqa: BLE001 - a malformed status reply: no bundle on this node, the round goes on
            log.warning(
                "node %d: unreadable bundle status reply (%s: %s)", node, type(error).__name__, str(error)[:200]
            )
            statuses[node].append("error")
    ready = set()
    for node, got in statuses.items():
        if any(status in ("installed", "cached") for status in got) and "error" not in got:
            ready.add(node)
        else:
            log.warning("node %d: bundle not installed (replies: %s of %d parts)", node, got or "none", parts)
    return ready
