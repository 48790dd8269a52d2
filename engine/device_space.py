"""A job's space for its device: the keys the user left unset, resolved from what the device's
latency calibration measured (``latency_models.capabilities``).

* ``round_to`` unset: the channel multiple the device's kernels reward (1 without a measurement).
* ``schemes`` / ``bits`` unset, and latency an objective or a bound: every registered scheme and
  ``[null, 8]``, less what the device runs no faster than dense (*size-only*: it would only
  shrink the file, and a latency search gains nothing from it). Without latency in the job they
  stay, since they do save size.
* Set explicitly, every choice stays; size-only ones are marked, with the reason, so the user
  knows a sparse candidate will not be faster on this device.

Imports no torch: the CLI and the service call it cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.spec import JobSpec, SpaceSpec
from latency_models.capabilities import INT8, Capabilities

if TYPE_CHECKING:
    from compression.space import SpaceOptions

__all__ = ["ResolvedSpace", "latency_matters", "resolve_space", "stored_capabilities"]


@dataclass(frozen=True)
class ResolvedSpace:
    """The options a search runs with, and what the device decided in them.

    Attributes:
        options: the engine's space options.
        round_to_source: ``space`` (the user's), ``device`` (measured) or ``default`` (1: no
            measurement).
        size_only: choices in the space that the device does not turn into speed -> why.
        left_out: choices the default space left out for that reason -> why.
        round_to_reason: why the device's multiple (when it is the device's).
    """

    options: SpaceOptions
    round_to_source: str
    size_only: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    round_to_reason: str = ""

    def note(self) -> str:
        """One line for people (job progress, the CLI)."""
        parts = [f"round_to {self.options.round_to} ({self._round_to_words()})"]
        if self.left_out:
            parts.append(
                "left out as size-only on this device (no faster than dense): " + ", ".join(self.left_out)
            )
        if self.size_only:
            parts.append("size-only on this device (smaller, not faster): " + ", ".join(self.size_only))
        return "; ".join(parts)

    def _round_to_words(self) -> str:
        return {
            "space": "set by the space",
            "device": "the device's measured channel multiple",
            "default": "no measured channel multiple for this device",
        }[self.round_to_source]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (a job's ``progress.space``)."""
        return {
            "round_to": self.options.round_to,
            "round_to_source": self.round_to_source,
            **({"round_to_reason": self.round_to_reason} if self.round_to_reason else {}),
            "schemes": list(self.options.schemes),
            "bits": list(self.options.bits),
            "size_only": dict(self.size_only),
            "left_out": dict(self.left_out),
            "note": self.note(),
        }


def latency_matters(spec: JobSpec) -> bool:
    """Whether a job optimises or bounds latency (then size-only choices are left out by default)."""
    return any(g.metric == "latency_ms" for g in spec.objectives) or spec.bound("latency_ms") is not None


def resolve_space(
    space: SpaceSpec, capabilities: Capabilities | None, *, latency_objective: bool
) -> ResolvedSpace:
    """The options of ``space`` on a device with ``capabilities`` (None: none measured)."""
    options = space.space_options()
    if capabilities is None:
        return ResolvedSpace(options, "space" if space.round_to is not None else "default")
    changes: dict[str, Any] = {}
    source = "space"
    if space.round_to is None:
        changes["round_to"] = capabilities.round_to
        source = "device"
    slow = capabilities.size_only
    left_out: dict[str, str] = {}
    if latency_objective and space.schemes is None:
        kept = tuple(s for s in options.schemes if s not in slow)
        left_out.update({s: slow[s] for s in options.schemes if s in slow})
        changes["schemes"] = kept
    if latency_objective and space.bits is None and INT8 in slow:
        changes["bits"] = tuple(b for b in options.bits if b is None)
        left_out[INT8] = slow[INT8]
    resolved = dataclasses.replace(options, **changes) if changes else options
    size_only = {s: slow[s] for s in resolved.schemes if s in slow}
    if INT8 in slow and any(b is not None for b in resolved.bits):
        size_only[INT8] = slow[INT8]
    reason = capabilities.reasons.get("round_to", "") if source == "device" else ""
    return ResolvedSpace(resolved, source, size_only, left_out, reason)


def stored_capabilities(device: str) -> Capabilities | None:
    """The capabilities stored with the newest predictor version of a device in the local data
    directory (``modeltailor calibrate``); None when it has none."""
    from latency_models.store import DeviceStore

    store = DeviceStore(device)
    if not store.versions():
        return None
    try:
        return Capabilities.from_stored(store.metrics().get("capabilities"))
    except (OSError, ValueError):
        return None
