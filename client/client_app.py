"""The data owner's Flower ClientApp (Message API): three handlers.

- ``query.bundle_part``: store one part of the emulator bundle in the on-disk
  :class:`~offsite.client.bundle_cache.BundleCache` (keyed by digest; Flower starts a fresh
  process for every message, so nothing is kept in memory between them);
- ``query.secagg``: secure aggregation's stages 0, 1 and 3 (:mod:`offsite.client.secagg_session`);
- ``train``: tune the global adapter on local data and reply through the channel the job's modes
  ask for (:mod:`offsite.client.training`, :mod:`offsite.client.channels`).

Where things are on this machine is the SuperNode's ``--node-config``
(:mod:`offsite.client.settings`), never the server's. Every failure becomes an ``Error`` reply with
an :class:`~offsite.protocol.messages.ErrorCode` and a reason naming the bad thing, so one data
owner's broken file never takes the job down. Bundle parts and key exchanges never import torch.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from offsite.protocol.bundle import BundleError
from offsite.protocol.messages import BUNDLE_STATUS, ErrorCode, WireError, bundle_part_from_content
from offsite.protocol.secagg import SecAggError

from .secagg_session import SecAggStateError, answer_stage
from .settings import NodeConfigError, NodeSettings

log = logging.getLogger(__name__)

app = ClientApp()


def error_reply(message: Message, code: ErrorCode, reason: str) -> Message:
    log.warning("replying with error %s: %s", code.name, reason)
    return Message(Error(code=int(code), reason=f"{code.name}: {reason}"), reply_to=message)


@app.query("bundle_part")
def receive_bundle_part(message: Message, context: Context) -> Message:
    """Store one part of the emulator bundle; reply with ``partial``/``installed``/``cached``."""
    try:
        cache = NodeSettings.from_node_config(context.node_config).bundle_cache()
        part = bundle_part_from_content(message.content)
        status = cache.receive(part)
    except NodeConfigError as error:
        return error_reply(message, ErrorCode.NODE_CONFIG, str(error))
    except (WireError, BundleError) as error:
        return error_reply(message, ErrorCode.BUNDLE_INVALID, str(error))
    except OSError as error:
        return error_reply(message, ErrorCode.BUNDLE_INVALID, f"cannot write the bundle cache: {error}")
    status_record = ConfigRecord({"status": status, "digest": part.digest})
    return Message(RecordDict({BUNDLE_STATUS: status_record}), reply_to=message)


@app.query("secagg")
def secagg_stage(message: Message, context: Context) -> Message:
    """Secure aggregation's stages 0 (advertise keys), 1 (share keys) and 3 (unmask)."""
    try:
        content, job, round_number, kind = answer_stage(message.content, context)
    except (SecAggError, SecAggStateError, WireError) as error:
        return error_reply(message, ErrorCode.SECAGG, str(error))
    log.info("job %s round %d: secure aggregation %s answered", job, round_number, kind)
    return Message(content, reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Receive the global adapter and the round's instruction; reply with the update in the form the
    instruction's modes ask for, or with an error."""
    started = time.perf_counter()
    from .training import TrainRefused, answer_train  # torch and the tuning stack: only a train message pays them

    try:
        return Message(answer_train(message, context, started), reply_to=message)
    except TrainRefused as refused:
        return error_reply(message, refused.code, refused.reason)
