"""Calibrate a device: measure sampled compressed models, then fit and version its predictors.

Each sample (``latency_models.sampling``) is compressed with ``apply_policy``, exported to
ONNX, converted to int8 QDQ when the policy runs as int8 on this runtime
(``latency_models.features.runtime_int8``), and timed with ``measure_pair`` interleaved with
the dense model and the harness's reference model in one run: so each record carries its
absolute latency, its ratio to the reference, and its speedup over the dense model, all
from one quiet stretch of the machine. The first time a model is seen its dense timing is
also stored as a record of its own. On ONNX Runtime devices each measured model is also run
once under the runtime's profiler (``latency_models.profiling``): the per-node times, stored
with the measurement, teach the kernel predictor how the model's time splits over kernels.
A sample whose run says the machine was loaded (its reference slower than the calibration's
recent median) is re-timed, and refused if it stays so (``latency_models.load_guard``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression.apply import apply_policy
from compression.export_runtimes import EXPORT_RUNTIMES, export_for_runtime, int8_layer_names
from compression.mixed_precision import export_policy_onnx
from compression.model_io import CompressibleModel
from compression.onnx_export import export_onnx
from compression.policy import Policy
from compression.space import SearchSpace
from latency_models.devices import Device, get_device
from latency_models.harness import Measurement, PairMeasurement, measure_pair
from latency_models.load_guard import LoadGuard, SampleRefused
from latency_models.predictors import KINDS, REGISTRY, LatencyRecord, Predictor, holdout_metrics
from latency_models.predictors.base import Target, supports_statistic, with_statistic
from latency_models.profiling import profile_onnx
from latency_models.sampling import CalibrationSample, sample_plan
from latency_models.store import DeviceStore

__all__ = ["Progress", "calibrate", "export_for_device", "fit_predictors", "measure_sample"]

log = logging.getLogger("modeltailor.latency")

#: ``progress(done, total, what)`` after each measured sample.
Progress = Callable[[int, int, str], None]


def _calibration_batches(shape: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, *shape)).astype(np.float32) for _ in range(16)]


def export_for_device(
    cm: CompressibleModel, space: SearchSpace, policy: Policy, device: Device, path: Path
) -> tuple[Any, tuple[int, ...] | None, bool]:
    """The compressed model in the form ``device`` runs it: (model, input shape, int8).

    ONNX Runtime devices get an ONNX file with each layer at the precision its bits run at
    (``compression.mixed_precision``: int8 QDQ, 4-bit MatMulNBits or fp32, the rule the
    features encode; ``int8``: any layer is quantized); ExecuTorch / OpenVINO devices their
    ``.pte`` / IR zip with the layers that have ``bits`` in int8
    (``compression.export_runtimes``); torch devices get the GraphModule (fake-quantized
    weights run in fp32).
    """
    compressed = apply_policy(cm, policy)
    if device.runtime in EXPORT_RUNTIMES:  # ExecuTorch .pte / OpenVINO IR zip, int8 per layer
        int8_layers = int8_layer_names(space, policy)
        batches = _calibration_batches(cm.input_shape) if int8_layers else None
        example = cm.example_input(1)
        exported = export_for_runtime(
            device.runtime, compressed.gm, example, path, int8_layers=int8_layers, calibration=batches
        )
        return exported, None, bool(int8_layers)
    if device.runtime != "onnxruntime":
        return compressed.gm, (1, *cm.input_shape), False
    onnx_path = export_onnx(compressed.gm, cm.example_input(1), path, check=False)
    if not compressed.bits:
        return onnx_path, None, False
    batches = _calibration_batches(cm.input_shape)
    out, precision = export_policy_onnx(compressed, onnx_path, batches, path.with_name(path.stem + "-q.onnx"))
    return out, None, bool(precision)


def export_sample(
    sample: CalibrationSample, device: Device, workdir: Path, dense_cache: dict[str, Any]
) -> tuple[Any, Any, tuple[int, ...] | None, bool, bool]:
    """(dense model, the sample's model, input shape, int8, first) as ``device`` runs them.

    The dense model is exported once per measured model (``dense_cache``, by space id);
    ``first`` says it was exported now, i.e. its timing is new too.
    """
    safe = sample.space_id.replace("@", "_").replace("/", "_")
    first = sample.space_id not in dense_cache
    if first:
        dense_cache[sample.space_id] = export_for_device(
            sample.model, sample.space, Policy.dense(), device, workdir / f"{safe}-dense.onnx"
        )[0]
    model, shape, int8 = export_for_device(
        sample.model, sample.space, sample.policy, device, workdir / f"{safe}-{sample.policy.hash}.onnx"
    )
    return dense_cache[sample.space_id], model, shape, int8, first


def measure_sample(
    sample: CalibrationSample,
    device: Device,
    workdir: Path,
    *,
    runs: int = 100,
    warmup: int = 10,
    dense_cache: dict[str, Any] | None = None,
    profile: bool = True,
    guard: LoadGuard | None = None,
) -> list[LatencyRecord]:
    """Measure one sample (and its dense model, the first time) on ``device``.

    With ``profile`` (ONNX Runtime devices) each model is also run under the runtime's
    profiler and its per-node times stored (``measurement["profile"]``): they teach the
    kernel predictor how the model's time splits over its kernels. With ``guard`` a run
    taken under load is re-timed, and the sample refused (``SampleRefused``) if every
    timing was (``latency_models.load_guard``).
    """
    dense_cache = {} if dense_cache is None else dense_cache
    model_a, model_b, shape, int8, first = export_sample(sample, device, workdir, dense_cache)

    def timing() -> PairMeasurement:
        return measure_pair(
            model_a, model_b, device, runs=runs, warmup=warmup, input_shape=shape, with_reference=True
        )

    if guard is None:
        pair = timing()
    else:
        try:
            pair = guard.timed(
                timing, lambda m: m.b.reference_median_ms, f"{sample.space_id} {sample.policy.hash}"
            )
        except SampleRefused:
            if first:  # the model's dense record is still to take: with its next sample
                dense_cache.pop(sample.space_id, None)
            raise
    a, b = pair.a, pair.b
    profiles = {}
    if profile and device.runtime == "onnxruntime":
        profiles["profile"] = profile_onnx(model_b, device)
        if first:
            profiles["dense_profile"] = profile_onnx(model_a, device)
    return sample_records(
        sample,
        b,
        a,
        speedup=pair.speedup,
        int8=int8,
        with_dense=first,
        extra=profiles,
        dense_extra={"profile": profiles.get("dense_profile")},
    )


def sample_records(
    sample: CalibrationSample,
    b: Measurement,
    a: Measurement | None,
    *,
    speedup: float | None,
    int8: bool,
    with_dense: bool,
    extra: dict[str, Any] | None = None,
    dense_extra: dict[str, Any] | None = None,
) -> list[LatencyRecord]:
    """The training records of one measured sample: ``b`` (the compressed model) against the dense
    ``a`` timed in the same run, plus the dense model's own record when ``with_dense``.

    Local measurement and the service's device-agent results both build records here.
    """
    out = [
        LatencyRecord(
            policy=sample.policy,
            latency_ms=b.median_ms,
            ratio=b.ratio_to_reference,
            reference_ms=b.reference_median_ms,
            dense_latency_ms=a.median_ms if a else None,
            dense_ratio=a.ratio_to_reference if a else None,
            speedup=speedup,
            int8=int8,
            measurement={"compressed": b.to_dict(), **({"dense": a.to_dict()} if a else {}), **(extra or {})},
            arch_id=sample.arch_id,
            space_id=sample.space_id,
            space=sample.space,
        )
    ]
    if with_dense and a is not None:
        out.append(
            LatencyRecord(
                policy=Policy.dense(),
                latency_ms=a.median_ms,
                ratio=a.ratio_to_reference,
                reference_ms=a.reference_median_ms,
                dense_latency_ms=a.median_ms,
                dense_ratio=a.ratio_to_reference,
                speedup=1.0,
                int8=False,
                measurement={"dense": a.to_dict(), **(dense_extra or {})},
                arch_id=sample.arch_id,
                space_id=sample.space_id,
                space=sample.space,
            )
        )
    return out


def calibrate(
    device: Device | str,
    samples: int = 200,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    runs: int = 100,
    warmup: int = 10,
    store: DeviceStore | None = None,
    zoo_fraction: float = 0.3,
    plan: Iterable[CalibrationSample] | None = None,
    guard: LoadGuard | None = None,
) -> list[LatencyRecord]:
    """Measure ``samples`` compressed models on ``device``; returns the records.

    ``plan`` replaces the general sampling plan (e.g. ``latency_models.focus.focused_plan``
    for one model); it is cut at ``samples``.

    With ``store`` each sample's records are appended as soon as measured, so an
    interrupted calibration keeps what it timed. A sample whose export or quantization
    fails is skipped (and reported through ``progress``), never fatal; so is one timed under
    load (``guard``, a fresh ``LoadGuard()`` by default: pass one to read its counts).
    """
    guard = LoadGuard() if guard is None else guard
    dev = device if isinstance(device, Device) else get_device(device)
    if not dev.is_local:
        raise ValueError(f"device {dev.name} is remote: its device agent measures, not this process")
    records: list[LatencyRecord] = []
    dense_cache: dict[str, Any] = {}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="mt-calib-") as tmp:
        todo = plan if plan is not None else sample_plan(samples, seed=seed, zoo_fraction=zoo_fraction)
        for i, sample in enumerate(itertools.islice(todo, samples)):
            try:
                new = measure_sample(
                    sample, dev, Path(tmp), runs=runs, warmup=warmup, dense_cache=dense_cache, guard=guard
                )
            except Exception as exc:  # one bad model must not end a long calibration
                if progress:
                    progress(i + 1, samples, f"skipped {sample.space_id}: {type(exc).__name__}: {exc}"[:200])
                continue
            records.extend(new)
            if store is not None:
                store.append(new)
            if progress:
                progress(i + 1, samples, f"{sample.space_id} {new[0].latency_ms:.3f} ms")
    if guard.retried:
        log.info(
            "calibration of %s: %d of %d samples re-timed under load, %d refused",
            dev.name,
            guard.retried,
            guard.samples,
            guard.refused,
        )
    return records


def fit_predictors(
    records: Sequence[LatencyRecord],
    *,
    kinds: Sequence[str] = KINDS,
    target: Target = "ratio",
    seed: int = 0,
    test_fraction: float = 0.25,
    store: DeviceStore | None = None,
    statistic: str = "min",
    extra: Mapping[str, Any] | None = None,
    focus: str | None = None,
) -> tuple[dict[str, Predictor], dict[str, Any], int | None]:
    """Held-out metrics of every kind (architecture split), then each kind refitted on all records.

    ``statistic`` picks which statistic of each measurement's timed runs the predictors learn
    (``with_statistic``): ``min`` (default) is the steadiest on a shared machine, ``median``
    the usual choice on a quiet device; records from older harness versions that lack the
    reference's fast tail make the fit fall back to ``median`` (``doc["statistic"]`` says).
    The default kind is the one with the best mean of its held-out ±10 % figures for the ratio
    to the reference and for the speedup over the dense model: both are ratios taken in one run,
    so the machine's drift between runs does not pick the kind (the absolute-latency figures,
    which carry that drift, are reported beside them and used only when records lack a
    reference).
    ``focus`` (a space id: the model a job calibrated for) chooses the default by the same
    figures on held-out *policies of that model* instead (``latency_models.focus``): the
    searches that follow ask only about that model, and the architecture split of a focused
    calibration holds only its few random architectures (a handful of measurements).
    ``extra`` is stored in the metrics document as given (the device's capabilities).
    Returns (predictors, metrics document, stored version or None).
    """
    requested = statistic
    if not supports_statistic(records, statistic):
        statistic = "median"  # older measurements: keep one statistic for all of them
    records = with_statistic(records, statistic)
    per_kind: dict[str, dict[str, float]] = {}
    fitted: dict[str, Predictor] = {}
    for kind in kinds:
        cls = REGISTRY[kind]
        m = holdout_metrics(
            functools.partial(cls, target=target, seed=seed), records, test_fraction=test_fraction, seed=seed
        )
        per_kind[kind] = m
        p = cls(target=target, seed=seed).fit(records)
        p.metrics = m
        p.statistic = statistic
        fitted[kind] = p

    def in_one_run(m: dict[str, float], what: str) -> float:
        return m.get(f"ratio_{what}", m.get(what, 0.0))

    def rank(m: Mapping[str, float]) -> tuple[float, float]:
        return (
            in_one_run(dict(m), "within_10pct") + m.get("speedup_within_10pct", 0.0),
            -in_one_run(dict(m), "mape"),
        )

    on_focus: dict[str, dict[str, Any]] = {}
    if focus is not None:
        from latency_models.focus import focus_metrics

        for kind in per_kind:
            got = focus_metrics(records, focus, kind, seed=seed, test_fraction=test_fraction)
            if got is not None:
                on_focus[kind] = got
    chosen_by = "focus" if on_focus and set(on_focus) == set(per_kind) else "architectures"
    default = max(per_kind, key=lambda k: rank(on_focus[k] if chosen_by == "focus" else per_kind[k]))
    doc = {
        "target": target,
        "statistic": statistic,
        "statistic_requested": requested,
        "records": len(records),
        "architectures": len({r.arch_id for r in records}),
        "test_fraction": test_fraction,
        "split": "held-out architectures (group split by arch_id)",
        "predictors": per_kind,
        "default_chosen_by": chosen_by,
        **({"focus_by_kind": on_focus} if on_focus else {}),
        **dict(extra or {}),
    }
    version = store.save_version(fitted, doc, default) if store is not None else None
    return fitted, {**doc, "default": default}, version
