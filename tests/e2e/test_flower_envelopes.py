"""Protected updates on Flower's deployment engine: a real SuperLink and SuperNodes on loopback, a
tiny random llama, the bundle signed by the coordinator and verified by every data owner.

Two federations (each a few runs, to keep start-ups few on a small machine):

1. Envelopes. Three enrolled data owners run a job without envelopes, then the same job (same
   bundle, data and seeds) with envelopes, joined by two hostile nodes: one whose identity was
   never enrolled and one whose enrolment was revoked, which also runs altered code that from
   round 2 on sends 1,500 nested ``[`` as its envelope's header (a parser bomb: refused as
   ``malformed-header`` before the sender is looked up, and the round goes on without it). The
   SuperNodes reach the SuperLink through a recording relay, so the test sees every byte they
   send. Checked: the sealed job's checkpoints equal the plain job's bit for bit; each hostile
   update is refused every round with its reason in ``state.json`` and the log naming the node,
   and each checkpoint is the weighted mean of the accepted updates only; 32-byte windows of the updates the coordinator
   recorded are found in what the nodes sent in the plain job (the relay does see plaintext
   updates) and in none of it in the sealed job, where the envelopes' magic shows instead.
2. Secure aggregation. Four nodes (one revoked): a secure-aggregation round with envelopes
   (the revoked node's sealed masked input is refused; its masks are removed by dropout
   recovery) whose aggregate matches FedAvg of what the accepted data owners sent (their
   audit copies) within the quantisation bound of :mod:`offsite.protocol.secagg`; then two
   rounds of secure aggregation with distributed DP, whose epsilon in ``state.json`` grows
   round by round and equals the accountant's for the job's settings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import torch
from safetensors import safe_open

from offsite.cloud.aggregate import fedavg
from offsite.cloud.fed_job import (
    FEDERATED_TUNING,
    FedJobConfig,
    SecurityConfig,
    checkpoint_path,
    update_path,
    write_job,
)
from offsite.cloud.superlink import free_port
from offsite.emulator.sandwich import SandwichShape
from offsite.harness.federation import LocalFederation, _spawn
from offsite.harness.wiretap import WireTap
from offsite.protocol.adapter import load_update
from offsite.protocol.bundle_signing import sign_bundle
from offsite.protocol.dp import PrivacyAccountant
from offsite.protocol.envelope import MAGIC
from offsite.protocol.flower_process import supernode_command
from offsite.protocol.keys import COORDINATOR_PUBLIC, ClientIdentity, CoordinatorKeys, SenderRegistry
from offsite.protocol.secagg import SecAggConfig, quantisation_error_bound, state_dimension
from tests.conftest import tiny_model, write_tiny_bundle
from tests.e2e.flower_jobs import NUM_EXAMPLES, assert_rounds_are_weighted_means, data_file, data_rows
from tests.e2e.test_flower_faults import supernode_ids, wait_until

HONEST = ("alice", "bob", "carol")
TUNING = dataclasses.replace(FEDERATED_TUNING, steps=2, batch_size=2, lr=1e-2, max_length=32)
WINDOW = 32  # bytes of a float32 update tensor looked for on the wire


def signed_bundle(tmp_path, keys: CoordinatorKeys):
    """``make_job``'s tiny llama bundle, signed by the coordinator (manifest.sig)."""
    root = tmp_path / "bundle"
    write_tiny_bundle(root, tiny_model("llama", n_blocks=6), SandwichShape(1, 2, 1), tmp_path)
    sign_bundle(root, keys)
    return root


def new_job(job_dir, bundle_dir, config: FedJobConfig):
    shutil.copytree(bundle_dir, job_dir / "bundle")
    write_job(job_dir, config)
    return job_dir


def enrol(tmp_path, revoked: tuple[str, ...] = (), unknown: tuple[str, ...] = ()):
    """Coordinator keys, a registry of HONEST + ``revoked`` (then revoked) and identities for all
    of them and for ``unknown`` (never registered)."""
    keys_dir = tmp_path / "coordinator"
    keys = CoordinatorKeys.generate()
    keys.save(keys_dir)
    registry, registry_path = SenderRegistry(), tmp_path / "senders.json"
    for name in (*HONEST, *revoked, *unknown):
        identity = ClientIdentity.generate(name)
        identity.save(tmp_path / "identities" / name)
        if name not in unknown:
            registry.register(name, identity.public_key)
    for name in revoked:
        registry.revoke(name)
    registry.save(registry_path)
    return keys, keys_dir, registry_path


