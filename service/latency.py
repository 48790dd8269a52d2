"""Device latency inside the service: predictor versions, calibrations, and device-agent tasks.

Three things live here, all keyed by a device row of the database:

* **Predictor versions.** A device's measurements and predictors are a
  ``latency_models.store.DeviceStore`` under the service's data directory (built-in devices
  use their plain name, so ``modeltailor calibrate --device cpu-ort-1t`` with the same data
  directory feeds the service, and the other way round; a tenant's device gets
  ``t<tenant>-<name>``). A built-in device is shared by every tenant: what a tenant's job
  calibrates on it goes to that tenant's own store (``<name>@t<tenant>``) and predictors,
  which no other tenant sees or uses; only the admin's calibrations make the device's own.
  Every stored version is mirrored into the ``predictors`` table with its held-out metrics
  and a version number unique on the device (:func:`sync_predictors`), and
  :func:`current_predictor` loads the one a tenant's job uses (its own newest, else the
  device's newest, or a named version), cached per process.
* **Calibrations.** A ``calibrations`` row is the handle of one calibration: measure sampled
  compressed models on the device, then fit a new predictor version
  (:class:`CalibrationRun`). At most one calibration per device is active at a time (a
  unique column, see ``db.models.Calibration``); whoever runs it renews ``heartbeat_at``, and
  a running calibration whose heartbeat is older than :data:`STALE_S` was abandoned by a dead
  process and is marked failed when next looked at.
* **Measurement tasks.** A device of kind ``remote`` is measured by a device agent
  (``modeltailor device-agent``) that pulls tasks over REST. A task is a ``measurements``
  row (status pending → claimed → done | failed): the server writes the ONNX files into a
  per-device blob folder, the agent downloads them by sha256, times them, and posts the
  result. A claimed task not answered within :data:`TASK_LEASE_S` is handed out again (the
  agent died); results are idempotent by task id. Local devices are measured in-process.

Heavy imports (torch, the predictors) happen inside functions: the API imports this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Calibration, Device, Measurement, Predictor, utcnow
from latency_models.focus import (  # re-exported: the service's calibrations use them
    FOCUSED_RANDOM_FRACTION,
    focus_metrics,
    focused_plan,
    model_ids,
)
from service.settings import Timeouts

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.policy import Policy
    from compression.space import SearchSpace
    from latency_models.harness import Measurement as HarnessMeasurement
    from latency_models.predictors import LatencyRecord
    from latency_models.predictors import Predictor as LatencyPredictor
    from latency_models.sampling import CalibrationSample
    from latency_models.store import DeviceStore

log = logging.getLogger("modeltailor.latency")


_TIMEOUTS = Timeouts()  # a bad MODELTAILOR_* value fails the import, naming the field
#: A running calibration whose heartbeat is older than this was abandoned
#: (``MODELTAILOR_CALIBRATION_STALE_S``, default 300).
STALE_S: float = _TIMEOUTS.calibration_stale_s
#: A claimed task not answered within this long is handed to the next agent that asks
#: (``MODELTAILOR_TASK_LEASE_S``, default 600).
TASK_LEASE_S: float = _TIMEOUTS.task_lease_s
#: How long a calibration waits for any device agent to pick up its tasks before failing
#: (``MODELTAILOR_AGENT_WAIT_S``, default 900).
AGENT_WAIT_S: float = _TIMEOUTS.agent_wait_s
#: A task handed out this many times without a result fails.
MAX_TASK_ATTEMPTS = 3
#: Tasks of one calibration outstanding at once on a remote device (keeps agents busy).
TASK_WINDOW = 4
#: Focused calibration (a job's model): samples and the share of random architectures.
FOCUSED_SAMPLES = 48
POLL_S = 0.25
ACTIVE = ("queued", "running")

Progress = Callable[[int, int, str], None]


class CalibrationError(RuntimeError):
    """A calibration could not produce a predictor (the message says why and what to do)."""


class CalibrationStopped(CalibrationError):
    """The calibration was cancelled (by a user, its job, or the process stopping)."""


# --------------------------------------------------------------------------- stores


def store_key(device: Device, tenant_id: int | None = None) -> str:
    """Folder name of a store: a built-in's name, ``t<tenant>-<name>`` for a tenant's device, and
    ``<name>@t<tenant>`` for a tenant's own predictors of a built-in (no device name has ``@``)."""
    if device.tenant_id is not None:
        return f"t{device.tenant_id}-{device.name}"
    return device.name if tenant_id is None else f"{device.name}@t{tenant_id}"


def device_store(data_dir: Path, device: Device, tenant_id: int | None = None) -> DeviceStore:
    """The measurement / predictor store of ``device`` (of ``tenant_id``'s own predictors of a
    shared device) under the service's data directory."""
    from latency_models.store import DeviceStore

    return DeviceStore(store_key(device, tenant_id), root=Path(data_dir))


def scope_of(device: Device, tenant_id: int | None) -> int | None:
    """Whose predictors a tenant's calibration of ``device`` makes: the tenant's own on a shared
    device, the device's own (None) on a tenant's device."""
    return tenant_id if device.tenant_id is None else None


