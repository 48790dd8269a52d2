"""Devices: a named target = hardware + runtime + settings.

Latency only means something for one device, so predictors and measurements are keyed by
the device name. Five devices are built in for this machine's CPU; others (an edge board
running the device agent) are described by ``Device.from_dict``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from latency_models.runtimes import RUNTIMES, Runtime, RuntimeSetupError, make_runtime

__all__ = ["BUILTIN_DEVICES", "Device", "DeviceError", "get_device"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DeviceError(ValueError):
    """An unknown device name or an impossible device description."""


@dataclass(frozen=True)
class Device:
    """One target device.

    Attributes:
        name: unique id, e.g. ``cpu-ort-1t``; letters, digits, ``_ . -``.
        runtime: runtime kind from ``latency_models.runtimes.RUNTIMES`` (``onnxruntime``, ``torch``,
            ``executorch``, ``openvino``).
        threads: intra-op threads the runtime may use.
        settings: runtime-specific options (ONNX Runtime session config entries).
        is_local: True when this process can time the device itself; False when a device
            agent on the real hardware must do it.
        description: free text for people (hardware, OS, runtime build).
    """

    name: str
    runtime: str
    threads: int = 1
    settings: Mapping[str, str] = field(default_factory=dict)
    is_local: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise DeviceError(f"device name must match {_NAME.pattern}, got {self.name!r}")
        if self.runtime not in RUNTIMES:
            raise DeviceError(
                f"device {self.name}: unknown runtime {self.runtime!r}; known: {sorted(RUNTIMES)}"
            )
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise DeviceError(f"device {self.name}: threads must be an integer >= 1, got {self.threads!r}")
        if not isinstance(self.settings, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.settings.items()
        ):
            raise DeviceError(f"device {self.name}: settings must map strings to strings")
        object.__setattr__(self, "settings", dict(self.settings))
        try:  # surface impossible settings now, not at the first measurement
            self.make_runtime()
        except RuntimeSetupError as exc:
            raise DeviceError(f"device {self.name}: {exc}") from exc

    def make_runtime(self) -> Runtime:
        """A fresh runtime configured as this device."""
        return make_runtime(self.runtime, self.threads, self.settings)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``from_dict`` reads it back)."""
        return {
            "name": self.name,
            "runtime": self.runtime,
            "threads": self.threads,
            "settings": dict(self.settings),
            "is_local": self.is_local,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Device:
        """Parse ``{"name", "runtime": "onnxruntime", "threads": 1, "settings": {...}}``.

        Raises:
            DeviceError: missing name, unknown fields or runtime, bad thread count.
        """
        if not isinstance(raw, Mapping):
            raise DeviceError(f"a device must be a JSON object, got {type(raw).__name__}")
        known = {"name", "runtime", "threads", "settings", "is_local", "description"}
        unknown = set(raw) - known
        if unknown:
            raise DeviceError(f"device: unknown field(s) {sorted(unknown)}; allowed {sorted(known)}")
        if "name" not in raw:
            raise DeviceError("device: 'name' is required")
        return cls(
            name=raw["name"],
            runtime=raw.get("runtime", "onnxruntime"),
            threads=raw.get("threads", 1),
            settings=raw.get("settings") or {},
            is_local=bool(raw.get("is_local", False)),
            description=str(raw.get("description", "")),
        )


BUILTIN_DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device("cpu-ort-1t", "onnxruntime", 1, is_local=True, description="this CPU, ONNX Runtime, 1 thread"),
        Device(
            "cpu-ort-2t", "onnxruntime", 2, is_local=True, description="this CPU, ONNX Runtime, 2 threads"
        ),
        Device("cpu-torch-1t", "torch", 1, is_local=True, description="this CPU, PyTorch eager, 1 thread"),
        Device(
            "cpu-executorch-1t",
            "executorch",
            1,
            is_local=True,
            description="this CPU, ExecuTorch with the XNNPACK delegate, 1 thread (needs the runtimes extra)",
        ),
        Device(
            "cpu-openvino-1t",
            "openvino",
            1,
            is_local=True,
            description="this CPU, OpenVINO CPU plugin in float32, 1 thread (needs the runtimes extra)",
        ),
    )
}


def get_device(name: str) -> Device:
    """The built-in device called ``name``; the error lists the known names."""
    try:
        return BUILTIN_DEVICES[name]
    except KeyError:
        raise DeviceError(
            f"unknown device {name!r}; built-in devices: {', '.join(sorted(BUILTIN_DEVICES))} "
            "(describe others with Device.from_dict)"
        ) from None
