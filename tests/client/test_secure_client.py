"""The data owner's side of protected updates, without Flower processes: what a train reply
carries with envelopes and DP, the node-config errors, the pinned bundle signature, and a whole
secure-aggregation round through the ClientApp's handlers (session state in ``context.state``)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from safetensors import safe_open

from offsite.client.bundle_cache import BundleCache
from offsite.client.channels import EnvelopeChannel, PlainChannel, Sealer, TunedUpdate
from offsite.client.client_app import receive_bundle_part, secagg_stage, train
from offsite.client.daemon import DaemonConfig
from offsite.client.secagg_session import SECAGG_STATE
from offsite.client.settings import NodeSettings
from offsite.client.training import train_round
from offsite.cloud.federate.secagg_server import SecAggServer
from offsite.emulator.sandwich import adapter_state_dict
from offsite.emulator.tune import TuneConfig
from offsite.protocol.bundle import SIGNATURE, BundleError, BundleReason, load_emulator, read_bundle
from offsite.protocol.bundle_signing import sign_bundle
from offsite.protocol.dp import DPConfig, privatize_update, update_delta
from offsite.protocol.envelope import ReplayCache, UpdateOpener, max_envelope_bytes
from offsite.protocol.envelope_wire import ENVELOPE, envelope_from_record
from offsite.protocol.keys import COORDINATOR_PUBLIC, ClientIdentity, CoordinatorKeys, SenderRegistry
from offsite.protocol.messages import (
    ADAPTER,
    CONFIG,
    METRICS,
    SECAGG_ROUND,
    ErrorCode,
    TrainInstruction,
    WireError,
    bundle_part_from_content,
    bundle_part_to_content,
    plan_bundle_parts,
    read_bundle_part,
    secagg_session,
)
from offsite.protocol.records import state_from_record, state_to_record
from offsite.protocol.secagg import (
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    SecAggConfig,
    UnmaskShares,
    flatten_state,
    from_content,
    state_dimension,
    to_content,
)
from tests.client.test_client_app import (  # noqa: F401 - fixtures
    all_parts,
    bundle,
    make_context,
    make_message,
    task_identity,
)
from tests.conftest import write_jsonl

JOB = "unit-job"


@pytest.fixture
def world(tmp_path, bundle):  # noqa: F811 - the fixture imported above
    """A signed bundle installed in a cache, the coordinator's keys, one enrolled owner, data."""
    keys = CoordinatorKeys.generate()
    keys.save(tmp_path / "coordinator")
    sign_bundle(bundle.root, keys)
    identity = ClientIdentity.generate("alice")
    identity.save(tmp_path / "alice")
    registry = SenderRegistry()
    registry.register("alice", identity.public_key)
    cache = BundleCache(tmp_path / "cache", keys.public())
    for part in all_parts_with_signature(bundle):
        cache.receive(part)
    data = tmp_path / "alice.jsonl"
    write_jsonl(data, [{"prompt": f"q{i} ", "completion": f"a{i % 3}"} for i in range(5)])
    emulator = read_bundle(bundle.root)
    global_adapter = adapter_state_dict(load_emulator(emulator), emulator.layout, emulator.adapter_blocks)
    node_config = {
        "data-path": str(data),
        "cache-dir": str(tmp_path / "cache"),
        "threads": 1,
        "identity-dir": str(tmp_path / "alice"),
        "coordinator-key": str(tmp_path / "coordinator" / COORDINATOR_PUBLIC),
    }
    fields = ["keys", "identity", "registry", "bundle", "global_adapter", "node_config", "tmp"]
    return dataclasses.make_dataclass("World", fields)(
        keys, identity, registry, bundle, global_adapter, node_config, tmp_path
    )


TUNING = TuneConfig(steps=2, batch_size=2, lr=1e-2, max_length=32, seed=3, warmup_steps=0, schedule="constant")


def instruction(world, **modes) -> TrainInstruction:
    return TrainInstruction(round=1, bundle_digest=world.bundle.digest, tuning=TUNING, job_id=JOB, **modes)


def opener(world, reference=None, replay=None) -> UpdateOpener:
    return UpdateOpener(world.keys, world.registry, JOB, 1, reference or world.global_adapter, replay=replay)