def node_config(tmp_path, name: str, rows: int, seed: int, keys_dir) -> dict:
    return {
        "data-path": data_file(tmp_path / f"data-{name}.jsonl", rows, seed),
        "cache-dir": tmp_path / f"cache-{name}",
        "threads": 1,
        "identity-dir": tmp_path / "identities" / name,
        "coordinator-key": keys_dir / COORDINATOR_PUBLIC,
        "audit-dir": tmp_path / f"audit-{name}",
    }


def start_owners(
    federation,
    tmp_path,
    owners: dict[str, tuple[int, int]],
    keys_dir,
    superlink: str | None = None,
    altered: dict[str, str] | None = None,
) -> dict[str, int]:
    """SuperNodes for ``owners`` (name -> (rows, seed)); returns name -> node id. ``altered``: name
    -> code that owner's ClientApp processes run first (its ``sitecustomize``): a hostile owner's
    own change to its software."""
    altered = altered or {}
    started = {
        name: federation.start_supernode(
            node_config(tmp_path, name, rows, seed, keys_dir), name=f"supernode-{name}", superlink=superlink, wait=False
        )
        if name not in altered
        else start_altered_owner(
            federation, tmp_path, name, node_config(tmp_path, name, rows, seed, keys_dir), superlink, altered[name]
        )
        for name, (rows, seed) in owners.items()
    }
    federation.wait_listening(list(started.values()))  # started side by side
    return {
        name: wait_until(lambda node=node: supernode_ids(node.log_path), 60, f"{node.name}'s id")[0]
        for name, node in started.items()
    }


def start_altered_owner(federation, tmp_path, name: str, config: dict, superlink: str | None, code: str):
    """A SuperNode like ``federation.start_supernode``'s whose processes find ``code`` as
    ``sitecustomize`` on their PYTHONPATH (Flower hands its environment down to each ClientApp)."""
    directory = tmp_path / f"code-{name}"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(code)
    port = free_port()
    command = supernode_command(superlink or federation.address, config, insecure=True, port=port)
    node = _spawn(
        f"supernode-{name}", command, federation.workdir, federation.env | {"PYTHONPATH": str(directory)}, port
    )
    federation.supernodes.append(node)  # stopped with the federation
    return node


# From round 2 on, every sealed envelope leaves with its header replaced by 1,500 nested "[" (the
# same frame, ciphertext and signature): more nesting than json.loads can follow, in a header well
# under the 4 KiB limit. The coordinator must refuse it with a reason, not crash the round.
CRAFTED_HEADER_FROM_ROUND_2 = """
import json
import sys

if sys.argv and sys.argv[0].endswith("flwr-clientapp"):
    import offsite.protocol.envelope_wire as wire

    honest = wire.envelope_to_record

    def crafted(envelope, part_bytes=wire.DEFAULT_PART_BYTES):
        data = bytes(envelope)
        length = int.from_bytes(data[8:12], "big")
        if json.loads(data[12 : 12 + length])["round"] < 2:
            return honest(envelope, part_bytes)
        header = b"[" * 1500
        return honest(data[:8] + len(header).to_bytes(4, "big") + header + data[12 + length :], part_bytes)

    wire.envelope_to_record = crafted
"""


def windows(tensors: dict[str, torch.Tensor], count: int = 6) -> list[bytes]:
    """``count`` 32-byte windows spread over the largest tensor's little-endian bytes."""
    largest = max(tensors.values(), key=lambda tensor: tensor.numel())
    data = largest.contiguous().numpy().tobytes()
    step = (len(data) - WINDOW) // count
    return [data[i * step : i * step + WINDOW] for i in range(count)]


