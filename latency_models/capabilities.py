"""What a device's runtime turns into speed: the channel multiple its kernels reward, and which
sparsity schemes (and int8) run faster than the dense model rather than only smaller.

Measured once per latency calibration (``latency_models.calibration_run``) on a few small
probe models, each variant timed interleaved with its dense probe in one run (the same
harness, or the same device-agent tasks, as the calibration's samples), so every figure is a
same-run speedup, steady while absolute times drift.

* **Channel multiple.** A probe block (two 3×3 convolutions of 64 channels) keeps ``w_m``
  channels in its first layer for each candidate multiple ``m`` (1, 2, 4, 8, 16, 32), with
  ``w_m = 32 + m``: a multiple of ``m`` and of no larger candidate, all about the same size.
  Its *channel efficiency* is ``speedup × w_m / 64`` (1 = time proportional to the kept
  channels). A kernel that computes channels in blocks of ``g`` pads ``w`` up to a multiple of
  ``g`` and wastes the rest, so widths aligned to ``g`` or coarser are efficient and finer ones
  are not. The device's ``round_to`` is the smallest candidate whose efficiency is within
  :data:`EFFICIENCY_TOLERANCE` of the best one.
* **Schemes.** Every registered fine-grained scheme (``compression.schemes``) at about 90 %
  sparsity on every probe layer, and all layers at 8 bits (``int8``), against the dense probe
  (a conv block and a two-layer MLP). A scheme whose geometric-mean speedup stays below
  :data:`SPEEDUP_THRESHOLD` is *size-only* on the device: it shrinks the file but not the time.

This module is pure: it builds the probes and decides; whoever holds the device does the
timing through a :data:`Measure` function (``HarnessTransport.time_trials`` in this process,
``AgentTransport.time_trials`` through device agents).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.policy import Policy
    from compression.space import SearchSpace

__all__ = [
    "CANDIDATE_MULTIPLES",
    "EFFICIENCY_TOLERANCE",
    "INT8",
    "SPEEDUP_THRESHOLD",
    "Capabilities",
    "Measure",
    "Trial",
    "decide",
    "measure_capabilities",
    "plan_trials",
]

#: Channel multiples tried (the kept widths are ``BASE_WIDTH // 2 + m``).
CANDIDATE_MULTIPLES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
#: Channels of the probes' layers.
BASE_WIDTH = 64
#: A multiple whose channel efficiency is at least this share of the best one is rewarded.
EFFICIENCY_TOLERANCE = 0.92
#: Same-run speedup over dense from which a scheme counts as accelerated (below: size-only).
SPEEDUP_THRESHOLD = 1.10
#: Sparsity of the scheme probes.
HIGH_SPARSITY = 0.9
#: Name of the 8-bit weights choice among the schemes (it combines with every scheme).
INT8 = "int8"
#: Timed runs of each trial (with its dense probe); small models, so this is short.
TRIAL_RUNS = 40


@dataclass(frozen=True)
class Trial:
    """One variant of a probe model to time against that probe's dense model.

    ``kind`` is ``width`` (``choice``: kept channels of the probe's first layer) or ``scheme``
    (``choice``: a scheme name or ``int8``).
    """

    key: str
    probe: str
    kind: str
    choice: int | str
    model: CompressibleModel
    space: SearchSpace
    policy: Policy
    detail: str = ""


#: Times trials on the device: {trial key: dense time / trial time, from one interleaved run}.
#: A trial it could not time is left out.
Measure = Callable[[Sequence[Trial]], Mapping[str, float]]


@dataclass(frozen=True)
class Capabilities:
    """What one device's runtime rewards, as measured at its latency calibration.

    Attributes:
        round_to: the channel multiple its kernels reward (1 = any count).
        accelerated_schemes: schemes (and ``int8``) that ran at least
            :data:`SPEEDUP_THRESHOLD` times faster than dense.
        measured_schemes: every scheme (and ``int8``) that was measured.
        reasons: one line per measured scheme and for ``round_to``, saying why.
        scheme_speedups: geometric-mean same-run speedup over dense of each measured scheme.
        channel_efficiency: per candidate multiple, time-per-kept-channel efficiency (1 = ideal).
        ratios: every trial's speedup over its dense probe (``probe/kind/choice``).
    """

    round_to: int
    accelerated_schemes: tuple[str, ...]
    measured_schemes: tuple[str, ...]
    reasons: dict[str, str] = field(default_factory=dict)
    scheme_speedups: dict[str, float] = field(default_factory=dict)
    channel_efficiency: dict[int, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)

    @property
    def size_only(self) -> dict[str, str]:
        """Measured schemes the device does not turn into speed, with the reason."""
        return {
            s: self.reasons.get(s, "") for s in self.measured_schemes if s not in self.accelerated_schemes
        }

    def accelerates(self, scheme: str) -> bool | None:
        """Whether ``scheme`` (or ``int8``) ran faster than dense; None when it was not measured."""
        if scheme not in self.measured_schemes:
            return None
        return scheme in self.accelerated_schemes

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored with the calibration's predictor version (``from_dict`` reads it)."""
        return {
            "round_to": self.round_to,
            "accelerated_schemes": list(self.accelerated_schemes),
            "measured_schemes": list(self.measured_schemes),
            "size_only": sorted(self.size_only),
            "reasons": dict(self.reasons),
            "scheme_speedups": {k: round(v, 4) for k, v in self.scheme_speedups.items()},
            "channel_efficiency": {str(k): round(v, 4) for k, v in self.channel_efficiency.items()},
            "ratios": {k: round(v, 4) for k, v in self.ratios.items()},
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Capabilities:
        """Parse :meth:`to_dict`'s output; a malformed document raises ``ValueError``."""
        try:
            round_to = int(raw["round_to"])
            out = cls(
                round_to=round_to,
                accelerated_schemes=tuple(str(s) for s in raw["accelerated_schemes"]),
                measured_schemes=tuple(str(s) for s in raw["measured_schemes"]),
                reasons={str(k): str(v) for k, v in (raw.get("reasons") or {}).items()},
                scheme_speedups={str(k): float(v) for k, v in (raw.get("scheme_speedups") or {}).items()},
                channel_efficiency={
                    int(k): float(v) for k, v in (raw.get("channel_efficiency") or {}).items()
                },
                ratios={str(k): float(v) for k, v in (raw.get("ratios") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"device capabilities: malformed ({exc!r})") from exc
        if not 1 <= round_to <= 64:
            raise ValueError(f"device capabilities: round_to must be 1-64, got {round_to}")
        return out

    @classmethod
    def from_stored(cls, raw: object) -> Capabilities | None:
        """The capabilities stored with a predictor version, None when absent or unreadable
        (versions fitted before capabilities were measured)."""
        if not isinstance(raw, Mapping):
            return None
        try:
            return cls.from_dict(raw)
        except ValueError:
            return None


# --------------------------------------------------------------------------- probes


def _conv_probe() -> Any:
    import torch
    from torch import nn

    class ConvProbe(nn.Module):
        """Two 3×3 convolutions at 16×16: the body of a small CNN."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(BASE_WIDTH, BASE_WIDTH, 3, padding=1)
            self.conv2 = nn.Conv2d(BASE_WIDTH, BASE_WIDTH, 3, padding=1)
            self.fc = nn.Linear(BASE_WIDTH, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(x.mean(dim=(2, 3)))

    return ConvProbe(), (2, BASE_WIDTH, 16, 16)


def _mlp_probe() -> Any:
    import torch
    from torch import nn

    class MlpProbe(nn.Module):
        """Two 512-wide linear layers at batch 1: the matrix-vector kernels of an MLP head."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(512, 512)
            self.fc2 = nn.Linear(512, 512)
            self.out = nn.Linear(512, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    return MlpProbe(), (2, 512)


#: name -> builder of (module, example input shape); the first one also probes channel widths.
PROBES: dict[str, Callable[[], Any]] = {"conv": _conv_probe, "mlp": _mlp_probe}


def _probe_model(name: str) -> tuple[CompressibleModel, SearchSpace]:
    import torch

    from compression.model_io import from_module
    from compression.space_builder import space_for

    torch.manual_seed(0)  # fixed weights: masks (and so timings) repeat
    module, shape = PROBES[name]()
    model = from_module(module.eval(), torch.randn(*shape), f"capability-{name}")
    return model, space_for(model)


def width_for(multiple: int) -> int:
    """Kept channels of the width trial of ``multiple``: a multiple of it and of no larger candidate."""
    return BASE_WIDTH // 2 + multiple if multiple < BASE_WIDTH // 2 else BASE_WIDTH // 2


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ":".join(str(v) for v in value)
    return f"{value:.0%}" if isinstance(value, float) else str(value)


def plan_trials(
    *,
    multiples: Sequence[int] = CANDIDATE_MULTIPLES,
    schemes: Sequence[str] | None = None,
    int8: bool = True,
    probes: Sequence[str] = tuple(PROBES),
) -> list[Trial]:
    """The trials to time: channel widths on the first probe, every scheme (default: every
    registered fine-grained scheme) and ``int8`` on every probe."""
    from compression import schemes as registry
    from compression.policy import Policy

    names = [s.name for s in registry.schemes() if s.name != registry.DENSE] if schemes is None else schemes
    trials: list[Trial] = []
    for i, probe in enumerate(probes):
        model, space = _probe_model(probe)
        if i == 0:
            leader = next(ls for ls in space.layers if ls.width_prunable)
            for m in multiples:
                w = width_for(m)
                policy = Policy.from_dict(
                    {"layers": {leader.name: {"width": w / leader.features.out_channels}}}
                )
                trials.append(Trial(f"{probe}/width/{w}", probe, "width", w, model, space, policy))
        for name in names:
            scheme = registry.get(name)
            layers: dict[str, dict[str, Any]] = {}
            for ls in space.layers:
                fields = scheme.probe(ls, HIGH_SPARSITY) if name in ls.schemes else None
                if fields is not None:
                    layers[ls.name] = {"scheme": name, **fields}
            if layers:
                policy = Policy.from_dict({"layers": layers})
                first = next(iter(layers.values()))
                detail = " ".join(f"{k} {_show(v)}" for k, v in first.items() if k != "scheme")
                trials.append(
                    Trial(f"{probe}/scheme/{name}", probe, "scheme", name, model, space, policy, detail)
                )
        if int8:
            policy = Policy.from_dict({"default": {"bits": 8}})
            trials.append(
                Trial(f"{probe}/scheme/{INT8}", probe, "scheme", INT8, model, space, policy, "8-bit weights")
            )
    return trials


# --------------------------------------------------------------------------- deciding


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def decide(trials: Sequence[Trial], ratios: Mapping[str, float]) -> Capabilities:
    """Capabilities from the trials' measured speedups (see the module docstring for the rules).

    Raises:
        ValueError: no width trial was timed (nothing to choose a multiple from).
    """
    widths = {int(t.choice): ratios[t.key] for t in trials if t.kind == "width" and t.key in ratios}
    if not widths:
        raise ValueError("no channel-width trial was timed: cannot choose the device's channel multiple")
    efficiency: dict[int, float] = {}
    for m in sorted({m for m in CANDIDATE_MULTIPLES if width_for(m) in widths}):
        w = width_for(m)
        efficiency[m] = widths[w] * w / BASE_WIDTH
    best = max(efficiency.values())
    round_to = min(m for m, e in efficiency.items() if e >= EFFICIENCY_TOLERANCE * best)
    finer = [m for m in efficiency if m < round_to]
    reasons = {
        "round_to": (
            f"channel counts that are multiples of {round_to} run at {efficiency[round_to]:.2f} of ideal "
            f"time per channel (best {best:.2f})"
            + (
                "; finer counts waste time: " + ", ".join(f"{m}: {efficiency[m]:.2f}" for m in sorted(finer))
                if finer
                else ""
            )
        )
    }
    per_scheme: dict[str, list[float]] = {}
    for t in trials:
        if t.kind == "scheme" and t.key in ratios:
            per_scheme.setdefault(str(t.choice), []).append(ratios[t.key])
    speedups = {s: _geomean(v) for s, v in per_scheme.items()}
    accelerated = tuple(s for s, v in speedups.items() if v >= SPEEDUP_THRESHOLD)
    details = {str(t.choice): t.detail for t in trials if t.kind == "scheme"}
    for s, v in speedups.items():
        label = f"{s} ({details.get(s) or 'high sparsity'})"
        if s in accelerated:
            reasons[s] = f"accelerated: {label} ran {v:.2f}x faster than dense"
        else:
            reasons[s] = (
                f"size-only: {label} ran {v:.2f}x the dense speed (below {SPEEDUP_THRESHOLD:.2f}x): "
                "smaller, not faster, on this runtime"
            )
    return Capabilities(
        round_to=round_to,
        accelerated_schemes=accelerated,
        measured_schemes=tuple(speedups),
        reasons=reasons,
        scheme_speedups=speedups,
        channel_efficiency=efficiency,
        ratios=dict(ratios),
    )


def measure_capabilities(measure: Measure, trials: Sequence[Trial] | None = None) -> Capabilities:
    """Plan the trials (default :func:`plan_trials`), have ``measure`` time them, decide."""
    planned = list(trials) if trials is not None else plan_trials()
    ratios = {
        k: float(v) for k, v in measure(planned).items() if v is not None and v > 0 and math.isfinite(v)
    }
    return decide(planned, ratios)
