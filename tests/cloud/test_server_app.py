"""The coordinator's reading of error replies: a node that never answered is dropped, not failed,
and a reason is prefixed with its code's name exactly once."""

from __future__ import annotations

from flwr.common.constant import ErrorCode as FlowerErrorCode

from offsite.cloud.server_app import NO_REPLY_CODES, error_text
from offsite.protocol.messages import ErrorCode


def test_our_codes_are_named_once():
    reason = "DATA_FORMAT: /d/owner.jsonl:3: not valid JSON"  # as the ClientApp sends it
    assert error_text(ErrorCode.DATA_FORMAT, reason) == reason
    assert error_text(ErrorCode.TRAIN_FAILED, "round 2: boom") == "TRAIN_FAILED: round 2: boom"


def test_superlink_written_errors_mean_no_reply():
    assert set(NO_REPLY_CODES) == {
        FlowerErrorCode.MESSAGE_UNAVAILABLE, FlowerErrorCode.REPLY_MESSAGE_UNAVAILABLE, FlowerErrorCode.NODE_UNAVAILABLE
    }
    assert not set(NO_REPLY_CODES) & {int(code) for code in ErrorCode}
    assert error_text(FlowerErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable") == "NODE_UNAVAILABLE: Error: Node Unavailable"
    assert error_text(FlowerErrorCode.CLIENT_APP_CRASHED, "killed") == "flower-8: killed"