def test_envelope_reply_carries_only_the_sealed_update_and_matches_the_plain_one(world):
    settings = NodeSettings.from_node_config(world.node_config)
    sealed_instruction = instruction(world, envelope=True)
    tuned, metrics = train_round(sealed_instruction, world.global_adapter, settings)
    metrics["client-seconds"] = 1.5
    channel = EnvelopeChannel(Sealer(settings.identity(), settings.coordinator()))
    reply = channel.reply(TunedUpdate.of(sealed_instruction, world.global_adapter, tuned, metrics))
    content, sent, info = reply.content, reply.tensors, reply.info
    assert info["mode"] == "envelope"
    assert set(content.array_records) == {ENVELOPE} and not content.config_records
    assert dict(content.metric_records[METRICS]) == {"client-seconds": 1.5}  # the rest is sealed
    record = content.array_records[ENVELOPE]
    assert all(array.dtype == "uint8" for array in record.values())
    coordinator = opener(world)
    opened = coordinator.open(envelope_from_record(record, max_envelope_bytes(coordinator.max_payload_bytes), 7), 7)
    assert opened.sender == "alice"
    assert opened.metadata["num-examples"] == 5 and math.isclose(opened.metadata["train-loss"], metrics["train-loss"])
    assert "client-seconds" not in opened.metadata
    for key, reference in world.global_adapter.items():
        assert opened.tensors[key].dtype == reference.dtype  # cast to the global adapter's dtypes
        assert torch.equal(opened.tensors[key], sent[key]) and torch.equal(sent[key], tuned[key].to(reference.dtype))

    # the plain reply carries exactly the same tensors, in the clear
    plain = PlainChannel().reply(TunedUpdate.of(instruction(world), world.global_adapter, tuned, metrics)).content
    plain_update = state_from_record(plain.array_records[ADAPTER])
    assert all(torch.equal(plain_update[key], opened.tensors[key]) for key in plain_update)
    assert dict(plain.metric_records[METRICS])["num-examples"] == 5


def test_dp_reply_is_clipped_and_noised_and_carries_no_data_dependent_metric(world):
    settings = NodeSettings.from_node_config(world.node_config)
    dp_instruction = instruction(world, envelope=True, dp=DPConfig(1e-3, 0.5))
    tuned, metrics = train_round(dp_instruction, world.global_adapter, settings)
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in update_delta(tuned, world.global_adapter).values()))
    assert norm > 1e-3  # the clip bites
    channel = EnvelopeChannel(Sealer(settings.identity(), settings.coordinator()))
    timed = dict(metrics, **{"client-seconds": 2.0})
    update = TunedUpdate.of(dp_instruction, world.global_adapter, tuned, timed, noise_seed=11)
    reply = channel.reply(update)
    content, sent, info = reply.content, reply.tensors, reply.info
    expected = privatize_update(tuned, world.global_adapter, DPConfig(1e-3, 0.5), seed=11).adapter(world.global_adapter)
    coordinator = opener(world)
    limit = max_envelope_bytes(coordinator.max_payload_bytes)
    opened = coordinator.open(envelope_from_record(content.array_records[ENVELOPE], limit))
    assert all(torch.equal(opened.tensors[key], expected[key]) for key in expected)
    assert all(torch.equal(sent[key], expected[key]) for key in expected)  # the audit copy is what left, noised
    assert set(opened.metadata) <= {"seconds"}  # no example count, no loss: functions of the data outside the mechanism
    assert info["dp"] is True

    # without a seed the noise is fresh every time
    again = channel.reply(TunedUpdate.of(dp_instruction, world.global_adapter, tuned, metrics)).content
    other = opener(world, replay=ReplayCache()).open(envelope_from_record(again.array_records[ENVELOPE], 1 << 30))
    assert any(not torch.equal(other.tensors[key], opened.tensors[key]) for key in expected)


def test_envelope_instruction_without_identity_or_key_is_a_node_config_error(world):
    sealed = instruction(world, envelope=True)
    content = RecordDict({ADAPTER: state_to_record(world.global_adapter), CONFIG: sealed.to_record()})
    for missing, named in (("identity-dir", "identity-dir"), ("coordinator-key", "coordinator-key")):
        config = {key: value for key, value in world.node_config.items() if key != missing}
        reply = train(make_message(content, "train"), make_context(config))
        assert reply.has_error() and reply.error.code == ErrorCode.NODE_CONFIG, reply.error.reason
        assert named in reply.error.reason, reply.error.reason
    broken = dict(world.node_config, **{"identity-dir": str(world.tmp / "nobody")})
    reply = train(make_message(content, "train"), make_context(broken))
    assert reply.error.code == ErrorCode.NODE_CONFIG and "identity-dir" in reply.error.reason

    # the train handler, with everything in place: only the envelope leaves
    reply = train(make_message(content, "train"), make_context(world.node_config))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.array_records) == {ENVELOPE}
    assert set(reply.content.metric_records[METRICS]) == {"client-seconds"}