#: Held-out figures shown at the top level of a predictor's metrics (the rest under "detail").
HEADLINE_METRICS = (
    "within_10pct",
    "within_5pct",
    "mape",
    "rmse_ms",
    "speedup_within_10pct",
    "speedup_mape",
    "n_train",
)


def predictor_metrics(doc: dict[str, Any], holdout: dict[str, Any] | None = None) -> dict[str, Any]:
    """The predictors-table form of a version's metrics.json.

    Top level: the default kind's headline held-out figures (numbers only, so a table can show
    them) plus ``n_test`` / ``records`` / ``architectures``; ``kind`` and every kind's full
    metrics under ``detail``; held-out (measured, predicted) pairs under ``holdout`` when known.
    """
    default = str(doc.get("default", ""))
    per_kind: dict[str, Any] = dict(doc.get("predictors") or {})
    mine: dict[str, Any] = dict(per_kind.get(default) or {})
    out: dict[str, Any] = {k: mine[k] for k in HEADLINE_METRICS if isinstance(mine.get(k), (int, float))}
    if isinstance(mine.get("n"), (int, float)):
        out["n_test"] = mine["n"]
    for key in ("records", "architectures"):
        if isinstance(doc.get(key), (int, float)):
            out[key] = doc[key]
    out["detail"] = {
        "kind": default,
        "target": doc.get("target"),
        "split": doc.get("split"),
        "test_fraction": doc.get("test_fraction"),
        "predictors": per_kind,
        **({"failed_kinds": doc["failed_kinds"]} if doc.get("failed_kinds") else {}),
    }
    if holdout:
        out["holdout"] = holdout
    return out


def _folder_names(session: Session, device_id: int, scope: int | None) -> set[str]:
    """Version folders of one store that have a predictors row (names, so a moved data dir matches)."""
    owner = Predictor.tenant_id.is_(None) if scope is None else Predictor.tenant_id == scope
    paths = session.scalars(
        select(Predictor.artifact_path).where(Predictor.device_id == device_id, owner)
    ).all()
    return {Path(p).name for p in paths if p}


def _mirror(session: Session, device: Device, data_dir: Path, scope: int | None) -> None:
    """Add a predictors row for every version of one store that has none. Commits when it adds."""
    store = device_store(data_dir, device, scope)
    versions = store.versions()
    known = _folder_names(session, device.id, scope)
    if all(f"v{v:04d}" in known for v in versions):
        return
    # Version numbers are allocated across the device's stores: one mirror at a time per device
    # (a row lock on PostgreSQL; SQLite transactions take the write lock anyway).
    session.scalar(select(Device.id).where(Device.id == device.id).with_for_update())
    known = _folder_names(session, device.id, scope)
    top = session.scalar(select(func.max(Predictor.version)).where(Predictor.device_id == device.id)) or 0
    for version in versions:
        folder = store.predictors / f"v{version:04d}"
        if folder.name in known:
            continue
        try:
            doc = store.metrics(version)
        except (OSError, ValueError) as exc:
            log.warning("device %s: unreadable predictor version %s: %s", device.name, folder, exc)
            continue
        top += 1
        session.add(
            Predictor(
                device_id=device.id,
                version=top,
                tenant_id=scope,
                kind=str(doc.get("default", "")),
                metrics=predictor_metrics(doc, doc.get("holdout_pairs")),
                artifact_path=str(folder),
                sha256=hashlib.sha256((folder / "metrics.json").read_bytes()).hexdigest(),
            )
        )
    session.commit()


def sync_predictors(
    session: Session, *, device: Device, data_dir: Path, tenant_id: int | None = None
) -> list[Predictor]:
    """Mirror the stored predictor versions ``tenant_id`` may use into the predictors table.

    Versions written outside the service (``modeltailor calibrate``) appear here too. Returns
    the rows ``tenant_id`` may see, oldest first: the device's own, and on a shared device the
    tenant's own as well. Commits.
    """
    scopes = [None] if tenant_id is None or device.tenant_id is not None else [None, tenant_id]
    for scope in scopes:
        _mirror(session, device, data_dir, scope)
    owner = or_(Predictor.tenant_id.is_(None), Predictor.tenant_id == tenant_id)
    return list(
        session.scalars(
            select(Predictor).where(Predictor.device_id == device.id, owner).order_by(Predictor.version)
        )
    )


def preferred(rows: Sequence[Predictor], version: int | None = None) -> Predictor | None:
    """The predictor a tenant's job uses among ``rows`` (from :func:`sync_predictors`): ``version``
    if named, else the tenant's own newest, else the device's newest."""
    if version is not None:
        return next((p for p in rows if p.version == version), None)
    own = [p for p in rows if p.tenant_id is not None]
    newest = own or rows
    return newest[-1] if newest else None


@dataclass(frozen=True)
class LoadedPredictor:
    """A predictor ready to answer, which version of which device it is, and whose (None: the
    device's own)."""

    predictor: LatencyPredictor
    version: int
    kind: str
    device: str
    tenant_id: int | None = None


_CACHE: dict[tuple[str, int], tuple[Any, int, str]] = {}
_CACHE_LOCK = threading.Lock()


