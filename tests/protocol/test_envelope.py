"""Update envelopes: bit-exact round trips, RFC 9180 conformance, and a fuzz of hostile variants
that must all be refused, each with the reason its family calls for."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import random
import re
import secrets
from collections import Counter

import pytest
import torch

from offsite.protocol import hpke
from offsite.protocol.envelope import (
    DIGEST_CONTEXT,
    FORMAT,
    HPKE_INFO,
    MIN_CHUNK_BYTES,
    SUITE,
    Reason,
    Rejected,
    ReplayCache,
    UpdateOpener,
    UpdatePolicy,
    canonical_json,
    encode_payload,
    frame,
    max_envelope_bytes,
    seal_payload,
    seal_update,
    signed_message,
)
from offsite.protocol.envelope_wire import envelope_from_record, envelope_to_record
from offsite.protocol.keys import (
    ClientIdentity,
    CoordinatorKeys,
    SenderRegistry,
    fingerprint,
)

JOB = "job-7f3a"
ROUND = 4
NOW = 1_700_000_000.0
POLICY = UpdatePolicy(max_update_norm=1.0, max_clock_skew_s=300.0, max_age_s=3600.0)
PICKLE_BYTES = (
    b"\x80\x04\x95\n\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01x\x94K\x01s."  # a pickle of {'x': 1}, never loaded
)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reference_adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.self_attn.q_proj.weight": torch.randn(4, 3, generator=g),
        "blocks.0.mlp.up_proj.weight": torch.randn(5, generator=g).half(),
        "blocks.7.input_layernorm.weight": torch.randn(2, 2, generator=g).bfloat16(),
        "blocks.7.scale": torch.tensor(0.5),
    }


def nudged(reference: dict, scale: float = 0.01, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in reference.items()}


class World:
    """One coordinator, enrolled alice and bob, revoked dave, unenrolled carol, and a stranger coordinator."""

    def __init__(self) -> None:
        self.coordinator = CoordinatorKeys.generate()
        self.stranger = CoordinatorKeys.generate()
        self.alice, self.bob = ClientIdentity.generate("alice"), ClientIdentity.generate("bob")
        self.carol, self.dave = ClientIdentity.generate("carol"), ClientIdentity.generate("dave")
        self.registry = SenderRegistry()
        for identity in (self.alice, self.bob, self.dave):
            self.registry.register(identity.sender_id, identity.public_key)
        self.registry.revoke("dave")
        self.reference = reference_adapter()
        self.clock = Clock()

    def opener(
        self, round: int = ROUND, policy: UpdatePolicy = POLICY, replay: ReplayCache | None = None
    ) -> UpdateOpener:
        return UpdateOpener(self.coordinator, self.registry, JOB, round, self.reference, policy, replay, self.clock)

    def seal(
        self, tensors=None, identity=None, job=JOB, round=ROUND, recipient=None, clock=None, metadata=None, seed=1
    ) -> bytes:
        return seal_update(
            nudged(self.reference, seed=seed) if tensors is None else tensors,
            job=job,
            round=round,
            identity=identity or self.alice,
            recipient=recipient or self.coordinator.public(),
            metadata=metadata,
            clock=clock or self.clock,
        )

    def craft(
        self,
        plaintext: bytes,
        *,
        identity=None,
        encrypt_to=None,
        aad=None,
        digest=None,
        enc=None,
        info=HPKE_INFO,
        header: bytes | None = None,
        **fields,
    ) -> bytes:
        """An envelope built by hand and validly signed: what a buggy or hostile *enrolled* sender can send."""
        identity = identity or self.alice
        enc_raw, context = hpke.setup_base_sender(encrypt_to or self.coordinator.public().encryption_key, info)
        values = {
            "format": FORMAT,
            "suite": SUITE,
            "job": JOB,
            "round": ROUND,
            "sender": identity.sender_id,
            "recipient": fingerprint(self.coordinator.public().encryption_key),
            "message_id": secrets.token_hex(16),
            "timestamp_ms": int(self.clock() * 1000),
            "enc": base64.b64encode(enc or enc_raw).decode(),
            "plaintext_bytes": len(plaintext),
            "chunk_bytes": MIN_CHUNK_BYTES,
            "payload_digest": digest
            or hmac.new(context.export(DIGEST_CONTEXT, 32), plaintext, hashlib.sha256).hexdigest(),
        }
        values.update(fields)
        header_bytes = canonical_json(values) if header is None else header
        ciphertext = b"".join(
            context.seal(header_bytes if aad is None else aad, plaintext[i : i + MIN_CHUNK_BYTES])
            for i in range(0, max(len(plaintext), 1), MIN_CHUNK_BYTES)
        )
        return frame(header_bytes, ciphertext, identity.signing_key.sign(signed_message(header_bytes, ciphertext)))


def split(data: bytes) -> tuple[bytes, bytes, bytes]:
    length = int.from_bytes(data[8:12], "big")
    return data[12 : 12 + length], data[12 + length : -64], data[-64:]


def resign(data: bytes, identity: ClientIdentity, edit=lambda header: header) -> bytes:
    header, ciphertext, _ = split(data)
    header = edit(header)
    return frame(header, ciphertext, identity.signing_key.sign(signed_message(header, ciphertext)))


def set_field(name, value):
    return lambda header: canonical_json({**json.loads(header), name: value})


def flip(data: bytes, position: int, bit: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def raw_bits(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture
def world() -> World:
    return World()


# ---------------------------------------------------------------- round trips

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]
SHAPES = [(), (0,), (1,), (3,), (2, 3, 4)]


def _sample(dtype: torch.dtype, shape: tuple, g: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        values = torch.randn(shape, generator=g).to(dtype)
        if values.numel() > 2:  # signed zero and a subnormal: bit-exactness, not just equality
            values.view(-1)[0] = -0.0
            values.view(-1)[1] = torch.finfo(dtype).tiny / 2
        return values
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    low, high = (0, 256) if dtype == torch.uint8 else (-(2**31), 2**31 - 1)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact_for_every_dtype_and_0_dim(world, dtype):
    g = torch.Generator().manual_seed(3)
    update = {f"blocks.{i}.t": _sample(dtype, shape, g) for i, shape in enumerate(SHAPES)}
    reference = {key: torch.zeros_like(tensor) for key, tensor in update.items()}
    opener = UpdateOpener(world.coordinator, world.registry, JOB, ROUND, reference, UpdatePolicy(), clock=world.clock)
    envelope = world.seal(update, metadata={"num-examples": 12, "train-loss": 1.25})
    opened = opener.open(envelope, node=3)
    assert set(opened.tensors) == set(update)
    for key, tensor in update.items():
        assert opened.tensors[key].dtype == tensor.dtype and tuple(opened.tensors[key].shape) == tuple(tensor.shape), (
            key
        )
        assert raw_bits(opened.tensors[key]) == raw_bits(tensor), key
    assert opened.metadata == {"num-examples": 12, "train-loss": 1.25}
    assert (opened.sender, opened.round) == ("alice", ROUND)


def test_round_trip_across_chunk_boundaries(world):
    """Payloads of exactly k chunks, k chunks +- 1 byte, and many chunks all open bit-exactly."""
    for target in (
        MIN_CHUNK_BYTES - 1,
        MIN_CHUNK_BYTES,
        MIN_CHUNK_BYTES + 1,
        2 * MIN_CHUNK_BYTES,
        5 * MIN_CHUNK_BYTES + 7,
    ):
        length = target - 200
        for _ in range(5):  # the safetensors header's size depends on the length's digits
            payload = encode_payload({"x": torch.zeros(length, dtype=torch.uint8)})
            if len(payload) == target:
                break
            length += target - len(payload)
        assert len(payload) == target
        values = torch.randint(0, 256, (length,), dtype=torch.uint8, generator=torch.Generator().manual_seed(target))
        reference = {"x": torch.zeros(length, dtype=torch.uint8)}
        opener = UpdateOpener(world.coordinator, world.registry, JOB, ROUND, reference, clock=world.clock)
        envelope = seal_payload(
            encode_payload({"x": values}),
            job=JOB,
            round=ROUND,
            identity=world.bob,
            recipient=world.coordinator.public(),
            clock=world.clock,
            chunk_bytes=MIN_CHUNK_BYTES,
        )
        assert torch.equal(opener.open(envelope).tensors["x"], values)


def test_hpke_agrees_with_cryptography_rfc9180():
    """Our HPKE base mode interoperates with cryptography's RFC 9180 implementation, both ways."""
    suites = pytest.importorskip("cryptography.hazmat.primitives.hpke")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    suite = suites.Suite(suites.KEM.X25519, suites.KDF.HKDF_SHA256, suites.AEAD.AES_256_GCM)
    recipient = X25519PrivateKey.generate()
    for message in (b"", b"x", bytes(range(256)) * 300):
        enc, context = hpke.setup_base_sender(recipient.public_key(), b"info")
        assert suite.decrypt(enc + context.seal(b"", message), recipient, info=b"info") == message
        blob = suite.encrypt(message, recipient.public_key(), info=b"other info")
        assert (
            hpke.setup_base_recipient(blob[: hpke.N_ENC], recipient, b"other info").open(b"", blob[hpke.N_ENC :])
            == message
        )
    with_aad = getattr(getattr(suites, "rust_openssl", None), "hpke", None)
    if with_aad is not None and hasattr(with_aad, "_encrypt_with_aad"):  # cryptography's (private) AAD entry point
        blob = with_aad._encrypt_with_aad(suite, b"payload", recipient.public_key(), info=b"i", aad=b"header")
        assert hpke.setup_base_recipient(blob[:32], recipient, b"i").open(b"header", blob[32:]) == b"payload"
        with pytest.raises(hpke.HPKEError):
            hpke.setup_base_recipient(blob[:32], recipient, b"i").open(b"other header", blob[32:])


