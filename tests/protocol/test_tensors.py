import pytest
import torch

from offsite.protocol.tensors import check_like


class Refused(ValueError):
    pass


def test_check_like_accepts_a_match_and_names_what_is_wrong():
    reference = {"blocks.0.w": torch.zeros(2, 3), "blocks.0.b": torch.zeros(3)}
    check_like(
        {"blocks.0.w": torch.ones(2, 3), "blocks.0.b": torch.ones(3, dtype=torch.float16)},
        reference,
        Refused,
        finite=True,
    )
    cases = [
        ({"blocks.0.w": torch.ones(2, 3)}, {}, r"node 7: unexpected tensors \[\], missing \['blocks.0.b'\]"),
        ({**reference, "evil": torch.ones(1)}, {}, r"unexpected tensors \['evil'\]"),
        ({**reference, "blocks.0.b": torch.ones(4)}, {}, r"tensor 'blocks.0.b': shape \(4,\), expected \(3,\)"),
        (
            {**reference, "blocks.0.b": torch.ones(3, dtype=torch.int64)},
            {"floating": True},
            "non-float dtype torch.int64",
        ),
        (
            {**reference, "blocks.0.b": torch.tensor([0.0, float("inf"), 0.0])},
            {"finite": True},
            "'blocks.0.b': non-finite",
        ),
        ({**reference, "blocks.0.w": torch.full((2, 3), float("nan"))}, {"finite": True}, "'blocks.0.w': non-finite"),
    ]
    for state, flags, message in cases:
        with pytest.raises(Refused, match=f"^node 7: .*{message}" if not message.startswith("node") else message):
            check_like(state, reference, Refused, "node 7", **flags)
    # without the flags, dtype and values are the caller's business
    check_like({**reference, "blocks.0.b": torch.tensor([0, 1, 2])}, reference)
    with pytest.raises(ValueError, match=r"tensor 'blocks.3.b': shape"):
        check_like({"b": torch.ones(4)}, {"b": torch.zeros(3)}, prefix="blocks.3.")
