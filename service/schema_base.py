"""The base of every request body: unknown fields are errors and every number is finite.

JSON has no NaN or Infinity, but Python's parser (Starlette's, and pydantic's) reads the
``NaN`` / ``Infinity`` literals and overflowing numbers such as ``1e400`` as floats. A
float field rejects them with ``allow_inf_nan=False``; free-form fields (``dict[str, Any]``)
would keep them, store them and fail later when an answer is encoded. :class:`RequestModel`
refuses them anywhere in the body, so they end as a 422 naming the field.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["RequestModel", "non_finite_path"]

#: Nesting deeper than this is not searched further (a body is at most a few levels deep).
MAX_DEPTH = 64


def non_finite_path(value: Any, path: str = "", depth: int = 0) -> str | None:
    """The dotted path of the first NaN or infinite float in ``value`` (None when all are finite)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "body")
    if depth >= MAX_DEPTH:
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite_path(item, f"{path}.{key}" if path else str(key), depth + 1)
        if found is not None:
            return found
    return None


class RequestModel(BaseModel):
    """Request bodies: a typo is never silently ignored, a number is never NaN or infinite."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data: Any) -> Any:
        where = non_finite_path(data)
        if where is not None:
            raise ValueError(f"{where}: NaN and Infinity are not numbers; send a finite number")
        return data
