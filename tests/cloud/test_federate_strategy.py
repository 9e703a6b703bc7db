"""The strategy's rounds against an in-process grid, fast: stub data owners with known updates (the
checkpoint is checked against a FedAvg oracle and against the wrong answer), a node that errs, one
that sends garbage, one that stays silent, one that lost its bundle; a failed DP round keeps the
privacy it spent; and secure aggregation through the real ClientApp, with a node that drops out
after the key exchange (its masks are recovered) and a session too small to start."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from offsite.client.client_app import app as client_app
from offsite.cloud.fed_job import (
    FEDERATED_TUNING,
    FedJobConfig,
    SecurityConfig,
    checkpoint_path,
    update_path,
    write_job,
)
from offsite.cloud.federate.app import open_channel, run_job
from offsite.cloud.federate.channels import EnvelopeChannel, PlainChannel
from offsite.cloud.federate.round import RoundFailed
from offsite.cloud.federate.secagg_channel import SecAggChannel
from offsite.emulator.sandwich import SandwichShape, build_emulator
from offsite.protocol.adapter import load_update
from offsite.protocol.bundle import write_bundle
from offsite.protocol.keys import CoordinatorKeys, SenderRegistry
from offsite.protocol.messages import ADAPTER, BUNDLE_PART, BUNDLE_STATUS, METRICS, TRAIN, ErrorCode
from offsite.protocol.records import state_from_record, state_to_record
from tests.conftest import make_tokenizer, tiny_model, write_jsonl

TUNING = dataclasses.replace(FEDERATED_TUNING, steps=2, batch_size=2, lr=1e-2, max_length=32)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages made outside a Flower process need the identity Flower's runtime would set."""
    for name in ("_run_id", "_node_id", "_task_id"):
        if hasattr(TaskIdentity, name):
            monkeypatch.setattr(TaskIdentity, name, 1)


class FakeGrid:
    """Flower's Grid in one process: ``answer(node, message)`` is a node's reply, None its silence."""

    def __init__(self, nodes, answer) -> None:
        self.nodes, self.answer, self.pending, self.sent = list(nodes), answer, {}, []

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as the Grid does on push
            self.sent.append((message.metadata.dst_node_id, message.metadata.message_type))
            reply = self.answer(message.metadata.dst_node_id, message)
            if reply is not None:
                self.pending[message.object_id] = reply
            ids.append(message.object_id)
        return ids

    def pull_messages(self, ids):
        return [self.pending.pop(i) for i in list(ids) if i in self.pending]


def tiny_job(tmp_path, **settings):
    base = tiny_model("llama", n_blocks=4)
    shape = SandwichShape(1, 1, 1)
    emulator, layout = build_emulator(base, shape)
    job_dir = tmp_path / "job"
    write_bundle(
        job_dir / "bundle",
        emulator,
        make_tokenizer(tmp_path),
        {
            "family": "llama",
            "shape": {"a": 1, "k": 1, "b": 1, "n_blocks": 4},
            "layout": layout,
            "adapter_blocks": shape.adapter_blocks(4),
            "kept_middle": shape.kept_middle(4),
        },
    )
    config = {"rounds": 1, "round_timeout": 0.2, "node_wait_timeout": 5, "bundle_timeout": 5, "tuning": TUNING}
    config |= settings
    write_job(job_dir, FedJobConfig(**config))
    return job_dir


def stub_owners(behaviour: dict[int, object]):
    """Data owners that install any bundle and answer ``train`` as ``behaviour`` says: ``(shift, n)``
    sends the global adapter + shift with n examples; an ErrorCode, an error reply; "nan", a
    non-finite update; None, nothing."""

    def answer(node, message):
        if message.metadata.message_type == BUNDLE_PART:
            return Message(RecordDict({BUNDLE_STATUS: ConfigRecord({"status": "installed"})}), reply_to=message)
        kind = behaviour[node]
        if kind is None:
            return None
        if isinstance(kind, ErrorCode):
            return Message(Error(code=int(kind), reason=f"{kind.name}: node {node} says no"), reply_to=message)
        adapter = state_from_record(message.content.array_records[ADAPTER])
        shift, examples = (float("nan"), 1) if kind == "nan" else kind
        update = {key: tensor + shift for key, tensor in adapter.items()}
        metrics = MetricRecord({"num-examples": examples, "train-loss": 1.0 + shift, "seconds": 0.1})
        return Message(RecordDict({ADAPTER: state_to_record(update), METRICS: metrics}), reply_to=message)

    return answer


def test_a_round_is_the_weighted_mean_of_the_usable_replies_and_names_the_rest(tmp_path):
    job_dir = tiny_job(tmp_path, min_nodes=6, min_replies=2, record_updates=True)
    behaviour = {1: (0.1, 2), 2: (0.3, 6), 3: ErrorCode.DATA_FORMAT, 4: None, 5: "nan", 6: ErrorCode.BUNDLE_MISSING}
    state = run_job(FakeGrid(behaviour, stub_owners(behaviour)), job_dir)

    before, _ = load_update(checkpoint_path(job_dir, 0))
    after, _ = load_update(checkpoint_path(job_dir, 1))
    for key, tensor in before.items():
        expected = tensor + (2 * 0.1 + 6 * 0.3) / 8  # FedAvg weighted by num-examples
        assert torch.allclose(after[key], expected, atol=1e-6), key
        assert not torch.allclose(after[key], tensor + (0.1 + 0.3) / 2, atol=1e-3)  # not the unweighted mean
    (record,) = json.loads((job_dir / "state.json").read_text())["history"]
    assert record["replied"] == [1, 2] and record["sent"] == [1, 2, 3, 4, 5, 6] and record["dropped"] == [4]
    assert record["dropped_reasons"] == {"4": "no reply within 0s"}
    assert record["failed"]["3"] == "DATA_FORMAT: node 3 says no"
    assert record["failed"]["5"].startswith("INVALID_UPDATE: node 5") and "finite" in record["failed"]["5"]
    assert record["failed"]["6"].startswith("BUNDLE_MISSING")
    assert record["num_examples"] == {"1": 2.0, "2": 6.0}
    assert record["mean_train_loss"] == pytest.approx((2 * 1.1 + 6 * 1.3) / 8)
    assert "secagg" not in record and "senders" not in record and "privacy" not in record
    assert state.nodes_with_bundle == [1, 2, 3, 4, 5]  # node 6 lost its bundle: sent again next round
    recorded = sorted(path.name for path in update_path(job_dir, 1, 1).parent.iterdir())
    assert recorded == ["node-1.safetensors", "node-2.safetensors"]