def test_a_pinned_key_refuses_unsigned_and_foreign_bundles_and_replaces_an_unsigned_copy(
    tmp_path,
    bundle,  # noqa: F811
):
    keys, other = CoordinatorKeys.generate(), CoordinatorKeys.generate()
    parts = all_parts(bundle, 1 << 20)
    with pytest.raises(BundleError) as refused:
        for part in parts:
            BundleCache(tmp_path / "a", keys.public()).receive(part)
    assert refused.value.reason == BundleReason.UNSIGNED

    sign_bundle(bundle.root, other)
    with pytest.raises(BundleError) as refused:
        for part in all_parts_with_signature(bundle):
            BundleCache(tmp_path / "b", keys.public()).receive(part)
    assert refused.value.reason == BundleReason.WRONG_SIGNER

    # a copy installed before the key was pinned is unusable once it is, and replaced by signed parts
    unpinned = BundleCache(tmp_path / "c")
    for part in parts:
        unpinned.receive(part)
    pinned = BundleCache(tmp_path / "c", keys.public())
    with pytest.raises(BundleError) as refused:
        pinned.lookup(bundle.digest)
    assert refused.value.reason == BundleReason.UNSIGNED
    sign_bundle(bundle.root, keys)
    statuses = [pinned.receive(part) for part in all_parts_with_signature(bundle)]
    assert statuses[-1] == "installed" and pinned.lookup(bundle.digest).digest == bundle.digest
    assert pinned.receive(all_parts_with_signature(bundle)[0]) == "cached"

    # the bundle-part handler builds its cache with the pinned key from the node config
    keys.save(tmp_path / "coordinator")
    pinned = {"coordinator-key": str(tmp_path / "coordinator")}
    context = make_context({"data-path": "unused", "cache-dir": str(tmp_path / "d"), **pinned})
    (whole,) = all_parts(bundle, 1 << 24)  # no manifest.sig among the parts
    reply = receive_bundle_part(make_message(bundle_part_to_content(whole), "query.bundle_part"), context)
    assert reply.has_error() and reply.error.code == ErrorCode.BUNDLE_INVALID and "not signed" in reply.error.reason


def all_parts_with_signature(bundle):  # noqa: F811
    """The bundle's parts as the ServerApp sends them: manifest.sig included."""
    files = {name: meta["bytes"] for name, meta in bundle.manifest["files"].items()}
    files["manifest.json"] = (bundle.root / "manifest.json").stat().st_size
    files[SIGNATURE] = (bundle.root / SIGNATURE).stat().st_size
    plan = plan_bundle_parts(files, 1 << 20)
    return [
        bundle_part_from_content(bundle_part_to_content(read_bundle_part(bundle.root, bundle.digest, plan, i)))
        for i in range(len(plan))
    ]


def query(message, job: str = JOB, round_number: int = 1) -> RecordDict:
    content = to_content(message)
    content[SECAGG_ROUND] = ConfigRecord({"job-id": job, "round": round_number})
    return content


def test_a_secure_aggregation_round_through_the_handlers(world, tmp_path):
    """Three owners (node ids 11, 12, 13) with their own data, contexts and audit copies: stages 0,
    1 and 3 through ``secagg_stage``, stage 2 through ``train``; the unmasked mean is FedAvg of
    the deltas they sent, within the quantisation bound."""
    nodes = (11, 12, 13)
    contexts = {}
    for node, rows in zip(nodes, (3, 5, 8), strict=True):
        data = tmp_path / f"owner-{node}.jsonl"
        write_jsonl(data, [{"prompt": f"n{node} q{i} ", "completion": f"a{(i + node) % 4}"} for i in range(rows)])
        config = dict(world.node_config, **{"data-path": str(data), "audit-dir": str(tmp_path / f"audit-{node}")})
        params = inspect.signature(Context).parameters
        values = {"run_id": 1, "node_id": node, "node_config": config, "state": RecordDict(), "run_config": {}}
        contexts[node] = Context(**{k: v for k, v in values.items() if k in params})

    def ask(node, content, handler=secagg_stage, kind="query.secagg"):
        reply = handler(make_message(content, kind), contexts[node])
        assert not reply.has_error(), reply.error.reason
        return reply.content

    config = SecAggConfig.for_job(secagg_session(JOB, 1), state_dimension(world.global_adapter), 3, 0.5)
    server = SecAggServer(config)
    setup = server.start(nodes)
    rosters = server.collect_keys({node: from_content(ask(node, query(setup)), KeyAdvertisement) for node in nodes})
    shares = {node: from_content(ask(node, query(rosters[node])), EncryptedShares) for node in nodes}
    bundles = server.collect_shares(shares)
    train_instruction = instruction(world, secagg=True)
    masked = {}
    for node in nodes:
        content = to_content(bundles[node])
        content[ADAPTER], content[CONFIG] = state_to_record(world.global_adapter), train_instruction.to_record()
        reply = ask(node, content, train, "train")
        assert set(reply.array_records) == {"secagg-vector"}
        assert set(reply.metric_records[METRICS]) == {"client-seconds"}
        masked[node] = from_content(reply, MaskedInput)
    requests = server.collect_masked(masked)
    unmask = {node: from_content(ask(node, query(requests[node])), UnmaskShares) for node in nodes}
    result = server.collect_unmask(unmask)

    # the session is over: secrets gone
    assert all(SECAGG_STATE not in contexts[node].state.config_records for node in nodes)
    sent, weights = [], []
    for node in nodes:
        with safe_open(str(tmp_path / f"audit-{node}" / f"{JOB}-round-0001.safetensors"), framework="pt") as handle:
            sent.append(flatten_state({key: handle.get_tensor(key) for key in handle.keys()}))
            weights.append(json.loads(handle.metadata()["offsite"])["weight"])
    assert weights == [3, 5, 8] and result.total_weight == 16
    expected = sum(w * s for w, s in zip(weights, sent, strict=True)) / 16
    assert abs(result.mean() - expected).max() <= config.error_bound(3)
    assert abs(expected).max() > 100 * config.error_bound(3)  # the deltas are not all zero

    # a stage for another round, or with no session state, is refused with the SECAGG code
    reply = secagg_stage(make_message(query(setup, round_number=2), "query.secagg"), contexts[11])
    assert reply.has_error() and reply.error.code == ErrorCode.SECAGG and "session" in reply.error.reason
    reply = secagg_stage(make_message(query(rosters[11]), "query.secagg"), contexts[11])
    assert reply.has_error() and reply.error.code == ErrorCode.SECAGG
    assert "no secure-aggregation session state" in reply.error.reason


