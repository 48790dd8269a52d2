"""The built-in schemes' numbers, pinned: sizes, masks and predictor features on real small models.

The values were computed by the code before the schemes became plug-ins (``if scheme == ...``
branches in policy, masks, metrics and the two feature encoders) and must never move: stored
latency predictors were trained on these features, and sizes are what users compare. A
change here is a change of meaning, not a refactoring.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from compression import Policy, apply_policy, measure, schemes, space_for
from latency_models.features import KERNEL_FEATURES, encode_layer_policies, kernel_features
from latency_models.rows import row_index
from tests.compression.conftest_models import zoo_model

PINNED = {
    "dense": {},
    "unstructured": {"default": {"scheme": "unstructured", "sparsity": 0.5}},
    "nm": {"default": {"scheme": "nm", "nm": [2, 4]}},
    "nm-int4": {"default": {"scheme": "nm", "nm": [1, 8], "bits": 4}},
    "block": {"default": {"scheme": "block", "block": 8, "sparsity": 0.6}},
    "block-int8": {"default": {"scheme": "block", "block": 4, "sparsity": 0.3, "bits": 8}},
    "channel-int8": {"default": {"scheme": "channel", "sparsity": 0.25, "bits": 8}},
    "half-unstructured-int2": {
        "default": {"width": 0.5, "scheme": "unstructured", "sparsity": 0.9, "bits": 2}
    },
}
#: (size_bytes, effective_macs, kept weights under masks) of each pinned policy.
MEASURED = {
    ("lenet5", "dense"): (177704, 233640, 0),
    ("lenet5", "unstructured"): (94848, 116820, 22095),
    ("lenet5", "nm"): (96829, 161620, 22570),
    ("lenet5", "nm-int4"): (6873, 69210, 5760),
    ("lenet5", "block"): (72316, 93446, 17666),
    ("lenet5", "block-int8"): (34227, 164840, 30950),
    ("lenet5", "channel-int8"): (26312, 125980, 0),
    ("lenet5", "half-unstructured-int2"): (2680, 6694, 1129),
    ("resnet20", "dense"): (1095016, 10130048, 0),
    ("resnet20", "unstructured"): (587626, 5065024, 135304),
    ("resnet20", "nm"): (587896, 5083456, 135376),
    ("resnet20", "nm-int4"): (45414, 1298512, 33952),
    ("resnet20", "block"): (449731, 4049532, 108228),
    ("resnet20", "block-int8"): (213639, 7089790, 189418),
    ("resnet20", "channel-int8"): (164204, 5705184, 0),
    ("resnet20", "half-unstructured-int2"): (18108, 254656, 6787),
}
#: The predictors' view of each pinned default: scheme code, sparsity, N, M, block, bits.
ENCODED = {
    "dense": (0, 0.0, 0, 0, 0, 0),
    "unstructured": (1, 0.5, 0, 0, 0, 0),
    "nm": (2, 0.5, 2, 4, 0, 0),
    "nm-int4": (2, 0.875, 1, 8, 0, 4),
    "block": (3, 0.6, 0, 0, 8, 0),
    "block-int8": (3, 0.3, 0, 0, 4, 8),
    "channel-int8": (0, 0.0, 0, 0, 0, 8),
    "half-unstructured-int2": (1, 0.9, 0, 0, 0, 2),
}
#: The kernel feature columns pinned (by name: a scheme added later adds a one-hot column).
KERNEL_COLUMNS = (
    *("op_conv", "op_dwconv", "op_gconv", "op_linear", "in_channels", "out_channels", "kernel"),
    *("stride", "groups", "in_h", "in_w", "out_h", "out_w", "macs", "params", "scheme_dense"),
    *("scheme_unstructured", "scheme_nm", "scheme_block", "sparsity", "nm_n", "nm_m", "block"),
    *("bits", "int8", "in_numel", "out_numel", "position"),
)
#: sha256 (first 16 hex digits) of the float64 kernel features (``KERNEL_COLUMNS``) and rows
#: (with policy fields) of all pinned policies at once. Re-pinned for FEATURE_VERSION 2
#: (per-layer precision: ``int8`` is each layer's own, rows carry int8 / int4 / qdq_edges).
DIGESTS = {
    "lenet5": ("cdc623f05ca85fa7", "b2255067ab11f29e"),
    "resnet20": ("00a0b2cbb6d8fc63", "2e5099f89e9a7406"),
}


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float64).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("arch", sorted(DIGESTS))
def test_sizes_and_masks_of_the_built_in_schemes_are_unchanged(arch: str) -> None:
    cm = zoo_model(arch)
    for key, raw in PINNED.items():
        c = apply_policy(cm, Policy.from_dict(raw))
        m = measure(c)
        kept = sum(int(mask.sum()) for mask in c.masks.values())
        assert (m.size_bytes, m.effective_macs, kept) == MEASURED[arch, key], key


def test_the_policy_encoding_is_unchanged() -> None:
    lps = [Policy.from_dict(raw).default for raw in PINNED.values()]
    assert encode_layer_policies(lps).tolist() == [list(map(float, v)) for v in ENCODED.values()]
    for lp, expected in zip(lps, ENCODED.values(), strict=True):
        assert (*schemes.get(lp.scheme).encode(lp), lp.bits or 0) == expected


@pytest.mark.parametrize("arch", sorted(DIGESTS))
def test_kernel_features_and_rows_of_the_built_in_schemes_are_unchanged(arch: str) -> None:
    space = space_for(zoo_model(arch))
    policies = [Policy.from_dict(raw) for raw in PINNED.values()]
    columns = [KERNEL_FEATURES.index(c) for c in KERNEL_COLUMNS]
    kernel = _digest(kernel_features(space, policies).x[:, :, columns])
    rows = _digest(row_index(space).rows(policies, fields=True).x)
    assert (kernel, rows) == DIGESTS[arch]
