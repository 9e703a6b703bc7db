"""The ClientApp's pieces without Flower processes: bundle parts in any order, tampering, and a
malformed data file answered by an error reply naming file and line."""

from __future__ import annotations

import dataclasses
import inspect
import random
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from offsite.client.bundle_cache import BundleCache
from offsite.client.client_app import receive_bundle_part, train
from offsite.emulator.lora import LoRASpec
from offsite.emulator.sandwich import SandwichShape, adapter_state_dict, build_emulator
from offsite.emulator.tune import TuneConfig
from offsite.protocol.bundle import BundleError, load_emulator, read_bundle, write_bundle
from offsite.protocol.messages import (
    ErrorCode,
    TrainInstruction,
    WireError,
    bundle_part_from_content,
    bundle_part_to_content,
    plan_bundle_parts,
    read_bundle_part,
)
from offsite.protocol.records import state_to_record
from tests.conftest import make_tokenizer, tiny_model, write_jsonl


@pytest.fixture
def bundle(tmp_path):
    base = tiny_model("llama", n_blocks=5)
    shape = SandwichShape(1, 2, 1)
    emulator, layout = build_emulator(base, shape)
    return write_bundle(
        tmp_path / "bundle",
        emulator,
        make_tokenizer(tmp_path),
        {
            "family": "llama",
            "shape": {"a": 1, "k": 2, "b": 1, "n_blocks": 5},
            "layout": layout,
            "adapter_blocks": shape.adapter_blocks(5),
            "kept_middle": shape.kept_middle(5),
        },
    )


def all_parts(bundle, part_bytes):
    files = {name: meta["bytes"] for name, meta in bundle.manifest["files"].items()}
    files["manifest.json"] = (bundle.root / "manifest.json").stat().st_size
    plan = plan_bundle_parts(files, part_bytes)
    return [
        bundle_part_from_content(bundle_part_to_content(read_bundle_part(bundle.root, bundle.digest, plan, i)))
        for i in range(len(plan))
    ]


