"""Per-device storage: calibration measurements and versioned predictors, all JSON / text.

Layout under ``$MODELTAILOR_DATA_DIR/devices/NAME/``::

    measurements.jsonl      one line per measured model (policy, timings, harness record)
    spaces.jsonl            the search space of every measured model, once per space_id
    predictors/v0003/       one version per fit: a folder per predictor kind
        metrics.json        held-out metrics of every kind, the default kind, data size
        kernel_gbdt/ gnn/ macs/ lookup/

Each fit becomes version N+1; nothing is overwritten, so a search can name the exact
predictor version its latencies came from.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from compression.policy import Policy
from compression.space import SearchSpace
from latency_models.features import FEATURE_VERSION, space_from_dict
from latency_models.predictors.base import LatencyRecord, Predictor, StalePredictorError, load_predictor

__all__ = ["DeviceStore", "data_dir", "record_from_json", "record_is_current", "record_to_json"]

_VERSION = re.compile(r"^v(\d{4,})$")


def data_dir() -> Path:
    """``$MODELTAILOR_DATA_DIR`` (default ``~/.modeltailor``)."""
    return Path(os.environ.get("MODELTAILOR_DATA_DIR") or Path.home() / ".modeltailor")


def record_is_current(r: LatencyRecord) -> bool:
    """Whether ``r`` was measured on the file the current export rule writes for its policy
    (``measurement["feature_version"]``, stamped when the store wrote the line; none: v1)."""
    if int(r.measurement.get("feature_version", FEATURE_VERSION)) >= FEATURE_VERSION:
        return True
    policy = r.policy
    return policy.default.bits is None and all(lp.bits is None for lp in policy.layers.values())


def record_to_json(r: LatencyRecord) -> str:
    """One measurements.jsonl line (the space goes to spaces.jsonl, by ``space_id``)."""
    return json.dumps(
        {
            "arch_id": r.arch_id,
            "space_id": r.space_id,
            "policy": r.policy.to_dict(),
            "latency_ms": r.latency_ms,
            "ratio": r.ratio,
            "reference_ms": r.reference_ms,
            "dense_latency_ms": r.dense_latency_ms,
            "dense_ratio": r.dense_ratio,
            "speedup": r.speedup,
            "int8": r.int8,
            "measurement": r.measurement,
            # the export rule / feature encoding the measured file was made under
            "feature_version": int(r.measurement.get("feature_version", FEATURE_VERSION)),
        },
        sort_keys=True,
    )


def record_from_json(line: str, spaces: Mapping[str, SearchSpace]) -> LatencyRecord:
    """Parse a measurements.jsonl line; ``spaces`` maps space_id to its space."""
    d = json.loads(line)
    return LatencyRecord(
        arch_id=d["arch_id"],
        space_id=d["space_id"],
        space=spaces[d["space_id"]],
        policy=Policy.from_dict(d["policy"]),
        latency_ms=float(d["latency_ms"]),
        ratio=d.get("ratio"),
        reference_ms=d.get("reference_ms"),
        dense_latency_ms=d.get("dense_latency_ms"),
        dense_ratio=d.get("dense_ratio"),
        speedup=d.get("speedup"),
        int8=bool(d.get("int8", False)),
        # lines written before the field existed were measured under feature version 1
        measurement={**(d.get("measurement") or {}), "feature_version": int(d.get("feature_version", 1))},
    )


class DeviceStore:
    """Measurements and predictor versions of one device."""

    def __init__(self, device: str, root: Path | None = None) -> None:
        self.device = device
        self.root = (Path(root) if root is not None else data_dir()) / "devices" / device
        self.measurements = self.root / "measurements.jsonl"
        self.spaces = self.root / "spaces.jsonl"
        self.predictors = self.root / "predictors"

    # -- measurements
    def append(self, records: Iterable[LatencyRecord]) -> int:
        """Append records (and any space not stored yet); returns how many were written."""
        self.root.mkdir(parents=True, exist_ok=True)
        known = set(self._space_lines())
        n = 0
        with self.measurements.open("a") as fm, self.spaces.open("a") as fs:
            for r in records:
                if r.space_id not in known:
                    fs.write(json.dumps({"space_id": r.space_id, "space": r.space.to_dict()}) + "\n")
                    known.add(r.space_id)
                fm.write(record_to_json(r) + "\n")
                n += 1
        return n

    def _space_lines(self) -> dict[str, Any]:
        if not self.spaces.is_file():
            return {}
        out: dict[str, Any] = {}
        for line in self.spaces.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                out[d["space_id"]] = d["space"]
        return out

    def records(self, *, current: bool = True) -> list[LatencyRecord]:
        """Every stored measurement (spaces shared between records of one model).

        ``current``: leave out measurements that the current export rule would not reproduce:
        quantized policies measured before per-layer precision (feature version 1 exported
        them all-int8 or all-fp32 by their MAC share); float policies are the same files.
        """
        if not self.measurements.is_file():
            return []
        spaces = {k: space_from_dict(v) for k, v in self._space_lines().items()}
        out = [
            record_from_json(line, spaces)
            for line in self.measurements.read_text().splitlines()
            if line.strip()
        ]
        return [r for r in out if not current or record_is_current(r)]

    # -- predictor versions
    def versions(self) -> list[int]:
        """Stored predictor versions, ascending."""
        if not self.predictors.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.predictors.iterdir() if (m := _VERSION.match(p.name)))

    def save_version(
        self, predictors: Mapping[str, Predictor], metrics: Mapping[str, Any], default: str
    ) -> int:
        """Write all predictors of one fit as version N+1 with its metrics.json; returns N+1."""
        version = (self.versions() or [0])[-1] + 1
        folder = self.predictors / f"v{version:04d}"
        tmp = self.predictors / f".v{version:04d}.tmp"
        tmp.mkdir(parents=True, exist_ok=False)
        for kind, p in predictors.items():
            p.save(tmp / kind)
        doc = {"version": version, "device": self.device, "default": default, **dict(metrics)}
        (tmp / "metrics.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
        tmp.rename(folder)  # a version appears complete or not at all
        return version

    def metrics(self, version: int | None = None) -> dict[str, Any]:
        """metrics.json of ``version`` (default: the latest)."""
        return dict(json.loads((self._folder(version) / "metrics.json").read_text()))

    def load(self, version: int | None = None, kind: str | None = None) -> tuple[Predictor, int, str]:
        """(predictor, version, kind): ``kind`` defaults to the version's default kind.

        Raises:
            StalePredictorError: the version was fitted on an older feature encoding; the
                message names the command that refits this device.
        """
        folder = self._folder(version)
        meta = json.loads((folder / "metrics.json").read_text())
        kind = kind or meta["default"]
        if not (folder / kind).is_dir():
            raise FileNotFoundError(f"{folder}: no predictor {kind!r}")
        try:
            return load_predictor(folder / kind), int(meta["version"]), kind
        except StalePredictorError as exc:
            raise StalePredictorError(
                str(exc).replace("--device NAME", f"--device {self.device}")
                + f" (a newer fit becomes version {self.versions()[-1] + 1})"
            ) from exc

    def _folder(self, version: int | None) -> Path:
        versions = self.versions()
        if not versions:
            raise FileNotFoundError(
                f"no predictor for device {self.device!r} under {self.root}; "
                f"run `modeltailor calibrate --device {self.device}` first"
            )
        v = versions[-1] if version is None else version
        if v not in versions:
            raise FileNotFoundError(f"device {self.device!r} has no predictor version {v}; have {versions}")
        return self.predictors / f"v{v:04d}"