def audit_copy(tmp_path, name: str, job_id: str, round_number: int) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(
        str(tmp_path / f"audit-{name}" / f"{job_id}-round-{round_number:04d}.safetensors"), framework="pt"
    ) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, json.loads(handle.metadata()["offsite"])


def test_envelopes_match_the_plain_job_and_hostile_senders_are_refused(tmp_path):
    keys, keys_dir, registry = enrol(tmp_path, revoked=("trudy",), unknown=("mallory",))
    bundle = signed_bundle(tmp_path, keys)
    common = dict(
        rounds=2,
        min_replies=3,
        round_timeout=120,
        node_wait_timeout=90,
        bundle_timeout=90,
        bundle_part_bytes=1 << 20,
        record_updates=True,
        tuning=TUNING,
    )
    plain = new_job(tmp_path / "job-plain", bundle, FedJobConfig(min_nodes=3, job_id="plain-job", **common))
    security = SecurityConfig(envelopes=True, keys_dir=str(keys_dir), registry=str(registry), max_update_norm=100.0)
    sealed = new_job(
        tmp_path / "job-sealed", bundle, FedJobConfig(min_nodes=5, job_id="sealed-job", security=security, **common)
    )

    with LocalFederation(tmp_path / "federation") as federation:
        federation.start_superlink()
        tap = WireTap(federation.superlink.port)
        try:
            honest = {name: (rows, index) for index, (name, rows) in enumerate(zip(HONEST, NUM_EXAMPLES, strict=True))}
            ids = start_owners(federation, tmp_path, honest, keys_dir, superlink=tap.address)
            run = federation.submit({"job-dir": plain})
            assert federation.wait(run, timeout=300) == "finished:completed", federation.logs(run)
            sent_plain = tap.take()

            ids |= start_owners(
                federation,
                tmp_path,
                {"mallory": (4, 7), "trudy": (4, 8)},
                keys_dir,
                superlink=tap.address,
                altered={"trudy": CRAFTED_HEADER_FROM_ROUND_2},
            )
            run = federation.submit({"job-dir": sealed})
            assert federation.wait(run, timeout=400) == "finished:completed", federation.logs(run)
            sent_sealed = tap.take()
            logs = federation.logs(run)
        finally:
            tap.close()

    # the plain job: weighted FedAvg of what the three owners sent
    assert_rounds_are_weighted_means(plain, rounds=2)

    state = json.loads((sealed / "state.json").read_text())
    honest_ids = sorted(ids[name] for name in HONEST)
    for round_number, record in enumerate(state["history"], 1):
        assert record["replied"] == honest_ids and not record["dropped"], record
        assert record["senders"] == {str(ids[name]): name for name in HONEST}
        trudy = "revoked-sender" if round_number == 1 else "malformed-header"  # round 2: the crafted header
        assert record["rejected"] == {str(ids["mallory"]): "unknown-sender", str(ids["trudy"]): trudy}
        assert record["failed"][str(ids["mallory"])].startswith(
            f"REJECTED: unknown-sender: update from node {ids['mallory']} (claims sender 'mallory')"
        )
        assert record["failed"][str(ids["trudy"])].startswith(
            "REJECTED: revoked-sender: update from sender 'trudy'"
            if round_number == 1
            else f"REJECTED: malformed-header: update from node {ids['trudy']}: header is not valid JSON (nested deeper"
        ), record["failed"]
        assert f"round {round_number}: node {ids['mallory']} failed: REJECTED: unknown-sender" in logs
        assert f"round {round_number}: node {ids['trudy']} failed: REJECTED: {trudy}" in logs
        # the aggregate is the weighted mean of the accepted updates only, weights from the sealed metadata
        accepted = sorted(path.name for path in update_path(sealed, round_number, 0).parent.iterdir())
        assert accepted == sorted(f"node-{node}.safetensors" for node in honest_ids)
        assert record["num_examples"] == {
            str(ids[name]): float(rows) for name, rows in zip(HONEST, NUM_EXAMPLES, strict=True)
        }
        updates = [load_update(update_path(sealed, round_number, node)) for node in honest_ids]
        expected = fedavg([(tensors, meta["num_examples"]) for tensors, meta in updates])
        got, _ = load_update(checkpoint_path(sealed, round_number))
        assert all(torch.equal(got[key], expected[key]) for key in expected)
        # the refused owners did send updates, which would have moved the aggregate
        hostile = [audit_copy(tmp_path, name, "sealed-job", round_number)[0] for name in ("mallory", "trudy")]
        with_hostile = fedavg(
            [(tensors, meta["num_examples"]) for tensors, meta in updates] + [(h, 4.0) for h in hostile]
        )
        assert any(not torch.allclose(with_hostile[key], got[key]) for key in got)

        # envelopes on: the same checkpoints, bit for bit, as the plain job
        plain_checkpoint, _ = load_update(checkpoint_path(plain, round_number))
        assert set(got) == set(plain_checkpoint)
        assert all(torch.equal(got[key], plain_checkpoint[key]) for key in got), f"round {round_number} differs"

        # on the wire: the plain job's updates in plaintext, the sealed job's never
        for node in honest_ids:
            plain_update, _ = load_update(update_path(plain, round_number, node))
            sealed_update, _ = load_update(update_path(sealed, round_number, node))
            assert all(torch.equal(plain_update[key], sealed_update[key]) for key in plain_update)
            assert any(window in sent_plain for window in windows(plain_update)), (
                "the relay saw no plaintext update in the plain job"
            )
            assert not any(window in sent_sealed for window in windows(sealed_update)), (
                f"node {node}'s update crossed in plaintext"
            )
        for tensors in hostile:
            assert not any(window in sent_sealed for window in windows(tensors))
    assert sent_sealed.count(MAGIC) >= 5 * 2  # an envelope from each of the 5 nodes, every round

    # raw training data never leaves a data owner: no row's text in anything a node sent, in either
    # job (the relay does see the plain job's cleartext: its metric names are there)
    assert b"train-loss" in sent_plain
    owners = dict(zip(HONEST, NUM_EXAMPLES, strict=True)) | {"mallory": 4, "trudy": 4}
    seeds = {name: index for index, name in enumerate(HONEST)} | {"mallory": 7, "trudy": 8}
    for name, rows in owners.items():
        for row in data_rows(rows, seeds[name]):
            for text in (row["prompt"], row["prompt"].strip()):
                assert text.encode() not in sent_plain and text.encode() not in sent_sealed, (
                    f"{name}'s row {text!r} crossed the wire"
                )
    assert MAGIC not in sent_plain
    assert (tmp_path / "job-sealed" / "replay.jsonl").read_text().count("\n") == 3 * 2  # accepted envelopes only

    # every data owner verified the coordinator's signature: the installed bundle carries it
    for name in (*HONEST, "mallory", "trudy"):
        (installed,) = (tmp_path / f"cache-{name}" / "bundles").iterdir()
        assert (installed / "manifest.sig").is_file()