def test_a_failed_dp_round_keeps_the_privacy_it_spent(tmp_path):
    security = SecurityConfig(dp_clip_norm=0.5, dp_noise_multiplier=1.0)
    job_dir = tiny_job(tmp_path, min_nodes=3, min_replies=3, security=security)
    behaviour = {1: (0.1, 2), 2: (0.3, 6), 3: None}
    with pytest.raises(RoundFailed, match="round 1: 2 usable replies, need 3"):
        run_job(FakeGrid(behaviour, stub_owners(behaviour)), job_dir)
    state = json.loads((job_dir / "state.json").read_text())
    assert state["completed_round"] == 0 and state["privacy"]["rounds"] == 1  # released to the coordinator: spent


def test_the_job_s_security_picks_the_channel(tmp_path):
    job_dir = tiny_job(tmp_path)
    assert type(open_channel(job_dir, FedJobConfig())) is PlainChannel
    secure = FedJobConfig(min_nodes=2, min_replies=2, job_id="j", security=SecurityConfig(secure_aggregation=True))
    assert type(open_channel(job_dir, secure)) is SecAggChannel and not open_channel(job_dir, secure).sealed
    CoordinatorKeys.generate().save(tmp_path / "keys")
    SenderRegistry().save(tmp_path / "senders.json")
    sealed = FedJobConfig(
        job_id="j",
        security=SecurityConfig(
            envelopes=True, keys_dir=str(tmp_path / "keys"), registry=str(tmp_path / "senders.json")
        ),
    )
    assert type(open_channel(job_dir, sealed)) is EnvelopeChannel and open_channel(job_dir, sealed).sealed


def real_owners(tmp_path, nodes, silent=lambda node, message_type: False):
    """The real ClientApp for each node (own data, own context); ``silent(node, message type)``: no answer."""
    contexts = {}
    params = inspect.signature(Context).parameters
    for node in nodes:
        data = tmp_path / f"owner-{node}.jsonl"
        write_jsonl(data, [{"prompt": f"n{node} q{i} ", "completion": f"a{(i + node) % 4}"} for i in range(2 + node)])
        config = {"data-path": str(data), "cache-dir": str(tmp_path / f"cache-{node}"), "threads": 1}
        values = {"run_id": 1, "node_id": node, "node_config": config, "state": RecordDict(), "run_config": {}}
        contexts[node] = Context(**{k: v for k, v in values.items() if k in params})

    def answer(node, message):
        if silent(node, message.metadata.message_type):
            return None
        return client_app(message, contexts[node])

    return answer


def test_secure_aggregation_recovers_a_dropout_and_aborts_below_the_threshold(tmp_path):
    security = SecurityConfig(secure_aggregation=True, secagg_clip_range=0.5)
    job_dir = tiny_job(tmp_path, min_nodes=3, min_replies=2, job_id="sa-job", security=security)
    grid = FakeGrid([1, 2, 3], real_owners(tmp_path, [1, 2, 3], lambda node, kind: node == 3 and kind == TRAIN))
    run_job(grid, job_dir)
    (record,) = json.loads((job_dir / "state.json").read_text())["history"]
    assert record["secagg"]["survivors"] == [1, 2] and record["secagg"]["dropped"] == [3]
    assert record["replied"] == [1, 2] and record["dropped"] == [3] and record["num_examples"] == {}
    assert record["secagg"]["total_weight"] == 3 + 4  # each owner's row count, inside the masked sum
    assert [kind for node, kind in grid.sent if node == 1] == [
        BUNDLE_PART,
        "query.secagg",
        "query.secagg",
        TRAIN,
        "query.secagg",
    ]
    before, _ = load_update(checkpoint_path(job_dir, 0))
    after, _ = load_update(checkpoint_path(job_dir, 1))
    assert any(not torch.equal(after[key], before[key]) for key in before)

    # two of three silent from the key exchange on: fewer than the threshold's nodes advertise keys
    job_dir = tiny_job(tmp_path / "abort", min_nodes=3, min_replies=2, job_id="sa-job", security=security)
    owners = real_owners(tmp_path / "abort", [1, 2, 3], lambda node, kind: node > 1 and kind != BUNDLE_PART)
    grid = FakeGrid([1, 2, 3], owners)
    with pytest.raises(RoundFailed, match="round 1: secure aggregation aborted: 1 node.s. advertised keys"):
        run_job(grid, job_dir)
    assert json.loads((job_dir / "state.json").read_text())["completed_round"] == 0

    # only one node holds the bundle: no session can start
    job_dir = tiny_job(tmp_path / "small", min_nodes=3, min_replies=2, job_id="sa-job", security=security)
    grid = FakeGrid([1, 2, 3], real_owners(tmp_path / "small", [1, 2, 3], lambda node, kind: node > 1))
    with pytest.raises(RoundFailed, match="secure aggregation cannot start on 1 node"):
        run_job(grid, job_dir)
