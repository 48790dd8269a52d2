"""Device-agent measurement tasks: blobs, the tasks agents pull, the results they post.

A device of kind ``remote`` is measured by a device agent (``modeltailor device-agent``)
that pulls tasks over REST. A task is a ``measurements`` row, an item of the work queue's
:data:`db.work_queue.DEVICE_TASKS` (pending -> claimed -> done | failed): the server writes
the ONNX files into a per-device blob folder, the agent claims tasks
(``POST /v1/devices/{id}/tasks/claim``), downloads the files by sha256, times them and posts
the result. A claimed task whose lease (``Timeouts.task_lease_s``) lapsed is handed out again
(the agent died); one handed out :data:`MAX_TASK_ATTEMPTS` times without a result fails;
results are idempotent by task id. :class:`DbTaskQueue` is the
``latency_models.calibration_run.TaskQueue`` the calibration loop's agent transport uses.

Heavy imports (torch, the harness) happen inside functions: the API imports this module.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import work_queue
from db.models import Device, Measurement, utcnow
from db.work_queue import DEVICE_TASKS
from latency_models.calibration_run import TaskOutcome

if TYPE_CHECKING:
    from latency_models.devices import Device as HarnessDevice
    from latency_models.harness import Measurement as HarnessMeasurement

#: A task handed out this many times without a result fails.
MAX_TASK_ATTEMPTS = 3
#: How often waiters look at their tasks.
POLL_S = 0.25
#: Statuses of a task that has not ended.
OPEN = ("pending", "claimed")


def harness_device(device: Device) -> HarnessDevice:
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

    if device.runtime == "executorch":  # its agents time .pte files only (OpenVINO reads ONNX)
        from latency_models.runtimes_edge import reference_pte_path

        reference = reference_pte_path()
    else:
        reference = reference_onnx_path()
    spec: dict[str, Any] = {
        "model_sha256": put_blob(data_dir, device.id, model),
        "reference_sha256": put_blob(data_dir, device.id, reference),
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


def claim_tasks(session: Session, *, device: Device, limit: int = 1, lease_s: float) -> list[Measurement]:
    """Hand out up to ``limit`` tasks of ``device`` with a lease of ``lease_s``: pending ones,
    or claimed ones whose lease lapsed (the agent went quiet). A task handed out
    :data:`MAX_TASK_ATTEMPTS` times already fails instead. Commits."""

    def give_up(attempts: int) -> dict[str, Any]:
        return {"status": "failed", "error": f"no result after {attempts} hand-outs to agents"}

    ids = work_queue.claim_next(
        session,
        DEVICE_TASKS,
        owner=None,
        lease_s=lease_s,
        where=[Measurement.device_id == device.id],
        limit=limit,
        max_attempts=MAX_TASK_ATTEMPTS,
        give_up=give_up,
    )
    rows = session.scalars(select(Measurement).where(Measurement.id.in_(ids)).order_by(Measurement.id))
    return list(rows)


def open_tasks(
    session: Session, *, device: Device, limit: int = 50, claimable_only: bool = False
) -> list[Measurement]:
    """The device's tasks that have not ended (``claimable_only``: that a claim now would hand
    out), oldest first. A read; claims nothing."""
    which = work_queue.claimable(DEVICE_TASKS, utcnow()) if claimable_only else Measurement.status.in_(OPEN)
    query = (
        select(Measurement)
        .where(Measurement.device_id == device.id, which)
        .order_by(Measurement.id)
        .limit(limit)
    )
    return list(session.scalars(query))


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
    row.lease_expires_at = None
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


@dataclass
class DbTaskQueue:
    """The calibration loop's task queue over ``measurements`` rows of one device."""

    factory: sessionmaker[Session]
    data_dir: Path
    device: Device
    tenant_id: int | None
    purpose: str = "calibration"
    calibration_id: int | None = None
    job_id: int | None = None

    def add(
        self,
        *,
        model: Path,
        baseline: Path,
        runs: int,
        warmup: int,
        info: dict[str, Any],
        features: dict[str, Any],
        purpose: str | None = None,
    ) -> int:
        with self.factory() as session:
            m = add_task(
                session,
                data_dir=self.data_dir,
                device=self.device,
                tenant_id=self.tenant_id,
                purpose=purpose or self.purpose,
                model=model,
                baseline=baseline,
                runs=runs,
                warmup=warmup,
                calibration_id=self.calibration_id,
                job_id=self.job_id,
                info=info,
                features=features,
            )
            return int(m.id)

    def poll(self, tasks: Sequence[int]) -> tuple[bool, list[TaskOutcome]]:
        with self.factory() as session:
            rows = session.scalars(select(Measurement).where(Measurement.id.in_(list(tasks)))).all()
            claimed_any = any(r.status != "pending" for r in rows)
            ended = [
                TaskOutcome(r.id, r.status == "done", r.error, dict(r.latency_stats))
                for r in rows
                if r.status in ("done", "failed")
            ]
        return claimed_any, ended


def wait_tasks(
    factory: sessionmaker[Session],
    ids: Sequence[int],
    timeout_s: float,
    *,
    should_stop: Any = lambda: False,
) -> dict[int, tuple[str, float | None, dict[str, Any], str | None]]:
    """Poll task rows until all ended, ``timeout_s`` passes or ``should_stop()``:
    {id: (status, latency_ms, stats, error)} of the ended ones."""
    deadline = time.monotonic() + timeout_s
    out: dict[int, tuple[str, float | None, dict[str, Any], str | None]] = {}
    while True:
        with factory() as session:
            for m in session.scalars(select(Measurement).where(Measurement.id.in_(list(ids)))):
                if m.status in ("done", "failed"):
                    out[m.id] = (m.status, m.latency_ms, dict(m.latency_stats), m.error)
        if len(out) == len(ids) or time.monotonic() > deadline or should_stop():
            return out
        time.sleep(POLL_S)
