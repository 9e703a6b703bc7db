"""This node's secure-aggregation session between the messages of one round: stages 0 (advertise
keys), 1 (share keys) and 3 (unmask) answered from ``query.secagg`` messages; stage 2 is the
masked input of :class:`offsite.client.channels.SecAggChannel`.

Flower 1.41's SuperNode keeps a run's ``context.state`` in its own memory between the messages
of the run (``NodeState.set_run_series_context`` after each ClientApp returns); the session
(private keys and shares) lives there, never leaves this machine (the SuperNode talks to its
ClientApp processes on loopback) and is gone when the SuperNode restarts (the round then counts
this node as dropped). Torch-free: key exchanges run in light processes.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, RecordDict

from offsite.protocol.messages import SECAGG_ROUND, WireError, secagg_session
from offsite.protocol.secagg import (
    SECAGG,
    KeyRoster,
    SecAggClient,
    SecAggError,
    SetupRequest,
    UnmaskRequest,
    from_content,
    to_content,
)

SECAGG_STATE = "offsite-secagg"  # context.state key: {"job", "round", "client": SecAggClient.to_bytes()}


class SecAggStateError(ValueError):
    """A secure-aggregation message arrived for a session this node holds no state of."""


def secagg_round_of(content: RecordDict) -> tuple[str, int]:
    """``(job id, round)`` of a secure-aggregation query."""
    if SECAGG_ROUND not in content.config_records:
        raise WireError(f"secure-aggregation query lacks the {SECAGG_ROUND!r} config record")
    record = content.config_records[SECAGG_ROUND]
    job, round_number = record.get("job-id"), record.get("round")
    if not isinstance(job, str) or isinstance(round_number, bool) or not isinstance(round_number, int):
        raise WireError(f"{SECAGG_ROUND!r}: expected a job-id string and a round integer")
    secagg_session(job, round_number)  # validates both
    return job, round_number


def load_secagg_client(context: Context, job: str, round_number: int) -> SecAggClient:
    """This node's session of ``job``'s round ``round_number``, kept in ``context.state``."""
    if SECAGG_STATE not in context.state.config_records:
        raise SecAggStateError(f"no secure-aggregation session state on this node for job {job} round {round_number}")
    record = context.state.config_records[SECAGG_STATE]
    if record.get("job") != job or record.get("round") != round_number:
        raise SecAggStateError(
            f"this node's secure-aggregation session is job {record.get('job')} round {record.get('round')}, "
            f"not job {job} round {round_number}"
        )
    return SecAggClient.from_bytes(record["client"])


def save_secagg_client(context: Context, job: str, round_number: int, client: SecAggClient) -> None:
    """Keep the session for the round's next message; a finished one is dropped (its secrets with it)."""
    if client.stage == "done":
        if SECAGG_STATE in context.state.config_records:
            del context.state[SECAGG_STATE]
        return
    context.state[SECAGG_STATE] = ConfigRecord({"job": job, "round": round_number, "client": client.to_bytes()})


def answer_stage(content: RecordDict, context: Context) -> tuple[RecordDict, str, int, str]:
    """The reply to a stage 0, 1 or 3 query, and the job, round and stage it answered; the session
    is saved (or dropped once done) in ``context.state``."""
    job, round_number = secagg_round_of(content)
    kind = content.config_records[SECAGG].get("kind") if SECAGG in content.config_records else None
    if kind == SetupRequest.KIND:
        request = from_content(content, SetupRequest)
        if request.config.session != secagg_session(job, round_number):
            raise SecAggError(f"the setup's session is not job {job} round {round_number}'s")
        client = SecAggClient(context.node_id)
        reply = client.advertise(request)
    elif kind == KeyRoster.KIND:
        client = load_secagg_client(context, job, round_number)
        reply = client.share_keys(from_content(content, KeyRoster))
    elif kind == UnmaskRequest.KIND:
        client = load_secagg_client(context, job, round_number)
        reply = client.unmask(from_content(content, UnmaskRequest))
    else:
        raise SecAggError(f"not a secure-aggregation stage 0, 1 or 3 message: kind {str(kind)[:40]!r}")
    save_secagg_client(context, job, round_number, client)
    return to_content(reply), job, round_number, kind
