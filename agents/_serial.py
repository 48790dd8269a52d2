"""Exact JSON encoding of agent state: tensors and arrays as base64 bytes, non-string dict keys kept.

Exactness matters: a resumed agent must compute bit-identical updates, so floats are stored
as their raw bytes, never as decimal text.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

_TENSOR, _ARRAY, _ITEMS, _TUPLE = "__tensor__", "__ndarray__", "__items__", "__tuple__"


def encode(obj: Any) -> Any:
    """``obj`` with tensors, arrays, tuples and non-str-keyed dicts made JSON-safe."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {
            _TENSOR: base64.b64encode(t.numpy().tobytes()).decode(),
            "dtype": str(t.dtype)[6:],
            "shape": list(t.shape),
        }
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {_ARRAY: base64.b64encode(a.tobytes()).decode(), "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {_ITEMS: [[encode(k), encode(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [encode(v) for v in obj]}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    return obj


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            dtype = getattr(torch, obj["dtype"])
            raw = bytearray(base64.b64decode(obj[_TENSOR]))
            if not raw:
                return torch.empty(obj["shape"], dtype=dtype)
            return torch.frombuffer(raw, dtype=dtype).reshape(obj["shape"]).clone()
        if _ARRAY in obj:
            return (
                np.frombuffer(base64.b64decode(obj[_ARRAY]), dtype=np.dtype(obj["dtype"]))
                .reshape(obj["shape"])
                .copy()
            )
        if _ITEMS in obj:
            return {decode(k): decode(v) for k, v in obj[_ITEMS]}
        if _TUPLE in obj:
            return tuple(decode(v) for v in obj[_TUPLE])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj
