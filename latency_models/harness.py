"""Measurement harness: batch-1 latency of a model on a device, with its spread and a reference.

This machine is shared: the same model's median drifts 7-20 % between processes, while
ratios taken within one run are steady. So every measurement times a fixed reference model
interleaved with the measured one (alternating blocks of runs) and stores
``ratio_to_reference``; ``measure_pair`` times two models interleaved for a speedup taken in one
run. A measurement whose spread says the machine was noisy is repeated (up to twice) and the
quietest attempt is kept.

Importing this module imports neither torch nor onnx: the device agent uses it on boards that
only have onnxruntime, numpy and httpx. The built-in reference ONNX is built with the ``onnx``
package when first needed; agents without it receive the reference file with their tasks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latency_models.devices import Device, get_device
from latency_models.runtimes import PreparedModel, Runtime, RuntimeSetupError

__all__ = [
    "REFERENCE_INPUT_SHAPE",
    "Measurement",
    "NoiseRule",
    "PairMeasurement",
    "host_info",
    "measure",
    "measure_pair",
    "reference_onnx_path",
    "reference_torch_module",
    "sha256_file",
]

#: Version of the reference model's definition; bump it if the definition ever changes.
REFERENCE_VERSION = 1
REFERENCE_INPUT_SHAPE: tuple[int, ...] = (1, 3, 32, 32)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class NoiseRule:
    """When a measurement counts as noisy, and how often to retry it.

    Attributes:
        max_iqr_rel: largest acceptable IQR / median of the per-run latencies.
        max_p90_rel: largest acceptable p90 / median.
        max_attempts: measurements in all (1 + re-measurements); the quietest is kept.
    """

    max_iqr_rel: float = 0.10
    max_p90_rel: float = 1.25
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.max_iqr_rel < 0 or self.max_p90_rel < 1:
            raise ValueError("max_iqr_rel must be >= 0 and max_p90_rel >= 1")


@dataclass(frozen=True)
class Measurement:
    """One model's batch-1 latency on one device, with what it takes to reproduce it."""

    model_sha256: str
    input_shape: tuple[int, ...]
    device: str
    runtime: str
    runtime_version: str
    threads: int
    settings: dict[str, str]
    runs: int
    warmup: int
    median_ms: float
    mean_ms: float
    min_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    reference_sha256: str | None
    reference_median_ms: float | None
    ratio_to_reference: float | None
    attempts: int
    noisy: bool
    timestamp: str
    host: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    #: The reference's fast tail in the same run: with ``p10_ms`` / ``min_ms`` it gives ratios
    #: that a loaded machine disturbs less than the medians (see ``Measurement.statistic``).
    reference_p10_ms: float | None = None
    reference_min_ms: float | None = None

    def statistic(self, stat: str = "median") -> tuple[float, float | None]:
        """(latency ms, ratio to the reference) by ``stat``: ``median``, ``p10`` or ``min``.

        The median is the device's latency on a quiet machine; on a shared, loaded one other
        processes preempt a share of the runs and the fast tail (``p10`` / ``min``) of the
        same interleaved run is the steadier estimate of the undisturbed latency.
        """
        if stat == "median":
            return self.median_ms, self.ratio_to_reference
        if stat not in ("p10", "min"):
            raise ValueError(f"statistic must be 'median', 'p10' or 'min', got {stat!r}")
        ms = self.p10_ms if stat == "p10" else self.min_ms
        ref = self.reference_p10_ms if stat == "p10" else self.reference_min_ms
        return ms, (ms / ref if ref else None)

    @property
    def iqr_rel(self) -> float:
        """IQR / median: the spread used to decide whether the machine was noisy."""
        return self.iqr_ms / self.median_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``from_dict`` reads it back)."""
        out = dataclasses.asdict(self)
        out["input_shape"] = list(self.input_shape)
        return out

    def to_json(self) -> str:
        """Stable JSON text."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Measurement:
        """Parse ``to_dict``'s output; a missing or unknown field raises ``ValueError``."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"a measurement must be a JSON object, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing, unknown = required - set(raw), set(raw) - names
        if missing or unknown:
            raise ValueError(f"measurement: missing field(s) {sorted(missing)}, unknown {sorted(unknown)}")
        values = dict(raw)
        values["input_shape"] = tuple(int(d) for d in values["input_shape"])
        values["settings"] = dict(values["settings"])
        values["host"] = dict(values.get("host") or {})
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Measurement:
        """Parse ``to_json``'s output."""
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class PairMeasurement:
    """Two models timed interleaved in one run; ``speedup`` = a's median / b's median."""

    a: Measurement
    b: Measurement
    speedup: float

    @property
    def a_median_ms(self) -> float:
        """Median latency of model a."""
        return self.a.median_ms

    @property
    def b_median_ms(self) -> float:
        """Median latency of model b."""
        return self.b.median_ms

    @property
    def speedup_p10(self) -> float:
        """a's p10 / b's p10: the fast tail, less hit by other processes on a loaded machine."""
        return self.a.p10_ms / self.b.p10_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "speedup": self.speedup}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PairMeasurement:
        """Parse ``to_dict``'s output."""
        try:
            return cls(
                Measurement.from_dict(raw["a"]), Measurement.from_dict(raw["b"]), float(raw["speedup"])
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"pair measurement: malformed ({exc})") from exc


# --------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def host_info() -> dict[str, Any]:
    """Where a measurement was taken, including the load that explains a noisy one."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def _model_sha256(model: Any) -> str:
    if isinstance(model, (str, Path)):
        return sha256_file(Path(model))
    import torch  # only torch modules reach here

    digest = hashlib.sha256()
    code = model.code if isinstance(model, torch.fx.GraphModule) else repr(model)
    digest.update(code.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def _model_name(model: Any) -> str:
    return Path(model).name if isinstance(model, (str, Path)) else type(model).__name__


# --------------------------------------------------------------------------- reference model


#: The reference CNN's 3x3 convolutions as (weight name, out channels, in channels, stride),
#: each followed by ReLU; then global average pooling and a 64 -> 10 linear layer ("w5").
_REFERENCE_CONVS: tuple[tuple[str, int, int, int], ...] = (
    ("w1", 32, 3, 1),
    ("w2", 32, 32, 1),
    ("w3", 64, 32, 2),
    ("w4", 64, 64, 1),
)


def _reference_weights() -> dict[str, np.ndarray]:
    """Fixed weights of the reference CNN (seeded PCG64: identical on every platform)."""
    rng = np.random.default_rng(20240601)
    shapes: dict[str, tuple[int, ...]] = {name: (cout, cin, 3, 3) for name, cout, cin, _ in _REFERENCE_CONVS}
    shapes["w5"] = (10, _REFERENCE_CONVS[-1][1])
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        out[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        out["b" + name[1:]] = (rng.standard_normal(shape[0]) * 0.01).astype(np.float32)
    return out


def _reference_onnx_bytes() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = _reference_weights()
    nodes = []
    x = "x"
    for i, (name, _, _, stride) in enumerate(_REFERENCE_CONVS):
        nodes.append(
            helper.make_node(
                "Conv",
                [x, name, "b" + name[1:]],
                [f"c{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        x = f"r{i}"
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w5", "b5"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        f"modeltailor_reference_v{REFERENCE_VERSION}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *REFERENCE_INPUT_SHAPE[1:]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(w[k], k) for k in sorted(w)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modeltailor", producer_version="1"
    )
    model.ir_version = 8  # loads in ONNX Runtime >= 1.10, as old board builds are
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def _cache_dir() -> Path:
    root = os.environ.get("MODELTAILOR_CACHE") or str(Path.home() / ".cache" / "modeltailor")
    return Path(root) / "reference"


def reference_onnx_path(cache_dir: Path | None = None) -> Path:
    """The reference CNN as an ONNX file, cached under its content hash (needs ``onnx``).

    A small fixed CNN (3x32x32 input, four 3x3 convs, ~24 M MACs): compute-bound enough to
    track the CPU's speed, small enough to add little time when interleaved.
    """
    data = _reference_onnx_bytes()
    sha = hashlib.sha256(data).hexdigest()
    folder = Path(cache_dir) if cache_dir is not None else _cache_dir()
    path = folder / f"reference-v{REFERENCE_VERSION}-{sha[:16]}.onnx"
    if not path.is_file() or sha256_file(path) != sha:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as fh:
            fh.write(data)
        os.replace(fh.name, path)  # atomic: concurrent processes never read half a file
    return path


def reference_torch_module() -> Any:
    """The same reference CNN (same weights) as a torch module, for torch runtimes."""
    import torch
    from torch.nn import functional as F

    weights = {k: torch.from_numpy(v) for k, v in _reference_weights().items()}

    class _Reference(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for k, v in weights.items():
                self.register_buffer(k, v)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b: dict[str, torch.Tensor] = dict(self.named_buffers())
            for name, _, _, stride in _REFERENCE_CONVS:
                x = F.relu(F.conv2d(x, b[name], b["b" + name[1:]], padding=1, stride=stride))
            return F.linear(x.mean(dim=(2, 3)), b["w5"], b["b5"])

    return _Reference().eval()


def _reference_for(runtime: Runtime, reference: Any) -> Any:
    if reference is not None:
        return reference
    if runtime.accepts == "executorch":  # OpenVINO reads the ONNX reference itself
        from latency_models.runtimes_edge import reference_pte_path

        return reference_pte_path()
    return reference_torch_module() if runtime.accepts == "torch" else reference_onnx_path()


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class _Stats:
    median_ms: float
    mean_ms: float
    min_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float

    @classmethod
    def of(cls, samples_ms: np.ndarray) -> _Stats:
        p10, p25, p50, p75, p90 = np.percentile(samples_ms, [10, 25, 50, 75, 90])
        return cls(
            float(p50),
            float(samples_ms.mean()),
            float(samples_ms.min()),
            float(p10),
            float(p90),
            float(p75 - p25),
        )

    def is_noisy(self, rule: NoiseRule) -> bool:
        return (
            self.iqr_ms / self.median_ms > rule.max_iqr_rel or self.p90_ms / self.median_ms > rule.max_p90_rel
        )


def _interleaved(prepared: Sequence[PreparedModel], runs: int, warmup: int, block: int) -> list[_Stats]:
    """Warm every model up, then alternate blocks of runs; rotate who goes first per block."""
    for p in prepared:
        p.time_runs(warmup)
    samples: list[list[np.ndarray]] = [[] for _ in prepared]
    done, turn = 0, 0
    while done < runs:
        n = min(block, runs - done)
        for k in range(len(prepared)):
            i = (k + turn) % len(prepared)
            samples[i].append(prepared[i].time_runs(n))
        done += n
        turn += 1
    return [_Stats.of(np.concatenate(s)) for s in samples]


def _quietest(
    prepared: Sequence[PreparedModel], runs: int, warmup: int, block: int, rule: NoiseRule
) -> tuple[list[_Stats], int, bool]:
    """Measure; re-measure while noisy (up to ``rule.max_attempts``); keep the quietest try."""
    best: list[_Stats] | None = None
    attempts = 0
    for attempts in range(1, rule.max_attempts + 1):
        stats = _interleaved(prepared, runs, warmup if attempts == 1 else max(1, warmup // 4), block)
        if best is None or max(s.iqr_ms / s.median_ms for s in stats) < max(
            s.iqr_ms / s.median_ms for s in best
        ):
            best = stats
        if not any(s.is_noisy(rule) for s in stats):
            break
    assert best is not None
    return best, attempts, any(s.is_noisy(rule) for s in best)


def _check_counts(runs: int, warmup: int, block: int) -> None:
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0), ("block", block, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _resolve(device: Device | str) -> Device:
    return device if isinstance(device, Device) else get_device(device)


def _measurement(
    model: Any,
    sha: str | None,
    prepared: PreparedModel,
    stats: _Stats,
    device: Device,
    runtime: Runtime,
    runs: int,
    warmup: int,
    attempts: int,
    noisy: bool,
    reference: tuple[str, _Stats] | None,
) -> Measurement:
    return Measurement(
        model_sha256=sha or _model_sha256(model),
        input_shape=tuple(prepared.input_shape),
        device=device.name,
        runtime=device.runtime,
        runtime_version=runtime.version(),
        threads=device.threads,
        settings=dict(device.settings),
        runs=runs,
        warmup=warmup,
        median_ms=stats.median_ms,
        mean_ms=stats.mean_ms,
        min_ms=stats.min_ms,
        p10_ms=stats.p10_ms,
        p90_ms=stats.p90_ms,
        iqr_ms=stats.iqr_ms,
        reference_sha256=reference[0] if reference else None,
        reference_median_ms=reference[1].median_ms if reference else None,
        ratio_to_reference=stats.median_ms / reference[1].median_ms if reference else None,
        attempts=attempts,
        noisy=noisy,
        timestamp=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        host=host_info(),
        model_name=_model_name(model),
        reference_p10_ms=reference[1].p10_ms if reference else None,
        reference_min_ms=reference[1].min_ms if reference else None,
    )


def measure(
    model: Any,
    device: Device | str,
    *,
    runs: int = 200,
    warmup: int = 20,
    reference: Any = None,
    interleave_reference: bool = True,
    input_shape: Sequence[int] | None = None,
    block: int = 10,
    noise: NoiseRule = NoiseRule(),
    model_sha256: str | None = None,
) -> Measurement:
    """Time ``model`` at batch 1 on ``device``, interleaved with the reference model.

    Args:
        model: an ``.onnx`` path for ONNX Runtime devices; a torch module or ``.pt2`` path for
            torch devices (see ``latency_models.runtimes``).
        device: a ``Device`` or a built-in device name.
        runs: timed runs of the model (and of the reference), after ``warmup`` untimed runs.
        reference: the reference model in the runtime's format; ``None`` = the built-in one.
        interleave_reference: False skips the reference (``ratio_to_reference`` is then None).
        input_shape: batch-1 input shape; ONNX files default to their declared shape.
        block: runs per block when alternating model and reference.
        noise: when to re-measure, and how often.
        model_sha256: the hash if already known (skips re-hashing a large file).

    Raises:
        DeviceError: unknown device name. RuntimeSetupError: model not usable by the runtime.
        ValueError: bad counts.
    """
    _check_counts(runs, warmup, block)
    dev = _resolve(device)
    runtime = dev.make_runtime()
    prepared = [runtime.prepare(model, input_shape)]
    ref_sha: str | None = None
    if interleave_reference:
        ref = _reference_for(runtime, reference)
        try:
            prepared.append(runtime.prepare(ref, REFERENCE_INPUT_SHAPE if reference is None else None))
        except RuntimeSetupError as exc:
            raise RuntimeSetupError(f"reference model: {exc}") from exc
        ref_sha = _model_sha256(ref)
    stats, attempts, noisy = _quietest(prepared, runs, warmup, block, noise)
    reference_stats = (ref_sha or "", stats[1]) if interleave_reference else None
    return _measurement(
        model,
        model_sha256,
        prepared[0],
        stats[0],
        dev,
        runtime,
        runs,
        warmup,
        attempts,
        noisy,
        reference_stats,
    )


def measure_pair(
    a: Any,
    b: Any,
    device: Device | str,
    *,
    runs: int = 200,
    warmup: int = 20,
    input_shape: Sequence[int] | None = None,
    block: int = 10,
    noise: NoiseRule = NoiseRule(),
    with_reference: bool = False,
    reference: Any = None,
) -> PairMeasurement:
    """Time two models interleaved in one run; ``speedup`` = median(a) / median(b).

    Pass the dense model as ``a`` and the compressed one as ``b`` to get "speedup over the
    dense model measured in one run", which stays steady while absolute times drift.
    ``with_reference`` also interleaves the reference model (``reference``, default the
    built-in one) so both get a ``ratio_to_reference``.
    """
    _check_counts(runs, warmup, block)
    dev = _resolve(device)
    runtime = dev.make_runtime()
    prepared = [runtime.prepare(a, input_shape), runtime.prepare(b, input_shape)]
    ref_sha: str | None = None
    if with_reference:
        ref = _reference_for(runtime, reference)
        prepared.append(runtime.prepare(ref, REFERENCE_INPUT_SHAPE if reference is None else None))
        ref_sha = _model_sha256(ref)
    stats, attempts, noisy = _quietest(prepared, runs, warmup, block, noise)
    ref_stats = (ref_sha or "", stats[2]) if with_reference else None
    ma = _measurement(a, None, prepared[0], stats[0], dev, runtime, runs, warmup, attempts, noisy, ref_stats)
    mb = _measurement(b, None, prepared[1], stats[1], dev, runtime, runs, warmup, attempts, noisy, ref_stats)
    return PairMeasurement(ma, mb, ma.median_ms / mb.median_ms)