def current_predictor(
    session: Session, *, data_dir: Path, device: Device, tenant_id: int | None, version: int | None = None
) -> LoadedPredictor | None:
    """The predictor ``tenant_id``'s jobs use on ``device`` (or ``version``); None when there is none.

    Rows without a stored folder (nothing to load) are passed over. Commits (mirrors first).
    """
    rows = sync_predictors(session, device=device, data_dir=data_dir, tenant_id=tenant_id)
    row = preferred([p for p in rows if p.artifact_path], version)
    if row is None or row.artifact_path is None:
        return None
    store = device_store(data_dir, device, row.tenant_id)
    stored = int(Path(row.artifact_path).name.removeprefix("v"))  # the store's own number
    key = (str(store.root), stored)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is None:
        cached = store.load(stored, row.kind or None)
        with _CACHE_LOCK:
            _CACHE[key] = cached
    predictor, _stored, kind = cached
    return LoadedPredictor(predictor, row.version, kind, device.name, row.tenant_id)


def model_seen(data_dir: Path, device: Device, space_id: str, tenant_id: int | None = None) -> bool:
    """Whether the measurements of one store (see :func:`device_store`) include model ``space_id``."""
    store = device_store(data_dir, device, tenant_id)
    if not store.spaces.is_file():
        return False
    needle = f'"space_id": "{space_id}"'
    return any(needle in line for line in store.spaces.read_text().splitlines())


# --------------------------------------------------------------------------- calibration rows


def _fresh(cal: Calibration, now: dt.datetime) -> bool:
    beat = cal.heartbeat_at or cal.created_at
    return (now - beat).total_seconds() < STALE_S


