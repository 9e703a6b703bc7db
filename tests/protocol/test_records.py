import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from offsite.protocol.records import RAW_STYPE, RecordError, state_from_record, state_to_record


def sample_state(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.self_attn.q_proj.weight": torch.randn(8, 4, generator=generator).to(dtype),
        "blocks.0.input_layernorm.weight": torch.randn(4, generator=generator).to(dtype),
        "blocks.7.scalar": torch.randn((), generator=generator).to(dtype),  # 0-dim
        "blocks.7.empty": torch.zeros(0, 3, dtype=dtype),
    }


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]
)
def test_round_trip_is_exact(dtype):
    state = sample_state(dtype)
    back = state_from_record(state_to_record(state))
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert back[key].dtype == dtype, key
        assert back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key


def test_round_trip_through_the_wire_format():
    """Deflate/inflate as Flower does when the record crosses the network."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    state = sample_state(torch.bfloat16, seed=1) | {"f32": torch.randn(3, 3)}
    record = state_to_record(state)
    content = RecordDict({"adapter": record})
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    rebuilt = inflate_object_from_contents(content.object_id, objects, keep_object_contents=False)
    back = state_from_record(rebuilt["adapter"])
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key


def test_numpy_dtypes_use_flowers_standard_format():
    record = state_to_record({"w": torch.ones(2, 2, dtype=torch.float16)})
    assert record["w"].stype == "numpy.ndarray"
    assert record.to_numpy_ndarrays()[0].dtype == np.float16  # readable by any Flower tooling


def test_bfloat16_travels_raw():
    record = state_to_record({"w": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)})
    assert record["w"].stype == RAW_STYPE and record["w"].dtype == "bfloat16"
    assert len(record["w"].data) == 4


def test_accepts_flowers_own_encoding():
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    back = state_from_record(ArrayRecord(state))
    assert torch.equal(back["a"], state["a"])


def test_decoded_tensors_do_not_alias_the_record():
    record = state_to_record({"w": torch.zeros(3)})
    back = state_from_record(record)
    back["w"].add_(1)
    assert torch.equal(state_from_record(record)["w"], torch.zeros(3))


def test_rejects_truncated_raw_payload_naming_the_key():
    record = state_to_record({"blocks.1.w": torch.ones(4, dtype=torch.bfloat16)})
    bad = record["blocks.1.w"]
    record["blocks.1.w"] = Array(dtype=bad.dtype, shape=bad.shape, stype=bad.stype, data=bad.data[:-2])
    with pytest.raises(RecordError, match=r"blocks\.1\.w"):
        state_from_record(record)


def test_rejects_header_payload_mismatch_naming_the_key():
    record = state_to_record({"blocks.2.w": torch.ones(4)})
    good = record["blocks.2.w"]
    record["blocks.2.w"] = Array(dtype="float32", shape=(2, 2), stype=good.stype, data=good.data)
    with pytest.raises(RecordError, match=r"blocks\.2\.w"):
        state_from_record(record)


def test_rejects_unknown_serialisation_and_garbage():
    record = ArrayRecord()
    record["x"] = Array(dtype="float32", shape=(1,), stype="pickle", data=b"\x80\x04")
    with pytest.raises(RecordError, match="unknown serialisation"):
        state_from_record(record)
    record = ArrayRecord()
    record["y"] = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"not npy")
    with pytest.raises(RecordError, match="'y'"):
        state_from_record(record)


def test_rejects_pickled_object_arrays():
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    record = ArrayRecord()
    record["obj"] = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    with pytest.raises(RecordError, match="'obj'"):
        state_from_record(record)
