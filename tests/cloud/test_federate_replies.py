"""The coordinator's reading of replies: a node that never answered is dropped, not failed, a
reason is prefixed with its code's name exactly once, and whatever one reply's reading raises
(a crafted envelope header included) is that node's refusal, never the round's end."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode as FlowerErrorCode
from flwr.supercore.task_identity import TaskIdentity

from offsite.cloud.federate.channels import read_envelope_reply
from offsite.cloud.federate.round import NO_REPLY_CODES, RoundReplies, error_text
from offsite.protocol.envelope import Reason, Rejected, UpdateOpener, seal_update
from offsite.protocol.envelope_wire import ENVELOPE, envelope_to_record
from offsite.protocol.keys import ClientIdentity, CoordinatorKeys, SenderRegistry
from offsite.protocol.messages import METRICS, ErrorCode
from offsite.protocol.secagg import SecAggError


def test_our_codes_are_named_once():
    reason = "DATA_FORMAT: /d/owner.jsonl:3: not valid JSON"  # as the ClientApp sends it
    assert error_text(ErrorCode.DATA_FORMAT, reason) == reason
    assert error_text(ErrorCode.TRAIN_FAILED, "round 2: boom") == "TRAIN_FAILED: round 2: boom"


def test_superlink_written_errors_mean_no_reply():
    assert set(NO_REPLY_CODES) == {
        FlowerErrorCode.MESSAGE_UNAVAILABLE,
        FlowerErrorCode.REPLY_MESSAGE_UNAVAILABLE,
        FlowerErrorCode.NODE_UNAVAILABLE,
    }
    assert not set(NO_REPLY_CODES) & {int(code) for code in ErrorCode}
    named = error_text(FlowerErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable")
    assert named == "NODE_UNAVAILABLE: Error: Node Unavailable"
    assert error_text(FlowerErrorCode.CLIENT_APP_CRASHED, "killed") == "flower-8: killed"


# ---------------------------------------------------------------- one bad reply never ends a round


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages made outside a Flower process need the identity Flower's runtime would set."""
    for name in ("_run_id", "_node_id", "_task_id"):
        if hasattr(TaskIdentity, name):
            monkeypatch.setattr(TaskIdentity, name, 1)


def sealed_reply(header: bytes | None = None) -> tuple[Message, UpdateOpener]:
    """A train reply from enrolled alice carrying a real sealed update, its header replaced by
    ``header`` when given (the rest of the frame kept), and the coordinator's opener."""
    keys, alice = CoordinatorKeys.generate(), ClientIdentity.generate("alice")
    registry = SenderRegistry()
    registry.register("alice", alice.public_key)
    reference = {"blocks.0.w": torch.zeros(4, 3), "blocks.5.w": torch.ones(2)}
    update = {key: tensor + 0.01 for key, tensor in reference.items()}
    sealed = seal_update(
        update, job="job-1", round=1, identity=alice, recipient=keys.public(), metadata={"num-examples": 3}
    )
    data = bytes(sealed)
    if header is not None:
        length = int.from_bytes(data[8:12], "big")
        data = data[:8] + len(header).to_bytes(4, "big") + header + data[12 + length :]
    content = RecordDict({ENVELOPE: envelope_to_record(data), METRICS: MetricRecord({"client-seconds": 1.0})})
    opener = UpdateOpener(keys, registry, "job-1", 1, reference)
    return Message(content, dst_node_id=7, message_type="train", group_id="1"), opener


@pytest.mark.parametrize("header", [b"[" * 1500, b"[" * 4096, b'{"a":' * 800, b'{"round":' + b"9" * 4000 + b"}"])
def test_a_parser_bomb_header_is_a_refusal_with_a_reason(header):
    reply, opener = sealed_reply(header)
    with pytest.raises(Rejected) as caught:
        read_envelope_reply(7, reply, opener, dp=False)
    assert caught.value.reason is Reason.MALFORMED_HEADER and "node 7" in str(caught.value)
    outcome = RoundReplies()
    outcome.refuse(7, caught.value)
    assert outcome.rejected == {7: "malformed-header"}
    assert outcome.failed[7].startswith("REJECTED: malformed-header: update from node 7")
    good, opener = sealed_reply()
    tensors, weight, metrics, sender = read_envelope_reply(8, good, opener, dp=False)
    assert sender == "alice" and weight == 3.0 and set(tensors) == {"blocks.0.w", "blocks.5.w"}


def test_any_exception_from_one_reply_is_that_reply_s_failure(caplog):
    """Whatever reading a reply raises (a parser's RecursionError, a bug's TypeError) is recorded
    against that node, named in the log, and leaves the others' updates where they were."""
    caplog.set_level(logging.DEBUG, logger="flwr.offsite")
    outcome = RoundReplies(updates={3: ({}, 1.0)})
    outcome.refuse(4, RecursionError("maximum recursion depth exceeded"))
    outcome.refuse(5, ValueError("node 5: metric 'num-examples' is 'x', not a finite number"))
    outcome.refuse(6, KeyError("adapter"))
    outcome.refuse(9, SecAggError("masked input of node 9: unreadable array"), "SECAGG")
    assert outcome.failed == {
        4: "INVALID_UPDATE: RecursionError: maximum recursion depth exceeded",
        5: "INVALID_UPDATE: node 5: metric 'num-examples' is 'x', not a finite number",
        6: "INVALID_UPDATE: 'adapter'",
        9: "SECAGG: masked input of node 9: unreadable array",
    }
    assert outcome.updates == {3: ({}, 1.0)} and outcome.rejected == {}
    outcome.log(2, [])
    assert "round 2: node 4 failed: INVALID_UPDATE: RecursionError" in caplog.text