def test_train_instruction_modes_round_trip_and_stay_strict():
    modes = TrainInstruction(
        round=3,
        bundle_digest="b" * 64,
        tuning=TUNING,
        job_id="j-1",
        envelope=True,
        secagg=True,
        dp=DPConfig(0.5, 1.2, "distributed", 3),
    )
    assert TrainInstruction.from_record(modes.to_record(), TuneConfig) == modes
    record = modes.to_record()
    assert (record["dp.clip_norm"], record["dp.min_clients"]) == (0.5, 3)
    record["envelope"] = 1
    with pytest.raises(WireError, match="'envelope': expected bool"):
        TrainInstruction.from_record(record, TuneConfig)
    record = modes.to_record()
    record["round"] = True
    with pytest.raises(WireError, match="'round': expected int"):
        TrainInstruction.from_record(record, TuneConfig)
    record = modes.to_record()
    record["dp.noise_multiplier"] = float("nan")  # DPConfig's check, the one place DP settings are checked
    with pytest.raises(WireError, match="dp: noise_multiplier must be a finite number"):
        TrainInstruction.from_record(record, TuneConfig)
    record = modes.to_record()
    record["dp.mode"] = "local"
    with pytest.raises(WireError, match="min_clients applies to the distributed mode only"):
        TrainInstruction.from_record(record, TuneConfig)
    for bad, match in ((dict(envelope=True), "need a job_id"), (dict(job_id="../x"), "not a job id")):
        with pytest.raises(WireError, match=match):
            TrainInstruction(round=1, bundle_digest="b" * 64, tuning=TUNING, **bad)
    plain = TrainInstruction(round=1, bundle_digest="b" * 64, tuning=TUNING)
    assert plain.to_record()["envelope"] is False and not any(key.startswith("dp.") for key in plain.to_record())
    assert TrainInstruction.from_record(plain.to_record(), TuneConfig).dp is None


def test_client_start_hands_the_identity_and_the_pinned_key_to_the_node_config(tmp_path):
    data = tmp_path / "mine.jsonl"
    write_jsonl(data, [{"prompt": "a", "completion": "b"}])
    ClientIdentity.generate("alice").save(tmp_path / "me")
    CoordinatorKeys.generate().save(tmp_path / "coordinator")
    pinned = tmp_path / "coordinator" / COORDINATOR_PUBLIC
    config = DaemonConfig(
        "127.0.0.1:9092",
        data,
        insecure=True,
        identity_dir=tmp_path / "me",
        coordinator_key=pinned,
        audit_dir=tmp_path / "sent",
    )
    node_config = config.command()[config.command().index("--node-config") + 1]
    assert f"identity-dir='{(tmp_path / 'me').resolve()}'" in node_config
    assert f"coordinator-key='{pinned.resolve()}'" in node_config
    given = {
        "data-path": str(data),
        "identity-dir": str(tmp_path / "me"),
        "coordinator-key": str(pinned),
        "audit-dir": str(tmp_path / "sent"),
    }
    settings = NodeSettings.from_node_config(config.node_config() | given)
    assert settings.identity().sender_id == "alice" and settings.coordinator() is not None
    with pytest.raises(FileNotFoundError, match="--identity"):
        DaemonConfig("127.0.0.1:9092", data, insecure=True, identity_dir=tmp_path / "nobody")
