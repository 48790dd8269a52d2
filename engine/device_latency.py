"""Latency callbacks for the search loop: a device's predictor, a measurement, or a proxy.

``predicted_latency`` answers from a trained per-device predictor (``latency_models``): what
the service's jobs use. ``measured`` exports each candidate to ONNX and times it with the
local harness (honest, a fraction of a second per candidate for small models).
``macs-proxy`` does not measure at all: latency_ms = MACs / 1e6, i.e. a nominal 1 GMAC/s
device. It is labelled as such wherever it is used; it ignores everything but dense MACs
(no runtime effects of bits or sparsity).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from compression.apply import CompressedModel
from compression.metrics import measure as measure_cost
from latency_models.devices import Device

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.policy import Policy
    from compression.space import SearchSpace
    from latency_models.predictors import Predictor

LatencySource = Literal["auto", "predicted", "measured", "macs-proxy"]
LATENCY_SOURCES: tuple[LatencySource, ...] = ("auto", "predicted", "measured", "macs-proxy")
PROXY_MACS_PER_MS = 1e6
PROXY_LABEL = "macs-proxy: latency_ms = MACs / 1e6 (NOT measured on the device)"


def macs_proxy(cm: CompressedModel) -> float:
    """Latency stand-in proportional to dense MACs (see module docstring)."""
    return measure_cost(cm).macs / PROXY_MACS_PER_MS


class PredictedLatency:
    """Latency of a compressed model as a device's predictor predicts it from its policy.

    The search's latency callback (``__call__``) and, for the agents that plan with the
    device's latency (``agents.registry.TAKES_LATENCY_FN``: DDPG's action wall, the surrogate's
    acquisition), their batch ``latency_fn`` (:meth:`of_policies`). ``predictor`` may be
    swapped mid-search (a job's refit, ``engine.active_measurement``); both answer from the
    current one. Holds only the predictor and the space, so it travels to executor workers.

    ``space`` must be the search space of the model the policies belong to (any options:
    the predictors read layer shapes and the policy, not the allowed choices).
    """

    def __init__(self, predictor: Predictor, space: SearchSpace) -> None:
        self.predictor = predictor
        self.space = space

    def __call__(self, cm: CompressedModel) -> float:
        return float(self.predictor.predict(self.space, [cm.policy])[0])

    def of_policies(self, policies: Sequence[Policy]) -> list[float]:
        """Predicted latency (ms) of each policy, without compressing anything."""
        if not policies:
            return []
        return [float(v) for v in self.predictor.predict(self.space, list(policies))]


def predicted_latency(predictor: Predictor, space: SearchSpace) -> PredictedLatency:
    """The search callback of ``predictor`` on ``space`` (:class:`PredictedLatency`)."""
    return PredictedLatency(predictor, space)


def measured_latency(
    device: str | Device, *, runs: int = 50, warmup: int = 5
) -> Callable[[CompressedModel], float]:
    """Median batch-1 latency on ``device`` (a ``Device``, or a built-in device name).

    Raises:
        DeviceError: unknown device name.
    """
    from compression.onnx_export import export_onnx
    from latency_models.devices import get_device
    from latency_models.harness import measure

    dev = get_device(device) if isinstance(device, str) else device

    def latency(cm: CompressedModel) -> float:
        if dev.runtime in ("executorch", "openvino"):  # the device's own file, int8 per layer
            from compression.export_runtimes import compressed_int8_layers, export_for_runtime

            layers = compressed_int8_layers(cm.gm, cm.bits)
            with tempfile.TemporaryDirectory() as tmp:
                path = export_for_runtime(
                    dev.runtime,
                    cm.gm,
                    cm.example_input(1),
                    Path(tmp) / "candidate",
                    int8_layers=layers or None,
                    calibration=[cm.example_input(8)] if layers else None,
                )
                return measure(path, dev, runs=runs, warmup=warmup, interleave_reference=False).median_ms
        if dev.runtime != "onnxruntime":  # eager runtimes time the module itself
            shape = tuple(cm.example_input(1).shape)
            return measure(
                cm.gm, dev, runs=runs, warmup=warmup, interleave_reference=False, input_shape=shape
            ).median_ms
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(cm.gm, cm.example_input(1), Path(tmp) / "candidate.onnx", check=False)
            return measure(path, dev, runs=runs, warmup=warmup, interleave_reference=False).median_ms

    return latency


def stored_predictor_latency(
    device: str, model: CompressibleModel, root: Path | None = None
) -> tuple[PredictedLatency, str] | None:
    """The device's newest stored predictor (``modeltailor calibrate``) as a callback; None if none.

    ``root``: the data directory holding ``devices/<device>`` (default: the user's).
    """
    from compression.space_builder import space_for
    from latency_models.store import DeviceStore

    store = DeviceStore(device, root)
    if not store.versions():
        return None
    predictor, version, kind = store.load()
    held_out = store.metrics(version).get("predictors", {}).get(kind, {})
    figure = held_out.get("speedup_within_10pct")
    label = f"predicted: {kind} v{version} for {device}" + (
        f" ({figure:.0f} % of held-out speedups within ±10 %)" if isinstance(figure, (int, float)) else ""
    )
    return predicted_latency(predictor, space_for(model)), label


def latency_callback(
    source: LatencySource, device: str, model: CompressibleModel | None = None
) -> tuple[Callable[[CompressedModel], float], str]:
    """The callback for ``source`` and the label to print and store with the results.

    ``auto`` uses the device's stored predictor when it has one (``modeltailor calibrate``),
    else measures every candidate; ``predicted`` requires the predictor (and ``model``).

    Raises:
        ValueError: unknown source, or ``predicted`` for a device with no stored predictor.
    """
    if source in ("auto", "predicted"):
        found = stored_predictor_latency(device, model) if model is not None else None
        if found is not None:
            return found
        if source == "predicted":
            raise ValueError(
                f"device {device} has no stored predictor: run `modeltailor calibrate --device {device}` "
                "first, or use --latency measured"
            )
        source = "measured"
    if source == "macs-proxy":
        return macs_proxy, PROXY_LABEL
    if source == "measured":
        return measured_latency(device), f"measured: local harness on {device} (median of 50 runs)"
    raise ValueError(f"unknown latency source {source!r}; use one of {LATENCY_SOURCES}")
