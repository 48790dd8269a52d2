"""Measurement tasks and results: the JSON a server and a device agent exchange.

A task (JSON object)::

    {
      "id": "t-0001",                        # unique per server; names the result
      "model": {"sha256": "<hex>",           # required: the agent refuses other bytes
                "onnx_base64": "<...>"},     #   or "url": "/v1/artifacts/7/download"
                                             #   (relative = against the server, same token)
                                             #   or "path": "models/a.onnx" (directory
                                             #   transport, relative to its folder)
      "input_shape": [1, 3, 32, 32],         # optional; default: the ONNX input, batch 1
      "runs": 200, "warmup": 20,             # optional, these defaults
      "device": {"threads": 1,               # optional overrides of the agent's device
                 "settings": {"session.intra_op.allow_spinning": "0"}},
      "reference": {"sha256": ..., ...},     # optional reference model (same form as model);
                                             #   absent = the built-in reference, if the agent
                                             #   has the onnx package, else none
      "baseline": {"sha256": ..., ...}       # optional: time model and baseline interleaved,
                                             #   result gets "speedup" = baseline / model
    }

A result (JSON object)::

    {
      "task_id": "t-0001", "device": "pi5-ort-4t", "status": "ok" | "error",
      "measurement": {...Measurement.to_dict()...} | null,
      "baseline": {...Measurement.to_dict()...} | null, "speedup": 2.6 | null,
      "error": null | "model sha256 mismatch: ...",
      "agent": {"host": {...}, "onnxruntime": "1.32.0"}
    }

No torch here: this module is imported by the device agent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from latency_models.harness import Measurement

__all__ = ["MeasurementResult", "MeasurementTask", "ModelRef", "TaskError", "TaskStatus"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
TaskStatus = Literal["ok", "error"]


class TaskError(ValueError):
    """A malformed task or result, or model bytes that do not match their hash."""


@dataclass(frozen=True)
class ModelRef:
    """An ONNX model as a task carries it: its sha256 and one way to get the bytes."""

    sha256: str
    onnx_base64: str | None = None
    url: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _HEX64.match(self.sha256):
            raise TaskError(f"model sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        sources = [s for s in (self.onnx_base64, self.url, self.path) if s is not None]
        if len(sources) != 1:
            raise TaskError("a model needs exactly one of onnx_base64, url, path")

    @classmethod
    def embed(cls, path: Path) -> ModelRef:
        """Carry the file's bytes inside the task (small models, any transport)."""
        data = Path(path).read_bytes()
        return cls(hashlib.sha256(data).hexdigest(), onnx_base64=base64.b64encode(data).decode("ascii"))

    @classmethod
    def at_path(cls, path: Path, *, relative_to: Path | None = None) -> ModelRef:
        """Point at a file the agent can read (directory transport)."""
        data = Path(path).read_bytes()
        shown = Path(path).relative_to(relative_to) if relative_to is not None else Path(path)
        return cls(hashlib.sha256(data).hexdigest(), path=shown.as_posix())

    def load_bytes(self, fetch: Callable[[ModelRef], bytes]) -> bytes:
        """The model's bytes, verified against ``sha256``.

        Args:
            fetch: how the transport reads a ``url`` or ``path`` reference.

        Raises:
            TaskError: undecodable base64 or bytes whose hash differs.
        """
        if self.onnx_base64 is not None:
            try:
                data = base64.b64decode(self.onnx_base64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise TaskError(f"model {self.sha256[:12]}: onnx_base64 is not valid base64") from exc
        else:
            data = fetch(self)
        got = hashlib.sha256(data).hexdigest()
        if got != self.sha256:
            raise TaskError(f"model sha256 mismatch: expected {self.sha256}, got {got}")
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON form, only the source that is set."""
        out: dict[str, Any] = {"sha256": self.sha256}
        for key in ("onnx_base64", "url", "path"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, raw: Any, where: str = "model") -> ModelRef:
        """Parse; errors name ``where``."""
        if not isinstance(raw, Mapping):
            raise TaskError(f"{where}: expected an object, got {type(raw).__name__}")
        unknown = set(raw) - {"sha256", "onnx_base64", "url", "path"}
        if unknown:
            raise TaskError(f"{where}: unknown field(s) {sorted(unknown)}")
        try:
            return cls(str(raw.get("sha256")), raw.get("onnx_base64"), raw.get("url"), raw.get("path"))
        except TaskError as exc:
            raise TaskError(f"{where}: {exc}") from None


def _positive_int(raw: Mapping[str, Any], key: str, default: int, low: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TaskError(f"task: {key} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class MeasurementTask:
    """One model to time on one device (see the module docstring for the JSON)."""

    id: str
    model: ModelRef
    input_shape: tuple[int, ...] | None = None
    runs: int = 200
    warmup: int = 20
    threads: int | None = None
    settings: dict[str, str] | None = None
    reference: ModelRef | None = None
    baseline: ModelRef | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out: dict[str, Any] = {
            "id": self.id,
            "model": self.model.to_dict(),
            "runs": self.runs,
            "warmup": self.warmup,
        }
        if self.input_shape is not None:
            out["input_shape"] = list(self.input_shape)
        device: dict[str, Any] = {}
        if self.threads is not None:
            device["threads"] = self.threads
        if self.settings is not None:
            device["settings"] = dict(self.settings)
        if device:
            out["device"] = device
        if self.reference is not None:
            out["reference"] = self.reference.to_dict()
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_dict()
        return out

    def to_json(self) -> str:
        """JSON text."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Any) -> MeasurementTask:
        """Parse a task; every problem raises ``TaskError`` naming the field."""
        if not isinstance(raw, Mapping):
            raise TaskError(f"a task must be a JSON object, got {type(raw).__name__}")
        known = {"id", "model", "input_shape", "runs", "warmup", "device", "reference", "baseline"}
        unknown = set(raw) - known
        if unknown:
            raise TaskError(f"task: unknown field(s) {sorted(unknown)}; allowed {sorted(known)}")
        task_id = raw.get("id")
        if not isinstance(task_id, str) or not _ID.match(task_id):
            raise TaskError(f"task: id must match {_ID.pattern}, got {task_id!r}")
        if "model" not in raw:
            raise TaskError(f"task {task_id}: 'model' is required")
        shape = raw.get("input_shape")
        if shape is not None and (
            not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 1 for d in shape)
        ):
            raise TaskError(f"task {task_id}: input_shape must be a list of positive integers, got {shape!r}")
        device = raw.get("device") or {}
        if not isinstance(device, Mapping) or set(device) - {"threads", "settings"}:
            raise TaskError(f"task {task_id}: device may hold only threads and settings, got {device!r}")
        threads = device.get("threads")
        if threads is not None:
            threads = _positive_int(device, "threads", 1, 1)
        settings = device.get("settings")
        if settings is not None and (
            not isinstance(settings, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in settings.items())
        ):
            raise TaskError(f"task {task_id}: device.settings must map strings to strings")
        return cls(
            id=task_id,
            model=ModelRef.from_dict(raw["model"], f"task {task_id}: model"),
            input_shape=tuple(shape) if shape is not None else None,
            runs=_positive_int(raw, "runs", 200, 1),
            warmup=_positive_int(raw, "warmup", 20, 0),
            threads=threads,
            settings=dict(settings) if settings is not None else None,
            reference=ModelRef.from_dict(raw["reference"], f"task {task_id}: reference")
            if raw.get("reference") is not None
            else None,
            baseline=ModelRef.from_dict(raw["baseline"], f"task {task_id}: baseline")
            if raw.get("baseline") is not None
            else None,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> MeasurementTask:
        """Parse JSON text; malformed JSON raises ``TaskError``."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskError(f"task is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)


@dataclass(frozen=True)
class MeasurementResult:
    """What an agent reports for one task (see the module docstring for the JSON)."""

    task_id: str
    device: str
    status: TaskStatus
    measurement: Measurement | None = None
    baseline: Measurement | None = None
    speedup: float | None = None
    error: str | None = None
    agent: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in ("ok", "error"):
            raise TaskError(f"result status must be 'ok' or 'error', got {self.status!r}")
        if self.status == "ok" and self.measurement is None:
            raise TaskError("an 'ok' result needs a measurement")
        if self.status == "error" and not self.error:
            raise TaskError("an 'error' result needs an error message")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "task_id": self.task_id,
            "device": self.device,
            "status": self.status,
            "measurement": self.measurement.to_dict() if self.measurement else None,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "speedup": self.speedup,
            "error": self.error,
            "agent": dict(self.agent),
        }

    def to_json(self) -> str:
        """JSON text."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Any) -> MeasurementResult:
        """Parse a result; problems raise ``TaskError``."""
        if not isinstance(raw, Mapping):
            raise TaskError(f"a result must be a JSON object, got {type(raw).__name__}")
        try:
            return cls(
                task_id=str(raw["task_id"]),
                device=str(raw["device"]),
                status=raw["status"],
                measurement=Measurement.from_dict(raw["measurement"]) if raw.get("measurement") else None,
                baseline=Measurement.from_dict(raw["baseline"]) if raw.get("baseline") else None,
                speedup=float(raw["speedup"]) if raw.get("speedup") is not None else None,
                error=raw.get("error"),
                agent=dict(raw.get("agent") or {}),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise TaskError(f"malformed result: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> MeasurementResult:
        """Parse JSON text."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise TaskError(f"result is not valid JSON: {exc}") from exc
