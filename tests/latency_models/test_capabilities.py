"""What a device accelerates: measured with real ONNX Runtime on this CPU, decided, stored.

* The calibration's harness transport times the probe trials; the chosen channel multiple is
  one of the measured candidates, every registered scheme and int8 get a speedup and a reason.
* The decision rules on known timings: a kernel that pads to blocks of 16 (or 8) channels gives
  round_to 16 (or 8); a scheme below the speedup threshold is size-only.
* Capabilities round-trip through JSON and through a predictor version's metrics.json.
* A space resolved for a device: its multiple when round_to is unset (the user's wins), size-only
  schemes left out of the default space of a latency search and marked when listed.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest

from compression import schemes
from engine.device_space import resolve_space
from engine.spec import SpaceSpec
from latency_models.calibration_run import HarnessTransport, predictor_metrics
from latency_models.capabilities import (
    BASE_WIDTH,
    INT8,
    SPEEDUP_THRESHOLD,
    Capabilities,
    decide,
    measure_capabilities,
    plan_trials,
    width_for,
)
from latency_models.devices import get_device

FINE = tuple(s.name for s in schemes.schemes() if s.name != schemes.DENSE)


class _Go:
    def check_stop(self) -> None:
        return None


@pytest.fixture(scope="module")
def measured() -> Capabilities:
    """Few trials, few runs: three multiples on the conv probe, every scheme and int8 on it."""
    trials = plan_trials(multiples=(1, 8, 16), probes=("conv",))
    transport = HarnessTransport(get_device("cpu-ort-1t"))
    with tempfile.TemporaryDirectory() as tmp:
        return measure_capabilities(
            lambda ts: transport.time_trials(ts, runs=20, workdir=Path(tmp), sink=_Go()),  # type: ignore[arg-type]
            trials,
        )


def test_real_onnx_runtime_measurement_has_the_expected_structure(measured: Capabilities) -> None:
    assert measured.round_to in (1, 8, 16)  # one of the measured candidates
    assert set(measured.channel_efficiency) == {1, 8, 16}
    assert all(0 < e < 3 for e in measured.channel_efficiency.values())
    assert set(measured.measured_schemes) == {*FINE, INT8}
    assert set(measured.accelerated_schemes) <= set(measured.measured_schemes)
    for name in measured.measured_schemes:
        ratio = measured.scheme_speedups[name]
        assert math.isfinite(ratio) and ratio > 0
        assert (name in measured.accelerated_schemes) == (ratio >= SPEEDUP_THRESHOLD)
        assert measured.reasons[name].startswith("accelerated" if ratio >= SPEEDUP_THRESHOLD else "size-only")
    assert set(measured.size_only) == set(measured.measured_schemes) - set(measured.accelerated_schemes)
    assert str(measured.round_to) in measured.reasons["round_to"]
    keys = {f"conv/width/{width_for(m)}" for m in (1, 8, 16)} | {f"conv/scheme/{s}" for s in (*FINE, INT8)}
    assert set(measured.ratios) == keys


def test_capabilities_round_trip_through_json_and_a_stored_predictor_version(
    measured: Capabilities, tmp_path: Path
) -> None:
    from latency_models.calibrate import fit_predictors
    from latency_models.store import DeviceStore
    from latency_models.testing import synthetic_records

    doc = measured.to_dict()
    again = Capabilities.from_dict(doc)
    assert again.to_dict() == doc and again.round_to == measured.round_to
    assert again.size_only == measured.size_only

    store = DeviceStore("cpu-ort-1t", root=tmp_path)
    _, fitted, version = fit_predictors(
        synthetic_records(), kinds=("macs",), store=store, extra={"capabilities": doc}
    )
    stored = Capabilities.from_stored(store.metrics(version)["capabilities"])
    assert stored is not None and stored.to_dict() == doc
    # and the published metrics (predictor rows, REST) carry them
    assert predictor_metrics(fitted)["capabilities"] == doc
    assert Capabilities.from_stored(None) is None and Capabilities.from_stored({"round_to": "x"}) is None
    with pytest.raises(ValueError, match="round_to"):
        Capabilities.from_dict({**doc, "round_to": 0})


def _padded(block: int) -> dict[str, float]:
    """Speedups of a kernel that computes channels in blocks of ``block`` (time ∝ padded width)."""
    pad = lambda w: block * math.ceil(w / block)  # noqa: E731
    out = {f"conv/width/{width_for(m)}": BASE_WIDTH / pad(width_for(m)) for m in (1, 2, 4, 8, 16, 32)}
    out.update({f"conv/scheme/{s}": 1.0 for s in FINE})
    out["conv/scheme/nm"] = 1.3  # a runtime with N:M kernels
    out[f"conv/scheme/{INT8}"] = 2.0
    return out


@pytest.mark.parametrize("block", [16, 8, 1])
def test_decision_rules_on_known_timings(block: int) -> None:
    trials = plan_trials(probes=("conv",))
    caps = decide(trials, _padded(block))
    assert caps.round_to == block
    assert set(caps.accelerated_schemes) == {"nm", INT8}
    assert set(caps.size_only) == set(FINE) - {"nm"}
    assert "no faster" not in caps.reasons["nm"] and "size-only" in caps.reasons["unstructured"]


def test_no_width_timing_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="channel multiple"):
        decide(plan_trials(probes=("conv",)), {})


def _caps() -> Capabilities:
    return Capabilities(
        round_to=16,
        accelerated_schemes=(INT8,),
        measured_schemes=(*FINE, INT8),
        reasons={s: f"size-only: {s} ran 1.00x" for s in FINE} | {"round_to": "multiples of 16"},
    )


def test_a_latency_search_space_follows_the_device() -> None:
    default = resolve_space(SpaceSpec(), _caps(), latency_objective=True)
    assert default.options.round_to == 16 and default.round_to_source == "device"
    assert default.options.schemes == ("dense",) and default.options.bits == (None, 8)
    assert set(default.left_out) == set(FINE) and "ran 1.00x" in default.left_out["nm"]
    assert "left out as size-only" in default.note()

    mine = resolve_space(SpaceSpec(round_to=4, schemes=["nm"]), _caps(), latency_objective=True)
    assert mine.options.round_to == 4 and mine.round_to_source == "space"
    assert mine.options.schemes == ("dense", "nm") and set(mine.size_only) == {"nm"} and not mine.left_out

    size_search = resolve_space(SpaceSpec(), _caps(), latency_objective=False)
    assert size_search.options.schemes == ("dense", *FINE) and set(size_search.size_only) == set(FINE)

    unmeasured = resolve_space(SpaceSpec(), None, latency_objective=True)
    assert unmeasured.options == SpaceSpec().space_options() and unmeasured.round_to_source == "default"


def test_int8_size_only_is_left_out_of_the_default_bits() -> None:
    caps = Capabilities(
        round_to=1,
        accelerated_schemes=(),
        measured_schemes=(INT8,),
        reasons={INT8: "size-only: int8 ran 0.98x"},
    )
    assert resolve_space(SpaceSpec(), caps, latency_objective=True).options.bits == (None,)
    listed = resolve_space(SpaceSpec(bits=[None, 8]), caps, latency_objective=True)
    assert listed.options.bits == (None, 8) and INT8 in listed.size_only