def end_calibration(
    session: Session,
    cal: Calibration,
    *,
    status: str,
    error: str | None = None,
    version: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    """Mark ``cal`` ended (releasing the device's active slot). Commits."""
    cal.status = status
    cal.active_device_id = None
    cal.error = error
    cal.finished_at = utcnow()
    if version is not None:
        cal.predictor_version = version
    if metrics is not None:
        cal.metrics = metrics
    session.commit()


def cancel_calibration(session: Session, *, calibration_id: int, by: str) -> bool:
    """queued / running → cancelled at once, freeing the device for the next calibration
    (compare-and-set; False when it had ended already). Commits.

    Whoever runs it stops at its next sample. A cancel that lands while the predictors are
    being fitted leaves the version that fit stores.
    """
    result = session.execute(
        update(Calibration)
        .where(Calibration.id == calibration_id, Calibration.status.in_(ACTIVE))
        .values(status="cancelled", active_device_id=None, error=f"cancelled by {by}", finished_at=utcnow())
    )
    session.commit()
    return bool(getattr(result, "rowcount", 0))


def calibration_scope(cal: Calibration) -> int | None:
    """The tenant whose own predictors ``cal`` makes; None for the device's own (the default of
    calibrations made before scopes existed)."""
    return cal.tenant_id if cal.params.get("scope") == "tenant" else None


def active_calibration(session: Session, *, device_id: int) -> Calibration | None:
    """The device's queued or running calibration; an abandoned one is failed on the way. Commits."""
    cal = session.scalar(select(Calibration).where(Calibration.active_device_id == device_id))
    if cal is None:
        return None
    if cal.status == "running" and not _fresh(cal, utcnow()):
        end_calibration(
            session, cal, status="failed", error="interrupted: the process running it stopped responding"
        )
        return None
    return cal


def create_calibration(
    session: Session,
    *,
    device: Device,
    tenant_id: int | None,
    params: dict[str, Any],
    job_id: int | None = None,
    model_id: int | None = None,
) -> Calibration | None:
    """Queue a calibration of ``device``; None if one is already active. Commits."""
    if active_calibration(session, device_id=device.id) is not None:
        return None
    total = int(params.get("samples", 0))
    cal = Calibration(
        device_id=device.id,
        tenant_id=tenant_id,
        active_device_id=device.id,
        job_id=job_id,
        model_id=model_id,
        status="queued",
        params=params,
        progress={"done": 0, "total": total, "message": "queued"},
        heartbeat_at=utcnow(),
    )
    session.add(cal)
    try:
        session.commit()
    except IntegrityError:  # another calibration of this device won the race
        session.rollback()
        return None
    return cal


def claim_calibration(session: Session, *, calibration_id: int, owner: str) -> bool:
    """queued → running for ``owner`` (compare-and-set). Commits."""
    now = utcnow()
    result = session.execute(
        update(Calibration)
        .where(Calibration.id == calibration_id, Calibration.status == "queued")
        .values(status="running", owner=owner, heartbeat_at=now, started_at=now)
    )
    session.commit()
    return bool(getattr(result, "rowcount", 0))


# --------------------------------------------------------------------------- blobs and tasks


def blob_dir(data_dir: Path, device_id: int) -> Path:
    """Where the ONNX files of a device's tasks live (named by their sha256)."""
    return Path(data_dir) / "device_blobs" / str(device_id)


def put_blob(data_dir: Path, device_id: int, path: Path) -> str:
    """Copy ``path`` into the device's blob folder; returns its sha256."""
    data = Path(path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    folder = blob_dir(data_dir, device_id)
    target = folder / f"{sha}.onnx"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as fh:
            fh.write(data)
        os.replace(fh.name, target)
    return sha


def blob_path(data_dir: Path, device_id: int, sha256: str) -> Path | None:
    """The blob ``sha256`` of the device, if it exists (``sha256`` must be 64 hex digits)."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        return None
    path = blob_dir(data_dir, device_id) / f"{sha256}.onnx"
    return path if path.is_file() else None


def task_id(measurement_id: int) -> str:
    """The agent-facing id of a task (``m-<measurement id>``)."""
    return f"m-{measurement_id}"


def measurement_id(task: str) -> int | None:
    """Inverse of :func:`task_id`; None for ids this server never issued."""
    if not task.startswith("m-") or not task[2:].isdigit() or len(task) > 14:
        return None
    n = int(task[2:])
    return n if n <= 2**31 - 1 else None  # larger ids fit no id column


def task_json(m: Measurement) -> dict[str, Any]:
    """The ``latency_models.tasks`` JSON of a pending measurement row."""
    spec = m.spec

    def ref(sha: str) -> dict[str, str]:
        return {"sha256": sha, "url": f"/v1/devices/{m.device_id}/blobs/{sha}"}

    out: dict[str, Any] = {
        "id": task_id(m.id),
        "model": ref(spec["model_sha256"]),
        "runs": int(spec.get("runs", 100)),
        "warmup": int(spec.get("warmup", 10)),
    }
    if spec.get("input_shape"):
        out["input_shape"] = list(spec["input_shape"])
    if spec.get("baseline_sha256"):
        out["baseline"] = ref(spec["baseline_sha256"])
    if spec.get("reference_sha256"):
        out["reference"] = ref(spec["reference_sha256"])
    return out


def add_task(
    session: Session,
    *,
    data_dir: Path,
    device: Device,
    tenant_id: int | None,
    purpose: str,
    model: Path,
    baseline: Path | None = None,
    runs: int = 100,
    warmup: int = 10,
    calibration_id: int | None = None,
    job_id: int | None = None,
    info: dict[str, Any] | None = None,
    features: dict[str, Any] | None = None,
) -> Measurement:
    """Queue one measurement task for the device's agents (files into the blob folder). Commits.

    The built-in reference model always travels with the task, so agents without the
    ``onnx`` package still report ratios to it.
    """
    from latency_models.harness import reference_onnx_path

    spec: dict[str, Any] = {
        "model_sha256": put_blob(data_dir, device.id, model),
        "reference_sha256": put_blob(data_dir, device.id, reference_onnx_path()),
        "runs": runs,
        "warmup": warmup,
        **(info or {}),
    }
    if baseline is not None:
        spec["baseline_sha256"] = put_blob(data_dir, device.id, baseline)
    m = Measurement(
        device_id=device.id,
        tenant_id=tenant_id,
        status="pending",
        purpose=purpose,
        spec=spec,
        features=features or {},
        calibration_id=calibration_id,
        job_id=job_id,
    )
    session.add(m)
    session.commit()
    return m


def claim_tasks(session: Session, *, device: Device, limit: int = 1) -> list[Measurement]:
    """Hand out up to ``limit`` tasks of ``device``: pending ones, or claimed ones whose agent
    went quiet for :data:`TASK_LEASE_S`. Each claim is a compare-and-set. Commits."""
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=TASK_LEASE_S)
    claimable = or_(
        Measurement.status == "pending",
        and_(Measurement.status == "claimed", Measurement.claimed_at < cutoff),
    )
    out: list[Measurement] = []
    candidates = session.scalars(
        select(Measurement.id)
        .where(Measurement.device_id == device.id, claimable)
        .order_by(Measurement.id)
        .limit(limit * 4)
    ).all()
    for mid in candidates:
        if len(out) >= limit:
            break
        row = session.get(Measurement, mid)
        if row is not None and row.attempts >= MAX_TASK_ATTEMPTS:
            session.execute(
                update(Measurement)
                .where(Measurement.id == mid, claimable)
                .values(status="failed", error=f"no result after {row.attempts} hand-outs to agents")
            )
            session.commit()
            continue
        result = session.execute(
            update(Measurement)
            .where(Measurement.id == mid, claimable)
            .values(status="claimed", claimed_at=now, attempts=Measurement.attempts + 1)
        )
        session.commit()
        if getattr(result, "rowcount", 0):
            fresh = session.get(Measurement, mid)
            if fresh is not None:
                session.refresh(fresh)
                out.append(fresh)
    return out


def check_result(result: Any) -> str | None:
    """Why an agent's ``MeasurementResult`` cannot be stored (None when it can)."""
    import math

    for what in ("measurement", "baseline"):
        m = getattr(result, what)
        if m is None:
            continue
        for name in ("median_ms", "mean_ms", "min_ms", "p10_ms", "p90_ms", "iqr_ms"):
            value = getattr(m, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{what}.{name} must be a finite number, got {value!r}"
        if m.median_ms <= 0:
            return f"{what}.median_ms must be positive, got {m.median_ms!r}"
        ratio = m.ratio_to_reference
        number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
        if ratio is not None and not (number and math.isfinite(ratio) and ratio > 0):
            return f"{what}.ratio_to_reference must be a positive finite number or null, got {ratio!r}"
    if result.speedup is not None and not (math.isfinite(result.speedup) and result.speedup > 0):
        return f"speedup must be a positive finite number, got {result.speedup!r}"
    return None


def record_result(session: Session, *, device: Device, result: Any) -> tuple[Measurement | None, bool]:
    """Store an agent's ``MeasurementResult``: (row, stored); stored is False for a repeat. Commits.

    Returns (None, False) when the task is not one of this device's.
    """
    mid = measurement_id(result.task_id)
    row = session.get(Measurement, mid) if mid is not None else None
    if row is None or row.device_id != device.id:
        return None, False
    if row.status in ("done", "failed"):
        return row, False
    row.measured_at = utcnow()
    if result.status == "ok" and result.measurement is not None:
        row.status = "done"
        row.latency_ms = float(result.measurement.median_ms)
        row.latency_stats = {
            "measurement": result.measurement.to_dict(),
            "baseline": result.baseline.to_dict() if result.baseline else None,
            "speedup": result.speedup,
            "ratio_to_reference": result.measurement.ratio_to_reference,
            "agent": dict(result.agent),
        }
        row.error = None
    else:
        row.status = "failed"
        row.error = str(result.error or "the agent reported an error")[:2000]
        row.latency_stats = {"agent": dict(result.agent)}
    session.commit()
    return row, True


def measurement_stats(m: HarnessMeasurement, **extra: Any) -> dict[str, Any]:
    """What a measurements row keeps of a harness measurement (its full record + extras)."""
    return {"measurement": m.to_dict(), "ratio_to_reference": m.ratio_to_reference, **extra}


# --------------------------------------------------------------------------- sampling


def general_plan(n: int, *, seed: int = 0) -> Iterator[CalibrationSample]:
    """The issue's calibration sampling: zoo models at several resolutions + random architectures."""
    from latency_models.sampling import sample_plan

    return sample_plan(n, seed=seed)


# --------------------------------------------------------------------------- running one


@dataclass
class CalibrationRun:
    """Runs one calibration row to its end: measure every sample, fit, store a version.

    Args:
        factory: session factory of the service database.
        data_dir: the service's data directory (stores, blobs).
        calibration_id: the row (must be claimed by ``owner`` already, or queued).
        owner: who runs it (lease owner string).
        model: the focus model for a focused plan (a job's model); None = general plan.
        model_ids: (arch_id, space_id) of ``model``.
        should_stop: polled between samples; True stops with ``CalibrationStopped``.
        progress: ``progress(done, total, message)`` after each sample.
        kinds: predictor kinds to fit (default: every kind).
    """

    factory: sessionmaker[Session]
    data_dir: Path
    calibration_id: int
    owner: str
    model: CompressibleModel | None = None
    model_ids: tuple[str, str] | None = None
    should_stop: Callable[[], bool] = lambda: False
    progress: Progress | None = None
    kinds: Sequence[str] | None = None
    _skipped: int = field(default=0, init=False)

    # -- bookkeeping
    def _beat(self, done: int, total: int, message: str) -> None:
        with self.factory() as session:
            cal = session.get(Calibration, self.calibration_id)
            if cal is None:
                raise CalibrationStopped(f"calibration {self.calibration_id} was deleted")
            if cal.status not in ACTIVE:  # cancelled over REST (or failed as abandoned)
                raise CalibrationStopped(f"calibration {self.calibration_id} was {cal.status}")
            cal.heartbeat_at = utcnow()
            cal.progress = {"done": done, "total": total, "skipped": self._skipped, "message": message[:300]}
            session.commit()
        if self.progress is not None:
            self.progress(done, total, message)

    def _check_stop(self) -> None:
        if self.should_stop():
            raise CalibrationStopped("calibration cancelled")

    def run(self) -> int:
        """Measure, fit, store; returns the new predictor version. Marks the row's outcome."""
        with self.factory() as session:
            cal = session.get(Calibration, self.calibration_id)
            if cal is None:
                raise CalibrationError(f"calibration {self.calibration_id} not found")
            if cal.status == "queued":
                claim_calibration(session, calibration_id=cal.id, owner=self.owner)
                session.refresh(cal)
            device = session.get(Device, cal.device_id)
            params = dict(cal.params)
            tenant_id = cal.tenant_id
            scope = calibration_scope(cal)
            job_id = cal.job_id
            if device is None:
                raise CalibrationError("the device was deleted")
            session.expunge(device)
        try:
            version, metrics = self._run(device, params, tenant_id, scope, job_id)
        except CalibrationStopped as exc:
            self._end("cancelled", str(exc))
            raise
        except Exception as exc:
            self._end(
                "failed",
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, CalibrationError) else str(exc),
            )
            raise
        self._end("succeeded", None, version, metrics)
        return version

    def _end(
        self,
        status: str,
        error: str | None,
        version: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        with self.factory() as session:
            cal = session.get(Calibration, self.calibration_id)
            if cal is not None and cal.status in ACTIVE:  # a cancelled one keeps its status
                end_calibration(session, cal, status=status, error=error, version=version, metrics=metrics)

    def _samples(self, params: dict[str, Any]) -> Iterator[CalibrationSample]:
        n = int(params.get("samples", FOCUSED_SAMPLES))
        seed = int(params.get("seed", 0))
        if self.model is not None and self.model_ids is not None:
            arch_id, space_id = self.model_ids
            return focused_plan(
                self.model,
                arch_id,
                space_id,
                n,
                seed=seed,
                random_fraction=float(params.get("random_fraction", FOCUSED_RANDOM_FRACTION)),
            )
        return general_plan(n, seed=seed)

    def _run(
        self,
        device: Device,
        params: dict[str, Any],
        tenant_id: int | None,
        scope: int | None,
        job_id: int | None,
    ) -> tuple[int, dict[str, Any]]:
        """Measure into and fit from the store of ``scope``; returns (predictor version, metrics)."""
        import torch

        store = device_store(self.data_dir, device, scope)
        total = int(params.get("samples", FOCUSED_SAMPLES))
        runs = int(params.get("runs", 100))
        self._beat(0, total, f"calibrating 0/{total}")
        samples = self._samples(params)
        with torch.no_grad(), tempfile.TemporaryDirectory(prefix="mt-calib-") as tmp:
            if device.kind == "remote":
                self._measure_remote(device, samples, total, runs, store, Path(tmp), tenant_id, job_id)
            else:
                self._measure_local(device, samples, total, runs, store, Path(tmp), tenant_id, job_id)
        records = store.records()
        if len({r.arch_id for r in records}) < 2:
            raise CalibrationError(
                f"device {device.name}: {len(records)} measurement(s) of fewer than two architectures; "
                "a predictor's held-out error needs at least two (were most samples skipped?)"
            )
        self._beat(total, total, f"fitting predictors on {len(records)} measurements")
        kinds = tuple(self.kinds) if self.kinds else tuple(params.get("kinds") or ()) or None
        seed = int(params.get("seed", 0))
        doc, stored = fit_all(records, kinds, seed, store)
        holdout = holdout_pairs(records, str(doc["default"]), seed=seed)
        metrics = predictor_metrics(doc, holdout)
        if self.model_ids is not None:
            focus = focus_metrics(records, self.model_ids[1], str(doc["default"]), seed=seed)
            if focus is not None:
                metrics["focus"] = focus
        folder = store.predictors / f"v{stored:04d}"
        with self.factory() as session:
            dev = session.get(Device, device.id)
            if dev is None:
                raise CalibrationError("the device was deleted")
            rows = sync_predictors(session, device=dev, data_dir=self.data_dir, tenant_id=scope)
            mine = (p for p in rows if p.tenant_id == scope and p.artifact_path)
            row = next((p for p in mine if Path(str(p.artifact_path)).name == folder.name), None)
            if row is None:
                raise CalibrationError(f"device {device.name}: fitted predictor {folder} was not recorded")
            row.metrics = metrics
            version = row.version
            session.commit()
        return version, metrics

    # -- local: measured in this process
    def _measure_local(
        self,
        device: Device,
        samples: Iterator[CalibrationSample],
        total: int,
        runs: int,
        store: DeviceStore,
        workdir: Path,
        tenant_id: int | None,
        job_id: int | None,
    ) -> None:
        from latency_models.calibrate import measure_sample

        dev = harness_device(device)
        dense_cache: dict[str, Any] = {}
        for i, sample in enumerate(samples):
            self._check_stop()
            try:
                new = measure_sample(sample, dev, workdir, runs=runs, warmup=10, dense_cache=dense_cache)
            except Exception as exc:  # one bad model must not end a calibration
                self._skipped += 1
                self._beat(i + 1, total, f"calibrating {i + 1}/{total}: skipped {sample.space_id}: {exc}")
                continue
            store.append(new)
            self._store_rows(device, sample, new, tenant_id, job_id)
            self._beat(i + 1, total, f"calibrating {i + 1}/{total}")

    def _store_rows(
        self,
        device: Device,
        sample: CalibrationSample,
        records: Sequence[LatencyRecord],
        tenant_id: int | None,
        job_id: int | None,
    ) -> None:
        from latency_models.harness import Measurement as HM

        now = utcnow()
        with self.factory() as session:
            for r in records:
                raw = r.measurement.get("compressed") or r.measurement.get("dense") or {}
                m = HM.from_dict(raw) if raw else None
                session.add(
                    Measurement(
                        device_id=device.id,
                        tenant_id=tenant_id,
                        status="done",
                        purpose="calibration",
                        spec=sample_info(sample, r.policy, r.int8),
                        features=sample_features(sample.space, r.policy, sample),
                        latency_ms=r.latency_ms,
                        latency_stats={
                            **(measurement_stats(m) if m else {}),
                            "dense_latency_ms": r.dense_latency_ms,
                            "speedup": r.speedup,
                        },
                        calibration_id=self.calibration_id,
                        job_id=job_id,
                        measured_at=now,
                    )
                )
            session.commit()

    # -- remote: measured by device agents through tasks
    def _measure_remote(
        self,
        device: Device,
        samples: Iterator[CalibrationSample],
        total: int,
        runs: int,
        store: DeviceStore,
        workdir: Path,
        tenant_id: int | None,
        job_id: int | None,
    ) -> None:
        from latency_models.calibrate import export_sample

        dev = harness_device(device)
        dense_files: dict[str, Any] = {}
        outstanding: dict[int, tuple[CalibrationSample, bool, bool]] = {}  # id -> sample, int8, first
        finished = 0
        last_claim = time.monotonic()
        exhausted = False
        index = 0
        while not exhausted or outstanding:
            self._check_stop()
            while not exhausted and len(outstanding) < TASK_WINDOW:
                sample = next(samples, None)
                if sample is None:
                    exhausted = True
                    break
                index += 1
                try:
                    dense, path, _shape, int8, first = export_sample(sample, dev, workdir, dense_files)
                except Exception as exc:
                    self._skipped += 1
                    finished += 1
                    self._beat(
                        finished, total, f"calibrating {finished}/{total}: skipped {sample.space_id}: {exc}"
                    )
                    continue
                with self.factory() as session:
                    m = add_task(
                        session,
                        data_dir=self.data_dir,
                        device=device,
                        tenant_id=tenant_id,
                        purpose="calibration",
                        model=Path(path),
                        baseline=Path(dense),
                        runs=runs,
                        warmup=10,
                        calibration_id=self.calibration_id,
                        job_id=job_id,
                        info=sample_info(sample, sample.policy, int8),
                        features=sample_features(sample.space, sample.policy, sample),
                    )
                    outstanding[m.id] = (sample, int8, first)
            if not outstanding:
                continue
            with self.factory() as session:
                rows = session.scalars(select(Measurement).where(Measurement.id.in_(list(outstanding)))).all()
                claimed_any = any(r.status != "pending" for r in rows)
                ended = [
                    (r.id, r.status, r.error, dict(r.latency_stats))
                    for r in rows
                    if r.status in ("done", "failed")
                ]
            if claimed_any:
                last_claim = time.monotonic()
            for mid, status, error, stats in ended:
                sample, int8, first = outstanding.pop(mid)
                finished += 1
                if status != "done":
                    self._skipped += 1
                    self._beat(
                        finished, total, f"calibrating {finished}/{total}: skipped {sample.space_id}: {error}"
                    )
                    continue
                new = records_from_result(sample, int8, stats, with_dense=first)
                store.append(new)
                self._beat(finished, total, f"calibrating {finished}/{total}")
            if not ended:
                waited = time.monotonic() - last_claim
                if waited > AGENT_WAIT_S:
                    raise CalibrationError(
                        f"no device agent picked up a task of device {device.name} (id {device.id}) for "
                        f"{waited:.0f} s; start one on the device: modeltailor device-agent --server URL "
                        f"--device {device.id} --token KEY"
                    )
                self._beat(
                    finished,
                    total,
                    f"calibrating {finished}/{total}"
                    + ("" if claimed_any else ": waiting for a device agent"),
                )
                time.sleep(POLL_S)


def fit_all(
    records: Sequence[LatencyRecord], kinds: Sequence[str] | None, seed: int, store: DeviceStore
) -> tuple[dict[str, Any], int]:
    """Fit every predictor kind and store a version; a kind that fails to fit is left out
    (named in the metrics under ``failed_kinds``) rather than failing the calibration."""
    from latency_models.calibrate import fit_predictors
    from latency_models.predictors import KINDS

    wanted = tuple(kinds or KINDS)
    try:
        _fitted, doc, version = fit_predictors(records, kinds=wanted, seed=seed, store=store)
    except Exception as exc:
        log.warning("fitting all predictor kinds failed (%s); fitting them one by one", exc)
        failed: dict[str, str] = {}
        for kind in wanted:
            try:
                fit_predictors(records, kinds=(kind,), seed=seed)
            except Exception as one:
                failed[kind] = f"{type(one).__name__}: {one}"[:300]
        working = tuple(k for k in wanted if k not in failed)
        if not working:
            raise CalibrationError(f"no predictor kind could be fitted: {failed}") from exc
        _fitted, doc, version = fit_predictors(records, kinds=working, seed=seed, store=store)
        doc = {**doc, "failed_kinds": failed}
    assert version is not None
    return doc, version


def harness_device(device: Device) -> Any:
    """The ``latency_models`` Device of a device row (local: this process can time it)."""
    from latency_models.devices import Device as LMDevice

    settings = {str(k): str(v) for k, v in (device.settings or {}).items()}
    return LMDevice(
        name=device.name if len(device.name) <= 64 else device.name[:64],
        runtime=device.runtime,
        threads=device.threads,
        settings=settings,
        is_local=device.kind != "remote",
    )


def sample_info(sample: CalibrationSample, policy: Policy, int8: bool) -> dict[str, Any]:
    """What a measurement row records about the model it measured."""
    return {
        "arch_id": sample.arch_id,
        "space_id": sample.space_id,
        "policy": policy.to_dict(),
        "policy_hash": policy.hash,
        "int8": bool(int8),
    }


def sample_features(
    space: SearchSpace, policy: Policy, sample: CalibrationSample | None = None
) -> dict[str, Any]:
    """Model-level graph features of a measured model (MACs and friends) for listings."""
    from latency_models.features import MODEL_FEATURES, kernel_features

    try:
        row = kernel_features(space, [policy]).model[0]
    except Exception:  # features are informative only
        return {}
    out: dict[str, Any] = {name: float(row[i]) for i, name in enumerate(MODEL_FEATURES)}
    out["macs"] = out.get("total_macs")
    if sample is not None:
        out["space_id"] = sample.space_id
    return out


def records_from_result(
    sample: CalibrationSample, int8: bool, stats: dict[str, Any], *, with_dense: bool
) -> list[LatencyRecord]:
    """Calibration records from an agent's result (the same shape ``measure_sample`` returns)."""
    from latency_models.calibrate import sample_records
    from latency_models.harness import Measurement as HM

    b = HM.from_dict(stats["measurement"])
    a = HM.from_dict(stats["baseline"]) if stats.get("baseline") else None
    speedup = stats.get("speedup")
    return sample_records(
        sample,
        b,
        a,
        speedup=float(speedup) if speedup is not None else None,
        int8=int8,
        with_dense=with_dense,
    )


def holdout_pairs(records: Sequence[LatencyRecord], kind: str, *, seed: int = 0) -> dict[str, Any] | None:
    """(measured, predicted) ms of the default kind on held-out architectures, for plots."""
    from latency_models.predictors import REGISTRY, group_split
    from latency_models.predictors.base import by_space

    try:
        train, test = group_split(records, 0.25, seed)
        model = REGISTRY[kind](target="ratio", seed=seed).fit([records[i] for i in train])
        test_records = [records[i] for i in test]
        predicted = [0.0] * len(test_records)
        for space, ix in by_space(test_records):
            values = model.predict(space, [test_records[i].policy for i in ix])
            for j, i in enumerate(ix):
                predicted[int(i)] = float(values[j])
    except Exception as exc:  # a plot is not worth failing a calibration
        log.info("no held-out pairs: %s", exc)
        return None
    return {
        "measured_ms": [round(r.latency_ms, 5) for r in test_records],
        "predicted_ms": [round(p, 5) for p in predicted],
        "names": [r.space_id for r in test_records],
    }


# --------------------------------------------------------------------------- the API's runner


def start_calibration_thread(
    factory: sessionmaker[Session],
    data_dir: Path,
    calibration_id: int,
    *,
    model_loader: Callable[[], tuple[CompressibleModel, tuple[str, str]] | None] | None = None,
    owner: str | None = None,
) -> threading.Thread:
    """Run a queued calibration in a daemon thread of this process (the REST route's path)."""
    import socket

    who = owner or f"{socket.gethostname()}:{os.getpid()}:api"

    def target() -> None:
        model = ids = None
        try:
            if model_loader is not None:
                with factory() as session:
                    cal = session.get(Calibration, calibration_id)
                    if cal is not None:
                        cal.progress = {**cal.progress, "message": "loading the focus model"}
                        cal.heartbeat_at = utcnow()
                        session.commit()
                loaded = model_loader()
                if loaded is not None:
                    model, ids = loaded
            CalibrationRun(factory, Path(data_dir), calibration_id, who, model=model, model_ids=ids).run()
        except Exception as exc:  # recorded on the row by CalibrationRun (or here, if it never started)
            log.info("calibration %s ended: %s", calibration_id, exc)
            with factory() as session:
                cal = session.get(Calibration, calibration_id)
                if cal is not None and cal.status in ACTIVE:
                    end_calibration(session, cal, status="failed", error=f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=target, name=f"calibration-{calibration_id}", daemon=True)
    thread.start()
    return thread


def wait_for(
    factory: sessionmaker[Session],
    calibration_id: int,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = 0.5,
) -> Calibration:
    """Block until calibration ``calibration_id`` ends (an abandoned one is failed); returns the row."""
    last: dict[str, Any] | None = None
    while True:
        with factory() as session:
            cal = session.get(Calibration, calibration_id)
            if cal is None:
                raise CalibrationError(f"calibration {calibration_id} vanished")
            if cal.status == "running" and not _fresh(cal, utcnow()):
                end_calibration(
                    session,
                    cal,
                    status="failed",
                    error="interrupted: the process running it stopped responding",
                )
            if cal.status not in ACTIVE:
                session.expunge(cal)
                return cal
            progress = dict(cal.progress)
        if on_progress is not None and progress != last:
            on_progress(progress)
            last = progress
        if should_stop():
            raise CalibrationStopped("stopped while waiting for the device's calibration")
        time.sleep(poll_s)


def focus_loader(
    *, name: str, path: str | None, zoo: str | None, sha256: str | None, shapes: dict[str, Any] | None
) -> Callable[[], tuple[CompressibleModel, tuple[str, str]] | None]:
    """A loader of a stored model for a focused calibration (latency needs no trained weights:
    a zoo model is built untrained at the data set's shape, an upload is loaded as stored)."""

    def load() -> tuple[CompressibleModel, tuple[str, str]] | None:
        import torch

        from compression.model_io import from_module, load_pt2

        if zoo:
            x = list((shapes or {}).get("x_val") or (shapes or {}).get("x_train") or [])
            if len(x) != 4:
                raise CalibrationError(f"model {name}: its data set's image shape is unknown")
            from compression.zoo import build_model

            module = build_model(
                zoo, in_channels=x[1], image_size=x[2], num_classes=int((shapes or {}).get("num_classes", 10))
            )
            model = from_module(module.eval(), torch.randn(2, *x[1:]), zoo)
        elif path:
            model = load_pt2(path)
        else:
            return None
        return model, model_ids(model, sha256, zoo)

    return load