def test_only_accepted_updates_reach_the_aggregate(world, caplog):
    """A stream of good and hostile envelopes: exactly the good ones come out of the opener."""
    opener = world.opener()
    good = {"alice": nudged(world.reference, seed=5), "bob": nudged(world.reference, seed=6)}
    stream = [
        world.seal(good["alice"], identity=world.alice),
        world.seal(identity=world.carol),
        flip(world.seal(identity=world.bob), 300, 2),
        world.seal(good["bob"], identity=world.bob),
        world.seal(identity=world.alice, seed=9),  # a second update from alice this round
        world.seal({k: v.clone().fill_(float("nan")) for k, v in world.reference.items()}, identity=world.bob),
    ]
    aggregate_inputs = {}
    for node, envelope in enumerate(stream):
        try:
            opened = opener.open(envelope, node=node)
        except Rejected:
            continue
        aggregate_inputs[opened.sender] = opened.tensors
    assert set(aggregate_inputs) == {"alice", "bob"}
    for sender, tensors in aggregate_inputs.items():
        assert all(raw_bits(tensors[k]) == raw_bits(good[sender][k]) for k in tensors)


def test_rejection_log_line_names_the_client(world, caplog):
    caplog.set_level(logging.WARNING, logger="offsite.protocol.envelope")
    with pytest.raises(Rejected) as info:
        world.opener().open(world.seal(round=ROUND - 1, identity=world.bob), node=17)
    assert info.value.reason is Reason.STALE_ROUND and info.value.sender == "bob"
    assert "'bob'" in str(info.value) and "node 17" in str(info.value)
    assert any(
        "stale-round" in r.getMessage() and "'bob'" in r.getMessage() and "node 17" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(Rejected, match="node 18"):
        world.opener().open(b"garbage", node=18)


def test_timestamp_window_uses_the_injected_clock(world):
    inside_old = world.seal(clock=Clock(NOW - POLICY.max_age_s + 1))
    inside_new = world.seal(clock=Clock(NOW + POLICY.max_clock_skew_s - 1), identity=world.bob)
    opener = world.opener()
    opener.open(inside_old)
    opener.open(inside_new)
    for clock in (Clock(NOW - POLICY.max_age_s - 1), Clock(NOW + POLICY.max_clock_skew_s + 1)):
        with pytest.raises(Rejected) as info:
            world.opener().open(world.seal(clock=clock))
        assert info.value.reason is Reason.TIMESTAMP


def test_replay_cache_survives_a_restart_and_rounds_move_on(world, tmp_path):
    path = tmp_path / "replay.jsonl"
    envelope = world.seal()
    first = world.opener(replay=ReplayCache(path))
    first.open(envelope)
    with pytest.raises(Rejected) as info:
        world.opener(replay=ReplayCache(path)).open(envelope)
    assert info.value.reason is Reason.REPLAYED
    following = first.for_round(ROUND + 1, world.reference)
    assert following.open(world.seal(round=ROUND + 1)).round == ROUND + 1
    with pytest.raises(Rejected) as info:
        following.open(envelope)
    assert info.value.reason is Reason.STALE_ROUND


def test_a_sender_cannot_burn_another_senders_message_id(world):
    """Message ids are remembered per sender: bob reusing alice's (visible) id does not block alice."""
    envelope = world.seal()
    stolen = split(envelope)[0]
    message_id = json.loads(stolen)["message_id"]
    opener = world.opener()
    opener.open(world.craft(encode_payload(nudged(world.reference)), identity=world.bob, message_id=message_id))
    assert opener.open(envelope).message_id == message_id


def test_update_norm_is_distance_from_the_reference(world):
    update = {k: v.clone() for k, v in world.reference.items()}
    update["blocks.0.self_attn.q_proj.weight"][0, 0] += 0.6
    update["blocks.7.scale"] = update["blocks.7.scale"] - 0.7
    opened = world.opener().open(world.seal(update))
    assert math.isclose(opened.update_norm, math.sqrt(0.6**2 + 0.7**2), rel_tol=1e-6)
    update["blocks.7.scale"] = update["blocks.7.scale"] - 0.2  # sqrt(0.36 + 0.81) > 1
    with pytest.raises(Rejected) as info:
        world.opener().open(world.seal(update, identity=world.bob))
    assert info.value.reason is Reason.NORM_EXCEEDED
    huge = {k: v.clone() for k, v in world.reference.items()}
    huge["blocks.0.self_attn.q_proj.weight"].fill_(3e38)  # finite, but float32 squares overflow
    with pytest.raises(Rejected) as info:
        world.opener().open(world.seal(huge))
    assert info.value.reason is Reason.NORM_EXCEEDED


# ---------------------------------------------------------------- the fuzz

HEADER_FLIP = {
    Reason.MALFORMED_HEADER,
    Reason.UNSUPPORTED,
    Reason.OVERSIZED,
    Reason.MALFORMED_FRAME,
    Reason.UNKNOWN_SENDER,
    Reason.BAD_SIGNATURE,
}
ANYWHERE = HEADER_FLIP | {Reason.MALFORMED_FRAME}


def test_fuzz_hostile_envelopes_are_all_refused(world, tmp_path, caplog):
    """>= 1000 hostile variants; 0 accepted; each refused with its family's reason; every reason reached."""
    caplog.set_level(logging.WARNING, logger="offsite.protocol.envelope")
    rng = random.Random(20240501)
    torch.manual_seed(0)
    tally, reasons, accepted = Counter(), Counter(), []

    def expect(family: str, data, allowed: set, opener: UpdateOpener | None = None) -> None:
        try:
            (opener or world.opener()).open(data, node=f"fuzz-{family}")
        except Rejected as error:
            assert error.reason in allowed, (
                f"{family}: got {error.reason}, expected one of {sorted(r.value for r in allowed)}: {error}"
            )
            assert f"fuzz-{family}" in str(error)
            tally[family] += 1
            reasons[error.reason] += 1
            return
        accepted.append(family)

    valid = world.seal()
    world.opener().open(valid)  # the base envelope itself is fine
    header, ciphertext, _ = split(valid)
    header_end, ciphertext_end = 12 + len(header), 12 + len(header) + len(ciphertext)

    # bit flips: the frame prefix (every bit), the header, the ciphertext, the signature, anywhere
    for position in range(12):
        for bit in range(8):
            expect("flip-prefix", flip(valid, position, bit), {Reason.MALFORMED_FRAME, Reason.MALFORMED_HEADER})
    for _ in range(250):
        expect("flip-header", flip(valid, rng.randrange(12, header_end), rng.randrange(8)), HEADER_FLIP)
    for _ in range(250):
        expect(
            "flip-ciphertext",
            flip(valid, rng.randrange(header_end, ciphertext_end), rng.randrange(8)),
            {Reason.BAD_SIGNATURE},
        )
    for _ in range(150):
        expect(
            "flip-signature",
            flip(valid, rng.randrange(ciphertext_end, len(valid)), rng.randrange(8)),
            {Reason.BAD_SIGNATURE},
        )
    for _ in range(60):
        data = valid
        for _ in range(rng.randint(2, 8)):
            data = flip(data, rng.randrange(len(data)), rng.randrange(8))
        expect("flip-many", data, ANYWHERE)

    # truncation and extension
    for cut in [0, 1, 11, 12, header_end, ciphertext_end, len(valid) - 1] + [
        rng.randrange(len(valid)) for _ in range(100)
    ]:
        expect("truncate", valid[:cut], {Reason.MALFORMED_FRAME})
    for _ in range(60):
        expect("extend", valid + rng.randbytes(rng.randint(1, 4096)), {Reason.MALFORMED_FRAME})
    expect("extend", valid + valid, {Reason.MALFORMED_FRAME})
    for thing in ("a string", None, 12345, [1, 2]):
        expect("not-bytes", thing, {Reason.MALFORMED_FRAME})

    # oversize: the envelope itself, the payload it declares, a tight job limit
    limit = max_envelope_bytes(world.opener().max_payload_bytes)
    for extra in (limit, limit + 1, 2 * limit):
        expect("oversize-envelope", valid + bytes(extra), {Reason.OVERSIZED})
    for size in (40_000, 100_000, 1_000_000):
        big = {**nudged(world.reference), "blocks.0.self_attn.q_proj.weight": torch.zeros(size, 3)}
        expect("oversize-payload", world.seal(big), {Reason.OVERSIZED})
    for limit_bytes in range(8, 408, 40):
        expect(
            "oversize-policy",
            valid,
            {Reason.OVERSIZED},
            world.opener(policy=UpdatePolicy(max_payload_bytes=limit_bytes)),
        )
    expect("oversize-declared", world.craft(b"x", plaintext_bytes=1 << 40), {Reason.OVERSIZED})

    # keys: the wrong recipient, a forged recipient, swapped and unknown senders
    for seed in range(20):
        expect("wrong-recipient", world.seal(recipient=world.stranger.public(), seed=seed), {Reason.WRONG_RECIPIENT})
    payload = encode_payload(nudged(world.reference))
    for _ in range(10):
        expect(
            "forged-recipient",
            world.craft(payload, encrypt_to=world.stranger.public().encryption_key),
            {Reason.DECRYPTION_FAILED},
        )
    for seed in range(20):
        mine = world.seal(seed=seed)
        expect("sender-swap-resigned", resign(mine, world.bob, set_field("sender", "bob")), {Reason.DECRYPTION_FAILED})
        header, ciphertext, signature = split(mine)
        expect(
            "sender-swap-unsigned",
            frame(set_field("sender", "bob")(header), ciphertext, signature),
            {Reason.BAD_SIGNATURE},
        )
        expect("signed-by-other", resign(mine, world.bob), {Reason.BAD_SIGNATURE})
        expect("signed-by-stranger", resign(mine, world.carol), {Reason.BAD_SIGNATURE})
    for seed in range(10):
        expect("unknown-sender", world.seal(identity=world.carol, seed=seed), {Reason.UNKNOWN_SENDER})
        expect("revoked-sender", world.seal(identity=world.dave, seed=seed), {Reason.REVOKED_SENDER})

    # replay, duplicates, rounds, job, clock
    for index in range(20):
        opener = world.opener()
        envelope = world.seal(seed=index, identity=world.bob if index % 2 else world.alice)
        opener.open(envelope)
        expect("replay", envelope, {Reason.REPLAYED}, opener)
        expect("replay-next-round", envelope, {Reason.STALE_ROUND}, opener.for_round(ROUND + 1, world.reference))
        expect(
            "duplicate-sender",
            world.seal(seed=index + 100, identity=world.bob if index % 2 else world.alice),
            {Reason.DUPLICATE_SENDER},
            opener,
        )
    path = tmp_path / "replay.jsonl"
    for index in range(10):
        envelope = world.seal(seed=index)
        world.opener(replay=ReplayCache(path)).open(envelope)
        expect("replay-after-restart", envelope, {Reason.REPLAYED}, world.opener(replay=ReplayCache(path)))
    for _ in range(15):
        expect("stale-round", world.seal(round=rng.randint(1, ROUND - 1)), {Reason.STALE_ROUND})
        expect("future-round", world.seal(round=rng.randint(ROUND + 1, 10**6)), {Reason.FUTURE_ROUND})
        expect("wrong-job", world.seal(job=f"job-{rng.randrange(10**9)}"), {Reason.WRONG_JOB})
    for _ in range(10):
        expect("too-old", world.seal(clock=Clock(NOW - POLICY.max_age_s - rng.uniform(1, 1e7))), {Reason.TIMESTAMP})
        expect(
            "from-the-future",
            world.seal(clock=Clock(NOW + POLICY.max_clock_skew_s + rng.uniform(1, 1e7))),
            {Reason.TIMESTAMP},
        )

    # validly sealed and signed, bad content: values, shapes, dtypes, keys, norm, payload
    floating = list(world.reference)
    for _ in range(60):
        update = nudged(world.reference, seed=rng.randrange(1000))
        key = rng.choice(floating)
        update[key].view(-1)[rng.randrange(update[key].numel())] = rng.choice(
            [float("nan"), float("inf"), float("-inf")]
        )
        expect("non-finite", world.seal(update), {Reason.NON_FINITE})
    for _ in range(20):
        update = nudged(world.reference, seed=rng.randrange(1000))
        key = rng.choice(floating)
        update[key] = rng.choice(
            [
                update[key].unsqueeze(0),
                update[key].reshape(-1)[:-1] if update[key].numel() > 1 else update[key].reshape(1),
                torch.zeros(7, dtype=update[key].dtype),
            ]
        )
        expect("wrong-shape", world.seal(update), {Reason.WRONG_SHAPE})
    for _ in range(20):
        update = nudged(world.reference, seed=rng.randrange(1000))
        key = rng.choice(floating)
        update[key] = update[key].to(
            rng.choice(
                [
                    d
                    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32)
                    if d != update[key].dtype
                ]
            )
        )
        expect("wrong-dtype", world.seal(update), {Reason.WRONG_DTYPE})
    for index in range(20):
        update = nudged(world.reference, seed=index)
        key = rng.choice(floating)
        edit = index % 3
        if edit == 0:
            del update[key]
        elif edit == 1:
            update["blocks.9.extra"] = torch.zeros(2)
        else:
            update[key + ".renamed"] = update.pop(key)
        expect("wrong-keys", world.seal(update), {Reason.WRONG_KEYS})
    for index in range(20):
        expect(
            "norm-above-bound",
            world.seal(nudged(world.reference, scale=0.5 + index, seed=index)),
            {Reason.NORM_EXCEEDED},
        )
    safetensors_ok = encode_payload(nudged(world.reference))
    payloads = [
        b"",
        b"\x00" * 8,
        PICKLE_BYTES,
        rng.randbytes(300),
        safetensors_ok[:-3],
        safetensors_ok[:20],
        b"\xff" * 8 + safetensors_ok,
        encode_payload(nudged(world.reference), metadata=None)[:8] + b"[]" + b" " * 100,
    ]
    from safetensors.torch import save

    payloads += [
        save(nudged(world.reference), metadata={"offsite": "{not json"}),
        save(nudged(world.reference), metadata={"offsite": "[1, 2]"}),
        save(nudged(world.reference), metadata={"offsite": "{}", "other": "x"}),
        save(nudged(world.reference), metadata={"offsite": '{"a": NaN}'}),
    ]
    for plaintext in payloads:
        for _ in range(2):
            expect("malformed-payload", world.craft(plaintext), {Reason.MALFORMED_PAYLOAD})
    for _ in range(5):
        expect("digest-mismatch", world.craft(payload, digest=rng.randbytes(32).hex()), {Reason.DIGEST_MISMATCH})
        expect(
            "digest-mismatch",
            world.craft(payload, digest=hashlib.sha256(payload).hexdigest()),
            {Reason.DIGEST_MISMATCH},
        )
        expect("wrong-aad", world.craft(payload, aad=b""), {Reason.DECRYPTION_FAILED})
        expect("wrong-info", world.craft(payload, info=b"offsite-envelope/0"), {Reason.DECRYPTION_FAILED})
        expect("low-order-enc", world.craft(payload, enc=bytes(32)), {Reason.DECRYPTION_FAILED})
        expect("low-order-enc", world.craft(payload, enc=bytes([1]) + bytes(31)), {Reason.DECRYPTION_FAILED})

    # headers an enrolled sender signed that are still not valid headers
    good = json.loads(split(world.craft(payload))[0])
    bad_headers = [
        json.dumps(good).encode(),  # not canonical (spaces)
        canonical_json({**good, "extra": 1}),
        canonical_json({k: v for k, v in good.items() if k != "message_id"}),
        canonical_json(good).replace(b'"round":4', b'"round":4.0'),
        canonical_json(good).replace(b'"round":4', b'"round":true'),
        canonical_json(good).replace(b'"round":4', b'"round":NaN'),
        canonical_json(good).replace(b'"round":4', b'"round":4,"round":4'),
        canonical_json({**good, "round": 0}),
        canonical_json({**good, "round": -1}),
        canonical_json({**good, "round": 2**31}),
        canonical_json({**good, "message_id": good["message_id"].upper()}),
        canonical_json({**good, "message_id": good["message_id"][:-1]}),
        canonical_json({**good, "enc": "not base64!"}),
        canonical_json({**good, "enc": base64.b64encode(bytes(31)).decode()}),
        canonical_json({**good, "job": "../job"}),
        canonical_json({**good, "sender": "al ice"}),
        canonical_json({**good, "chunk_bytes": 1}),
        canonical_json({**good, "plaintext_bytes": -1}),
        canonical_json({**good, "payload_digest": "ab"}),
        b"[]",
        b"null",
        b"\xff\xfe",
        b'{"format": "offsite-envelope/1"',
    ]
    for bad in bad_headers:
        expect("malformed-header-signed", world.craft(payload, header=bad), {Reason.MALFORMED_HEADER})
    for fields in (
        {"format": "offsite-envelope/2"},
        {"suite": SUITE.replace("AES-256-GCM", "ChaCha20Poly1305")},
        {"format": None},
        {"suite": ""},
    ):
        for _ in range(3):
            expect("unsupported", world.craft(payload, **fields), {Reason.UNSUPPORTED})

    assert accepted == [], f"accepted hostile variants: {Counter(accepted)}"
    total = sum(tally.values())
    assert total >= 1000, total
    assert set(reasons) == set(Reason), f"never produced: {sorted(r.value for r in set(Reason) - set(reasons))}"
    logged = Counter(
        re.search(r"node fuzz-([a-z-]+)", r.getMessage()).group(1)
        for r in caplog.records
        if "rejected update from" in r.getMessage()
    )
    assert logged == tally


