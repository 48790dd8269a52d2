"""Policy JSON: the format users write by hand and agents emit."""

from __future__ import annotations

import pytest

from compression.policy import LayerPolicy, Policy, PolicyError


def test_round_trip_and_stable_hash() -> None:
    raw = {
        "default": {"width": 0.5},
        "layers": {
            "conv1": {"scheme": "nm", "nm": [2, 4], "bits": 8},
            "fc": {"scheme": "block", "block": 8, "sparsity": 0.5},
        },
        "skip": ["layer2.1"],
    }
    p = Policy.from_dict(raw)
    again = Policy.from_json(p.to_json())
    assert again == p
    assert again.hash == p.hash and len(p.hash) == 16
    assert Policy.from_dict({"default": {"width": 0.5}}).hash != p.hash


def test_named_layer_overrides_default_field_by_field() -> None:
    p = Policy.from_dict({"default": {"width": 0.5, "bits": 8}, "layers": {"fc": {"width": 1.0}}})
    assert p.for_layer("fc") == LayerPolicy(width=1.0, bits=8)
    assert p.for_layer("other") == LayerPolicy(width=0.5, bits=8)


def test_channel_scheme_is_width() -> None:
    p = Policy.from_dict({"default": {"scheme": "channel", "sparsity": 0.25}})
    assert p.default.width == pytest.approx(0.75) and p.default.scheme == "dense"


def test_irrelevant_fields_do_not_change_identity() -> None:
    a = Policy.from_dict({"default": {"scheme": "dense", "nm": [2, 4]}})
    assert a == Policy.dense()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"default": {"width": 0}}, "width"),
        ({"default": {"width": 1.5}}, "width"),
        ({"default": {"scheme": "nm", "nm": [4, 2]}}, "N < M"),
        ({"default": {"scheme": "nm"}}, "nm"),
        ({"default": {"bits": 1}}, "bits"),
        ({"default": {"bits": 9}}, "bits"),
        ({"default": {"sparsity": 0.99, "scheme": "unstructured"}}, "sparsity"),
        ({"default": {"scheme": "magic"}}, "scheme"),
        ({"default": {"colour": 3}}, "unknown field"),
        ({"layers": {"fc": {"width": "half"}}}, "number"),
        ({"skip": "layer1"}, "skip"),
        ({"extra": 1}, "unknown key"),
        ({"default": {"scheme": "block", "sparsity": 0.5}}, "block"),
    ],
)
def test_impossible_values_are_named(raw: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict(raw)


def test_bad_json_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.from_json("{width: 0.5")