def test_plan_covers_every_byte_once():
    files = {"a": 10, "b": 0, "c": 25}
    plan = plan_bundle_parts(files, 7)
    assert all(sum(length for _, _, length in part) <= 7 for part in plan)
    for name, size in files.items():
        ranges = sorted((offset, length) for part in plan for n, offset, length in part if n == name)
        assert sum(length for _, length in ranges) == size
        assert all(a[0] + a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_parts_in_any_order_install_a_verified_bundle(tmp_path, bundle):
    parts = all_parts(bundle, 20_000)
    assert len(parts) > 3
    random.Random(0).shuffle(parts)
    cache = BundleCache(tmp_path / "cache")
    statuses = [cache.receive(part) for part in parts]
    assert statuses[:-1] == ["partial"] * (len(parts) - 1) and statuses[-1] == "installed"
    assert cache.lookup(bundle.digest).digest == bundle.digest
    assert cache.receive(parts[0]) == "cached"
    assert not (tmp_path / "cache" / "incoming" / bundle.digest).exists()


def test_tampered_part_is_refused_and_discarded(tmp_path, bundle):
    parts = all_parts(bundle, 50_000)
    first = parts[0]
    segment = first.segments[0]
    flipped = bytes([segment.data[0] ^ 1]) + segment.data[1:]
    tampered = (type(segment)(segment.path, segment.offset, flipped),) + first.segments[1:]
    parts[0] = type(first)(first.digest, first.index, first.count, tampered)
    cache = BundleCache(tmp_path / "cache")
    for part in parts[:-1]:
        cache.receive(part)
    with pytest.raises(BundleError, match="sha256"):
        cache.receive(parts[-1])
    assert cache.lookup(bundle.digest) is None
    assert not (tmp_path / "cache" / "incoming" / bundle.digest).exists()


def test_part_paths_cannot_escape(bundle):
    content = bundle_part_to_content(read_bundle_part(bundle.root, bundle.digest, [[("manifest.json", 0, 10)]], 0))
    content.config_records["bundle-info"]["paths"] = ["../evil"]
    with pytest.raises(WireError, match="not a plain relative path"):
        bundle_part_from_content(content)


def test_train_instruction_round_trip_and_rejection():
    tuning = TuneConfig(steps=3, lr=0.01, lora=LoRASpec(targets=("q_proj", "v_proj")))
    instruction = TrainInstruction(round=2, bundle_digest="a" * 64, tuning=tuning)
    assert TrainInstruction.from_record(instruction.to_record(), TuneConfig) == instruction
    record = instruction.to_record()
    record["tuning.steps"] = "3"
    with pytest.raises(WireError, match="'tuning.steps': expected int"):
        TrainInstruction.from_record(record, TuneConfig)
    record = instruction.to_record()
    record["tuning.steps"] = 0  # the tuning config's own check, on arrival
    with pytest.raises(WireError, match="tuning: steps and batch_size must be >= 1"):
        TrainInstruction.from_record(record, TuneConfig)
    record = instruction.to_record()
    record["tuning.lr_typo"] = 0.1
    with pytest.raises(WireError, match=r"unknown tuning settings \['lr_typo'\]"):
        TrainInstruction.from_record(record, TuneConfig)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages made outside a Flower process need the identity Flower's runtime would set."""
    for name in ("_run_id", "_node_id", "_task_id"):
        if hasattr(TaskIdentity, name):
            monkeypatch.setattr(TaskIdentity, name, 1)


def make_context(node_config):
    params = inspect.signature(Context).parameters
    values = {"run_id": 1, "node_id": 7, "node_config": node_config, "state": RecordDict(), "run_config": {}}
    return Context(**{k: v for k, v in values.items() if k in params})


def make_message(content, message_type):
    message = Message(content, dst_node_id=7, message_type=message_type, group_id="1")
    message.metadata.__dict__["_message_id"] = message.object_id  # as the Grid does on push
    return message


def test_malformed_data_gives_an_error_reply_naming_file_and_line(tmp_path, bundle):
    cache_dir = tmp_path / "cache"
    for part in all_parts(bundle, 1 << 20):
        BundleCache(cache_dir).receive(part)
    data = tmp_path / "mine.jsonl"
    write_jsonl(data, [{"prompt": "a", "completion": "b"}])
    with open(data, "a") as handle:
        handle.write("{not json\n")
    emulator = read_bundle(cache_dir / "bundles" / bundle.digest)
    model = load_emulator(emulator)
    adapter = adapter_state_dict(model, emulator.layout, emulator.adapter_blocks)
    instruction = TrainInstruction(round=1, bundle_digest=bundle.digest, tuning=TuneConfig(steps=1))
    content = RecordDict({"adapter": state_to_record(adapter), "config": instruction.to_record()})
    context = make_context({"data-path": str(data), "cache-dir": str(cache_dir)})
    reply = train(make_message(content, "train"), context)
    assert reply.has_error()
    assert reply.error.code == ErrorCode.DATA_FORMAT
    assert f"{data}:2:" in reply.error.reason

    context = make_context({"cache-dir": str(cache_dir)})
    reply = train(make_message(content, "train"), context)
    assert reply.has_error() and reply.error.code == ErrorCode.NODE_CONFIG and "data-path" in reply.error.reason

    context = make_context({"data-path": str(data), "cache-dir": str(tmp_path / "empty")})
    reply = train(make_message(content, "train"), context)
    assert reply.has_error() and reply.error.code == ErrorCode.BUNDLE_MISSING

    # an instruction that does not decode, and a secure-aggregation round this node holds no session of
    bad_record = ConfigRecord(dict(instruction.to_record(), round="1"))
    broken = RecordDict({"adapter": content["adapter"], "config": bad_record})
    reply = train(make_message(broken, "train"), make_context({"data-path": str(data), "cache-dir": str(cache_dir)}))
    assert reply.error.code == ErrorCode.BAD_MESSAGE and "'round': expected int" in reply.error.reason
    secure = dataclasses.replace(instruction, job_id="job-1", secagg=True)
    content = RecordDict({"adapter": content["adapter"], "config": secure.to_record()})
    reply = train(make_message(content, "train"), make_context({"data-path": str(data), "cache-dir": str(cache_dir)}))
    assert reply.error.code == ErrorCode.SECAGG, reply.error.reason


def test_bundle_part_handler_replies_with_status(tmp_path, bundle):
    (part,) = all_parts(bundle, 1 << 20)
    context = make_context({"data-path": "unused", "cache-dir": str(tmp_path / "cache")})
    reply = receive_bundle_part(make_message(bundle_part_to_content(part), "query.bundle_part"), context)
    assert not reply.has_error()
    assert reply.content.config_records["bundle-status"]["status"] == "installed"
    reply = receive_bundle_part(make_message(bundle_part_to_content(part), "query.bundle_part"), context)
    assert reply.content.config_records["bundle-status"]["status"] == "cached"


LIGHT_MESSAGES = r"""
import inspect, sys
from flwr.app import Context, Message, RecordDict
from offsite.client.client_app import receive_bundle_part
from offsite.protocol.bundle import read_bundle
from offsite.protocol.messages import bundle_part_to_content, plan_bundle_parts, read_bundle_part
from offsite.protocol.secagg import KeyRoster, SecAggClient, SecAggConfig, SetupRequest
from flwr.supercore.task_identity import TaskIdentity

for name in ("_run_id", "_node_id", "_task_id"):  # what a ClientApp process has from its SuperNode
    if hasattr(TaskIdentity, name):
        setattr(TaskIdentity, name, 1)
bundle = read_bundle(sys.argv[1])
files = {name: meta["bytes"] for name, meta in bundle.manifest["files"].items()}
files["manifest.json"] = (bundle.root / "manifest.json").stat().st_size
plan = plan_bundle_parts(files, 4096)
node_config = {"data-path": "unused", "cache-dir": sys.argv[2]}
values = {"run_id": 1, "node_id": 7, "node_config": node_config, "state": RecordDict(), "run_config": {}}
context = Context(**{k: v for k, v in values.items() if k in inspect.signature(Context).parameters})
statuses = []
for index in range(len(plan)):
    content = bundle_part_to_content(read_bundle_part(bundle.root, bundle.digest, plan, index))
    message = Message(content, dst_node_id=7, message_type="query.bundle_part", group_id="1")
    reply = receive_bundle_part(message, context)
    assert not reply.has_error(), reply.error.reason
    statuses.append(reply.content.config_records["bundle-status"]["status"])
assert statuses[-1] == "installed" and len(statuses) > 1, statuses

config = SecAggConfig.for_job(b"s" * 32, 10, 3, 1.0)
clients = {node: SecAggClient(node) for node in (1, 2, 3)}
adverts = {node: client.advertise(SetupRequest(config, (1, 2, 3))) for node, client in clients.items()}
channel_keys, mask_keys = tuple(a.channel_key for a in adverts.values()), tuple(a.mask_key for a in adverts.values())
roster = KeyRoster(config.session, (1, 2, 3), channel_keys, mask_keys)
shares = [client.share_keys(roster) for client in clients.values()]
assert len(shares) == 3
print("torch imported" if "torch" in sys.modules else "torch-free")
"""


def test_bundle_parts_and_key_exchange_run_without_importing_torch(tmp_path, bundle):
    """Flower starts a fresh ClientApp process for every message; the ones that only carry bundle
    parts or secure-aggregation keys must not pay torch's import (seconds each on a small node)."""
    done = subprocess.run(
        [sys.executable, "-c", LIGHT_MESSAGES, str(bundle.root), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "torch-free", done.stdout
    assert BundleCache(tmp_path / "cache").lookup(bundle.digest) is not None
