"""Calibration in the loop for ``modeltailor search``: a device this process times, and its store
in the user's data directory (``modeltailor calibrate`` writes the same store).

:class:`LocalMeasuringDevice` is ``engine.active_measurement.MeasuringDevice`` without a server:
policies are timed by the calibration's harness transport in this process and appended to the
device's ``measurements.jsonl``; a refit is written as the store's next version (so the next
``modeltailor search`` on the device starts from it, as a job of the service would).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compression.policy import Policy
from latency_models.devices import Device
from latency_models.focus import model_ids
from latency_models.incremental import Measured

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from latency_models.predictors import Predictor
    from latency_models.store import DeviceStore


@dataclass(frozen=True)
class StoredPredictor:
    """A version of a local device's store, ready to answer (``engine.job.LoadedPredictor``)."""

    predictor: Predictor
    version: int
    kind: str
    capabilities: Mapping[str, Any] | None = None


def load_stored(store: DeviceStore) -> StoredPredictor | None:
    """The store's newest version (None without one)."""
    if not store.versions():
        return None
    predictor, version, kind = store.load()
    caps = store.metrics(version).get("capabilities")
    return StoredPredictor(predictor, version, kind, caps if isinstance(caps, dict) else None)


def cli_model_ids(model: CompressibleModel, spec: str) -> tuple[str, str]:
    """(arch_id, space_id) of the CLI's ``MODEL`` argument, as the service names an upload (by
    the file's hash) or a zoo model (by its name), so both feed the same measurements."""
    path = Path(spec)
    if path.is_file():
        return model_ids(model, hashlib.sha256(path.read_bytes()).hexdigest(), None)
    return model_ids(model, None, spec)


def model_seen(store: DeviceStore, space_id: str) -> bool:
    """Whether the store's measurements include model ``space_id``."""
    if not store.spaces.is_file():
        return False
    needle = f'"space_id": "{space_id}"'
    return any(needle in line for line in store.spaces.read_text().splitlines())


class LocalMeasuringDevice:
    """Times policies with the harness in this process; keeps them and refits in ``store``."""

    def __init__(self, device: Device, store: DeviceStore, *, seed: int = 0) -> None:
        self.device = device
        self.store = store
        self.seed = seed

    def measure_policies(
        self,
        model: CompressibleModel,
        ids: tuple[str, str],
        policies: Sequence[Policy],
        *,
        purpose: str,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Measured]:
        from latency_models.calibration_run import HarnessTransport
        from latency_models.incremental import measure_policies

        measured = measure_policies(HarnessTransport(self.device), model, ids, policies, progress=progress)
        records = [r for m in measured for r in m.records]
        if records:
            self.store.append(records)
        return measured

    def refit(self, base: Any, note: Mapping[str, Any]) -> StoredPredictor:
        from latency_models import incremental

        records = self.store.records()
        predictor = incremental.refit(records, base.predictor, seed=self.seed)
        doc = incremental.refit_document(
            records, predictor, base_version=base.version, capabilities=base.capabilities, note=note
        )
        version = incremental.save_version(self.store, predictor, doc)
        return StoredPredictor(predictor, version, predictor.kind, base.capabilities)
