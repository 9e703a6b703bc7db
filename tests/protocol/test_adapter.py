import pytest
import torch

from offsite.protocol.adapter import UpdateError, load_update, save_update


def test_update_round_trip(tmp_path):
    tensors = {"blocks.0.w": torch.randn(3, 4), "blocks.29.b": torch.tensor(1.5), "blocks.1.h": torch.randn(2).half()}
    path = save_update(tmp_path / "u.safetensors", tensors, {"mode": "blocks", "lora_alpha": None})
    loaded, meta = load_update(path)
    assert meta["mode"] == "blocks"
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)


def test_garbage_and_pickles_are_refused(tmp_path):
    import pickle

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(UpdateError, match="evil.safetensors"):
        load_update(path)


def test_unknown_mode_is_refused(tmp_path):
    path = save_update(tmp_path / "u.safetensors", {"a": torch.zeros(1)}, {"mode": "weird"})
    with pytest.raises(UpdateError, match="mode"):
        load_update(path)
