"""Latency calibrations of devices: the ``calibrations`` rows, their persistence for the
calibration loop, and running or waiting for one.

A ``calibrations`` row is the handle of one calibration: measure sampled compressed models
on the device, then fit a new predictor version. The loop itself is
``latency_models.calibration_run.CalibrationRun``; this module gives it its persistence
(:class:`DbCalibrationStore` over the database, ``service.device_tasks.DbTaskQueue`` for
agent-measured devices) and picks its transport (:func:`run_calibration`).

At most one calibration per device is active at a time (a unique column, see
``db.models.Calibration``). A calibration is an item of the work queue's
:data:`db.work_queue.CALIBRATIONS`: whoever runs it holds a lease of
``Timeouts.calibration_stale_s`` that each progress beat renews; a running calibration whose
lease lapsed was abandoned by a dead process and is ended as failed by :func:`expire_abandoned`
(the housekeeping loop, and the write paths that want the device). Reads never end it.

Heavy imports (torch, the predictors) happen inside functions: the API imports this module.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db import work_queue
from db.engine import read_session
from db.models import Calibration, Device, Measurement, utcnow
from db.work_queue import CALIBRATIONS
from latency_models.calibration_run import (
    AgentTransport,
    CalibrationError,
    CalibrationRun,
    CalibrationStopped,
    HarnessTransport,
    Progress,
    Transport,
)
from latency_models.focus import model_ids
from service.device_tasks import DbTaskQueue, harness_device, measurement_stats
from service.predictor_versions import device_store, sync_predictors
from service.settings import Timeouts

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from latency_models.predictors import LatencyRecord
    from latency_models.sampling import CalibrationSample

log = logging.getLogger("modeltailor.latency")

#: Statuses of a calibration that has not ended.
ACTIVE = ("queued", "running")
ABANDONED = "interrupted: the process running it stopped responding"

__all__ = [
    "ACTIVE",
    "CalibrationError",
    "CalibrationStopped",
    "DbCalibrationStore",
    "active_calibration",
    "calibration_scope",
    "cancel_calibration",
    "claim_calibration",
    "create_calibration",
    "end_calibration",
    "expire_abandoned",
    "focus_loader",
    "run_calibration",
    "start_calibration_thread",
    "wait_for",
]


# --------------------------------------------------------------------------- rows


def _ended(error: str | None) -> dict[str, Any]:
    return {"active_device_id": None, "error": error, "finished_at": utcnow()}


def end_calibration(
    session: Session,
    calibration_id: int,
    *,
    status: str,
    error: str | None = None,
    version: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> bool:
    """End calibration ``calibration_id`` if it is still queued or running (releasing the
    device's active slot); False when it had ended already. Commits."""
    values = _ended(error)
    if version is not None:
        values["predictor_version"] = version
    if metrics is not None:
        values["metrics"] = metrics
    return work_queue.release(
        session, CALIBRATIONS, calibration_id, owner=None, status=status, values=values, from_statuses=ACTIVE
    )


def cancel_calibration(session: Session, *, calibration_id: int, by: str) -> bool:
    """queued / running -> cancelled at once, freeing the device for the next calibration
    (compare-and-set; False when it had ended already). Commits.

    Whoever runs it stops at its next beat. A cancel that lands while the predictors are
    being fitted leaves the version that fit stores.
    """
    return end_calibration(session, calibration_id, status="cancelled", error=f"cancelled by {by}")


def expire_abandoned(
    session: Session, *, device_id: int | None = None, calibration_id: int | None = None
) -> list[int]:
    """End running calibrations whose lease lapsed (their process died) as failed; their ids.
    Commits when one ended."""
    where = []
    if device_id is not None:
        where.append(Calibration.device_id == device_id)
    if calibration_id is not None:
        where.append(Calibration.id == calibration_id)
    return work_queue.expire(session, CALIBRATIONS, status="failed", values=_ended(ABANDONED), where=where)


def calibration_scope(cal: Calibration) -> int | None:
    """The tenant whose own predictors ``cal`` makes; None for the device's own (the default of
    calibrations made before scopes existed)."""
    return cal.tenant_id if cal.params.get("scope") == "tenant" else None


def active_calibration(session: Session, *, device_id: int) -> Calibration | None:
    """The device's queued or running calibration, after ending an abandoned one (a write
    path: commits when it ends one)."""
    expire_abandoned(session, device_id=device_id)
    return session.scalar(select(Calibration).where(Calibration.active_device_id == device_id))


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


def claim_calibration(session: Session, *, calibration_id: int, owner: str, lease_s: float) -> bool:
    """queued -> running for ``owner`` with a lease of ``lease_s`` (compare-and-set). Commits."""
    return work_queue.claim(session, CALIBRATIONS, calibration_id, owner=owner, lease_s=lease_s)


# --------------------------------------------------------------------------- the loop's persistence


@dataclass
class DbCalibrationStore:
    """``latency_models.calibration_run.CalibrationStore`` over one calibrations row."""

    factory: sessionmaker[Session]
    data_dir: Path
    calibration_id: int
    owner: str
    lease_s: float
    device: Device
    tenant_id: int | None
    scope: int | None
    job_id: int | None

    def beat(self, done: int, total: int, skipped: int, message: str) -> None:
        progress = {"done": done, "total": total, "skipped": skipped, "message": message}
        with self.factory() as session:
            if work_queue.renew(
                session,
                CALIBRATIONS,
                self.calibration_id,
                owner=self.owner,
                lease_s=self.lease_s,
                values={"progress": progress},
            ):
                return
            status = session.scalar(select(Calibration.status).where(Calibration.id == self.calibration_id))
        if status is None:
            raise CalibrationStopped(f"calibration {self.calibration_id} was deleted")
        # cancelled over REST, failed as abandoned, or held by someone else
        raise CalibrationStopped(f"calibration {self.calibration_id} was {status}")

    def record(self, sample: CalibrationSample, records: Sequence[LatencyRecord]) -> None:
        from latency_models.calibration_run import sample_features, sample_info
        from latency_models.harness import Measurement as HM

        now = utcnow()
        with self.factory() as session:
            for r in records:
                raw = r.measurement.get("compressed") or r.measurement.get("dense") or {}
                m = HM.from_dict(raw) if raw else None
                session.add(
                    Measurement(
                        device_id=self.device.id,
                        tenant_id=self.tenant_id,
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
                        job_id=self.job_id,
                        measured_at=now,
                    )
                )
            session.commit()

    def publish(self, stored_version: int, metrics: dict[str, Any]) -> int:
        folder = device_store(self.data_dir, self.device, self.scope).predictors / f"v{stored_version:04d}"
        with self.factory() as session:
            dev = session.get(Device, self.device.id)
            if dev is None:
                raise CalibrationError("the device was deleted")
            rows = sync_predictors(session, device=dev, data_dir=self.data_dir, tenant_id=self.scope)
            mine = (p for p in rows if p.tenant_id == self.scope and p.artifact_path)
            row = next((p for p in mine if Path(str(p.artifact_path)).name == folder.name), None)
            if row is None:
                raise CalibrationError(
                    f"device {self.device.name}: fitted predictor {folder} was not recorded"
                )
            row.metrics = metrics
            version = row.version
            session.commit()
        return version

    def end(
        self,
        status: str,
        error: str | None,
        version: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        with self.factory() as session:  # a cancelled one keeps its status
            end_calibration(
                session, self.calibration_id, status=status, error=error, version=version, metrics=metrics
            )


def run_calibration(
    factory: sessionmaker[Session],
    data_dir: Path,
    calibration_id: int,
    *,
    owner: str,
    timeouts: Timeouts,
    model: CompressibleModel | None = None,
    model_ids: tuple[str, str] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Progress | None = None,
    kinds: Sequence[str] | None = None,
) -> int:
    """Claim calibration ``calibration_id`` (if queued) and run it to its end with the transport
    its device needs; returns the new predictor version. The outcome is recorded on the row.

    Raises:
        CalibrationError: it failed (or was not found); CalibrationStopped: it was cancelled.
    """
    with factory() as session:
        cal = session.get(Calibration, calibration_id)
        if cal is None:
            raise CalibrationError(f"calibration {calibration_id} not found")
        if cal.status == "queued":
            claim_calibration(
                session, calibration_id=cal.id, owner=owner, lease_s=timeouts.calibration_stale_s
            )
            session.refresh(cal)
        device = session.get(Device, cal.device_id)
        params = dict(cal.params)
        tenant_id, scope, job_id = cal.tenant_id, calibration_scope(cal), cal.job_id
        if device is None:
            raise CalibrationError("the device was deleted")
        session.expunge(device)
    store = DbCalibrationStore(
        factory,
        Path(data_dir),
        calibration_id,
        owner,
        timeouts.calibration_stale_s,
        device,
        tenant_id,
        scope,
        job_id,
    )
    transport: Transport
    if device.kind == "remote":
        tasks = DbTaskQueue(
            factory, Path(data_dir), device, tenant_id, calibration_id=calibration_id, job_id=job_id
        )
        transport = AgentTransport(
            harness_device(device), device.id, tasks, timeouts.agent_wait_s, device_name=device.name
        )
    else:
        transport = HarnessTransport(harness_device(device))
    return CalibrationRun(
        store,
        device_store(Path(data_dir), device, scope),
        transport,
        params,
        device.name,
        model=model,
        model_ids=model_ids,
        should_stop=should_stop,
        progress=progress,
        kinds=kinds,
    ).run()


# --------------------------------------------------------------------------- the API's runner


def start_calibration_thread(
    factory: sessionmaker[Session],
    data_dir: Path,
    calibration_id: int,
    *,
    timeouts: Timeouts,
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
            run_calibration(
                factory,
                Path(data_dir),
                calibration_id,
                owner=who,
                timeouts=timeouts,
                model=model,
                model_ids=ids,
            )
        except Exception as exc:  # recorded on the row by the run (or here, if it never started)
            log.info("calibration %s ended: %s", calibration_id, exc)
            with factory() as session:
                end_calibration(
                    session, calibration_id, status="failed", error=f"{type(exc).__name__}: {exc}"
                )

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
        with read_session(factory) as session:
            cal = session.get(Calibration, calibration_id)
            if cal is None:
                raise CalibrationError(f"calibration {calibration_id} vanished")
            abandoned = work_queue.has_expired(
                session, CALIBRATIONS, where=[Calibration.id == calibration_id]
            )
            if cal.status not in ACTIVE:
                session.expunge(cal)
                return cal
            progress = dict(cal.progress)
        if abandoned:
            with factory() as session:
                expire_abandoned(session, calibration_id=calibration_id)
            continue
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