def test_secure_aggregation_and_distributed_dp_on_flower(tmp_path):
    keys, keys_dir, registry = enrol(tmp_path, revoked=("trudy",))
    bundle = signed_bundle(tmp_path, keys)
    clip_range = 0.5
    common = dict(
        min_nodes=4,
        min_replies=3,
        round_timeout=120,
        node_wait_timeout=90,
        bundle_timeout=90,
        bundle_part_bytes=1 << 20,
        tuning=TUNING,
    )
    masked = new_job(
        tmp_path / "job-secagg",
        bundle,
        FedJobConfig(
            rounds=1,
            job_id="secagg-job",
            **common,
            security=SecurityConfig(
                envelopes=True,
                keys_dir=str(keys_dir),
                registry=str(registry),
                secure_aggregation=True,
                secagg_clip_range=clip_range,
            ),
        ),
    )
    dp_security = SecurityConfig(
        secure_aggregation=True,
        secagg_clip_range=clip_range,
        dp_clip_norm=0.05,
        dp_noise_multiplier=1.0,
        dp_mode="distributed",
        dp_delta=1e-5,
    )
    private = new_job(
        tmp_path / "job-dp", bundle, FedJobConfig(rounds=2, job_id="dp-job", **common, security=dp_security)
    )

    owners = {name: (rows, index) for index, (name, rows) in enumerate(zip(HONEST, NUM_EXAMPLES, strict=True))} | {
        "trudy": (4, 8)
    }
    with LocalFederation(tmp_path / "federation") as federation:
        federation.start_superlink()
        ids = start_owners(federation, tmp_path, owners, keys_dir)
        for job in (masked, private):
            run = federation.submit({"job-dir": job})
            assert federation.wait(run, timeout=600) == "finished:completed", federation.logs(run)

    def check_secure_aggregate(job, job_id: str, round_number: int, names: tuple[str, ...], record: dict) -> None:
        """The checkpoint is the previous global plus FedAvg of what ``names`` sent (their audit
        copies: the deltas before masking), within the stated quantisation bound."""
        previous, _ = load_update(checkpoint_path(job, round_number - 1))
        got, _ = load_update(checkpoint_path(job, round_number))
        sent = [audit_copy(tmp_path, name, job_id, round_number) for name in names]
        weights = [meta["weight"] for _, meta in sent]
        assert record["secagg"]["total_weight"] == sum(weights)
        config = SecAggConfig.for_job(
            b"x" * 32,
            state_dimension(previous),
            4,
            clip_range,
            max_weight=record["secagg"]["max_weight"],
            threshold=record["secagg"]["threshold"],
        )
        bound = quantisation_error_bound(
            clip_range, config.scale_bits, 4, bits=64, max_weight=record["secagg"]["max_weight"]
        )
        assert record["secagg"]["scale_bits"] == config.scale_bits and record["secagg"]["error_bound"] == bound
        assert bound < 1e-9
        for key, before in previous.items():
            deltas = [tensors[key] for tensors, _ in sent]
            assert all(
                float(delta.abs().max()) < clip_range for delta in deltas
            )  # inside the clip range: the bound applies
            mean = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(
                weights
            )  # plain FedAvg of the deltas, float64
            expected = before.double() + mean
            error = (got[key].double() - expected).abs()
            float32_rounding = expected.abs() * 2.0**-24
            assert bool((error <= bound + float32_rounding).all()), (
                f"{key}: max error {float(error.max()):.3g}, bound {bound:.3g}"
            )

    # secure aggregation with envelopes: the revoked owner's masked input is refused and unmasked out
    state = json.loads((masked / "state.json").read_text())
    (record,) = state["history"]
    honest_ids = sorted(ids[name] for name in HONEST)
    assert record["secagg"]["survivors"] == honest_ids and record["secagg"]["dropped"] == [ids["trudy"]]
    assert record["replied"] == honest_ids and record["rejected"] == {str(ids["trudy"]): "revoked-sender"}
    assert (
        record["num_examples"] == {} and record["train_loss"] == {}
    )  # individual weights and losses stay with the owners
    check_secure_aggregate(masked, "secagg-job", 1, HONEST, record)
    assert not (
        masked / "updates"
    ).exists()  # record_updates is refused with secure aggregation: nothing individual to keep

    # distributed DP over secure aggregation: equal weights, epsilon per round from the accountant
    state = json.loads((private / "state.json").read_text())
    accountant, epsilons = PrivacyAccountant(), []
    for round_number, record in enumerate(state["history"], 1):
        assert record["secagg"]["survivors"] == sorted(ids.values()) and record["secagg"]["max_weight"] == 1
        check_secure_aggregate(private, "dp-job", round_number, (*HONEST, "trudy"), record)
        accountant.step(1.0)
        assert record["privacy"]["epsilon"] == accountant.epsilon(1e-5) and record["privacy"]["rounds"] == round_number
        assert record["privacy"]["min_clients"] == 3 and record["privacy"]["mode"] == "distributed"
        epsilons.append(record["privacy"]["epsilon"])
        for name in (*HONEST, "trudy"):
            delta, meta = audit_copy(tmp_path, name, "dp-job", round_number)
            assert meta["dp"] and meta["weight"] == 1
            assert (
                sum(float(t.double().pow(2).sum()) for t in delta.values()) ** 0.5 > 0.05
            )  # clipped to 0.05, then noised
    assert epsilons[0] < epsilons[1]
    assert state["privacy"] == accountant.to_json()