def test_envelope_travels_in_a_flower_record_in_parts(world):
    import numpy as np
    from flwr.app import Array, ArrayRecord

    envelope = world.seal()
    limit = max_envelope_bytes(world.opener().max_payload_bytes)
    record = envelope_to_record(envelope, part_bytes=100)
    assert len(record) == -(-len(envelope) // 100)
    assert world.opener().open(envelope_from_record(record, limit, node=2), node=2).sender == "alice"
    hostile = [
        (ArrayRecord({"part-1": Array(np.zeros(3, dtype=np.uint8))}), Reason.MALFORMED_FRAME),
        (ArrayRecord({"part-0": Array(np.zeros(3, dtype=np.float32))}), Reason.MALFORMED_FRAME),
        (ArrayRecord({"part-0": Array(np.zeros((2, 2), dtype=np.uint8))}), Reason.MALFORMED_FRAME),
        (envelope_to_record(bytes(limit + 1), part_bytes=limit // 2), Reason.OVERSIZED),
        ("not a record", Reason.MALFORMED_FRAME),
    ]
    for bad, reason in hostile:
        with pytest.raises(Rejected) as info:
            envelope_from_record(bad, limit, node=2)
        assert info.value.reason is reason and "node 2" in str(info.value)


def safetensors_bytes(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def test_parser_bombs_anywhere_in_an_envelope_are_refused_with_a_reason(world, caplog):
    """Nesting deeper than the interpreter's recursion limit, integers past its digit limit and
    floats that overflow, in the header (signed by an enrolled sender, or not signed at all), the
    safetensors header and the sealed metadata: each one a :class:`Rejected` with its reason and
    the node named, never a RecursionError or a bare ValueError out of ``open``."""
    caplog.set_level(logging.WARNING, logger="offsite.protocol.envelope")
    payload = encode_payload(nudged(world.reference))
    good = json.loads(split(world.craft(payload))[0])
    headers = [
        b"[" * 1000,
        b"[" * 1500,
        b"[" * 4096,
        b"[" * 2000 + b"]" * 2000,
        b"[" * 65 + b"]" * 65,
        b'{"a":' * 800,
        b'{"round":' + b"9" * 4000 + b"}",
        canonical_json({**good, "round": 10**100}),
        canonical_json(good).replace(b'"round":4', b'"round":1e999'),
        canonical_json(good).replace(b'"job":"job-7f3a"', b'"job":"\\udc80"'),  # a lone surrogate
    ]
    cases = [
        (f"signed-header-{i}", world.craft(payload, header=header), Reason.MALFORMED_HEADER)
        for i, header in enumerate(headers)
    ]
    cases += [
        (f"unsigned-header-{i}", frame(header, b"", bytes(64)), Reason.MALFORMED_HEADER)
        for i, header in enumerate(headers[:7])
    ]
    entry = b'{"dtype":"F32","shape":[%s],"data_offsets":[0,4]}'
    plaintexts = [
        safetensors_bytes(b"[" * 100_000),
        safetensors_bytes(b'{"a":' * 20_000),
        safetensors_bytes(b'{"t":' + entry % (b"9" * 5000) + b"}"),
        safetensors_bytes(b'{"t":' + entry % b"1e999" + b"}"),
        safetensors_bytes(b'{"t":' + (entry % b"1").replace(b"[0,4]", b"[0," + b"4" * 5000 + b"]") + b"}"),
    ]
    from safetensors.torch import save

    for meta in (
        "[" * 5000,
        '{"a":' * 3000,
        '{"train-loss": 1e999}',
        '{"num-examples": ' + "9" * 5000 + "}",
        "[" * 65 + "]" * 65,
    ):
        plaintexts.append(save(nudged(world.reference), metadata={"offsite": meta}))
    cases += [
        (f"payload-{i}", world.craft(plaintext), Reason.MALFORMED_PAYLOAD) for i, plaintext in enumerate(plaintexts)
    ]

    for name, data, reason in cases:
        with pytest.raises(Rejected) as caught:
            world.opener().open(data, node=f"bomb-{name}")
        assert caught.value.reason is reason, f"{name}: {caught.value}"
        assert f"bomb-{name}" in str(caught.value)
    logged = [r.getMessage() for r in caplog.records if "rejected update from" in r.getMessage()]
    assert len(logged) == len(cases) == 27
    assert all(any(f"bomb-{name}:" in line or f"bomb-{name})" in line for line in logged) for name, _, _ in cases)
    assert world.opener().open(world.craft(payload)).sender == "alice"  # the same sender, well-formed: accepted
