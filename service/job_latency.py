"""The latency side of one job: its predictor (calibrating one first if needed), the dense
baseline's measured latency, the job's own measurements before and during its search with the
predictor refitted on them, and the re-measurement of top Pareto points on the device.

Used by ``engine.run.execute`` through ``JobContext.latency`` (the runner passes this class).
A calibration the job needs runs through ``service.calibrations`` (the calibration loop of
``latency_models.calibration_run``); its own timings of local devices happen in this process,
remote ones through device-agent tasks (``service.device_tasks``).

Choices (documented here because the issue leaves them open):

* **When a job calibrates.** A device without a predictor is calibrated first (below) unless
  ``spec.calibrate`` is ``"never"`` (the job fails instead). A calibration another job or the
  REST API is already running on the device is waited for, not duplicated. With ``"model"``
  (the default) a device whose measurements have none of the job's model gets a short top-up
  of the model's own policies before the search instead (``spec.topup_samples``, 16), and with
  ``active_measurement`` the job measures more during the search; both are the engine's
  (``engine.active_measurement``) through :meth:`JobLatency.measure_policies` and
  :meth:`JobLatency.refit`. ``"auto"`` (what jobs stored before revision 0008 keep) skips the
  top-up.
* **Where a job's own measurements go, and what a refit learns from.** Into the store the
  job's tenant calibrates (``predictor_versions.scope_of``: the tenant's own on a shared
  built-in device), as measurement rows of purpose ``topup`` / ``active`` (the tasks
  themselves on a remote device, timed by its agent). A refit fits the job's predictor kind on
  that store's measurements plus, on a shared device, the device's own (the admin's, which
  every tenant's jobs already use), and is stored as a new version of the tenant's own: later
  jobs of the tenant start from it. Measuring waits for a device agent at most
  ``Timeouts.remeasure_wait_s``.
* **What a job's calibration measures.** A *focused* plan
  (``latency_models.focus.focused_plan``): :data:`JOB_CALIBRATION_SAMPLES` samples, three quarters
  random policies of the job's own model and one quarter random architectures; each is timed
  interleaved with its dense model and the reference (100 runs), then every predictor kind is
  fitted on all of the device's measurements. Measured on this 2-core machine for ResNet-20
  on MNIST (``cpu-ort-1t``): a ResNet-20 sample takes ~1 s on a quiet machine and ~1.8 s
  with the machine oversubscribed (load ≈ 7), random architectures 1-10 s; 64 samples took
  164 s + 13 s fitting under that load, so the job's default is 48 samples (about 1 minute
  quiet, under 2 minutes loaded). The random architectures keep the held-out figure (a split
  by architecture) meaningful. ``spec["calibration_samples"]`` overrides the size.
* **Which predictor.** The newest version the job's tenant may use (``predictor_versions.preferred``):
  on a shared built-in device the tenant's own, made by its jobs, before the admin's; a
  resumed job keeps the version its first candidates were scored with (version numbers are
  unique on a device), so one job's latencies are never mixed. A job's calibration of a
  shared device makes a predictor of its tenant only, from its tenant's measurements only.
* **Which front points are re-measured.** ``remeasure_top_k`` points spread evenly along the
  front by predicted latency (always both ends: the fastest and the most accurate), each
  timed interleaved with the dense model in one run, so the stored measured speedup is as
  steady as the harness allows.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Candidate, Device, Job, Measurement, utcnow
from engine.job import JobContext, LoadedPredictor, Relabelled
from latency_models.calibration_run import CalibrationError
from service import calibrations
from service import predictor_versions as versions
from service.device_tasks import DbTaskQueue, add_task, harness_device, measurement_stats, wait_tasks
from service.settings import Timeouts

if TYPE_CHECKING:
    from compression.model_io import CompressibleModel
    from compression.policy import Policy
    from latency_models.incremental import Measured
    from latency_models.store import DeviceStore

log = logging.getLogger("modeltailor.job_latency")

JOB_CALIBRATION_SAMPLES = 48
REMEASURE_RUNS = 200


def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, both ends included (all if k >= n)."""
    if k <= 0 or n <= 0:
        return []
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


@dataclass
class Remeasured:
    """One re-measured front point."""

    policy_hash: str
    predicted_ms: float | None
    measured_ms: float | None
    speedup: float | None = None
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class JobLatency:
    """Latency services for one claimed job, over the service database (``factory``).

    ``timeouts``: how long to wait for device agents, and the lease of a calibration it runs
    (read once when the runner started).
    """

    def __init__(self, ctx: JobContext, factory: sessionmaker[Session], timeouts: Timeouts) -> None:
        self.ctx = ctx
        self.factory = factory
        self.timeouts = timeouts
        self.data_dir = Path(ctx.data_dir)
        with self.factory() as session:
            job = session.get(Job, ctx.job_id)
            device = session.get(Device, ctx.device.id)
            if job is None or device is None:
                raise RuntimeError("the job or its device vanished")
            self.tenant_id = job.tenant_id
            self.owner = job.lease_owner
            session.expunge(device)
        self.device = device
        self.remote = device.kind == "remote"
        self._dense_file: Path | None = None
        self._dense_task: int | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix=f"mt-job{ctx.job_id}-")
        self.workdir = Path(self._tmp.name)

    def close(self) -> None:
        """Remove the job's temporary files."""
        self._tmp.cleanup()

    # -- stopping ------------------------------------------------------------------

    def cancelled(self) -> bool:
        """True once the job was cancelled or another runner took it over.

        Deliberately not ``ctx.should_stop()``: that also turns true when the job's seconds
        budget is spent, which must not abort a calibration the device needs anyway.
        """
        with self.factory() as session:
            job = session.get(Job, self.ctx.job_id)
            return job is None or job.cancel_requested or job.lease_owner != self.owner

    # -- the predictor -------------------------------------------------------------

    def _phase(self, phase: str, **data: Any) -> None:
        self.ctx.progress("phase", {"phase": phase, **data})

    def ensure_predictor(
        self, model: CompressibleModel, ids: tuple[str, str], pinned: int | None = None
    ) -> versions.LoadedPredictor:
        """The predictor the job scores latency with; calibrates (or waits for) one if needed.

        Raises:
            CalibrationError: no predictor and none could be made (or ``calibrate`` is never).
            CalibrationStopped: the job was cancelled meanwhile.
        """
        mode = self.ctx.spec.calibrate
        samples = self.ctx.spec.calibration_samples or JOB_CALIBRATION_SAMPLES
        ran_own = False
        waited: set[int] = set()
        scope = versions.scope_of(self.device, self.tenant_id)
        for _ in range(20):  # bounded: each turn waits for or runs one calibration
            with self.factory() as session:
                dev = session.get(Device, self.device.id)
                assert dev is not None
                find = functools.partial(
                    versions.current_predictor,
                    session,
                    data_dir=self.data_dir,
                    device=dev,
                    tenant_id=self.tenant_id,
                )
                loaded = (find(version=pinned) if pinned is not None else None) or find()
            if loaded is not None:  # a model it never measured is the engine's top-up (see above)
                return loaded
            if mode == "never":
                raise CalibrationError(
                    f"device {self.device.name} has no latency predictor and the job says calibrate='never'; "
                    f"calibrate it first (POST /v1/devices/{self.device.id}/calibrate)"
                )
            if ran_own:
                raise CalibrationError(f"device {self.device.name}: calibration produced no predictor")
            with self.factory() as session:
                dev = session.get(Device, self.device.id)
                assert dev is not None
                active = calibrations.active_calibration(session, device_id=dev.id)
                if active is not None and active.job_id == self.ctx.job_id:
                    # This job's own calibration from before it was resumed: its runner is gone
                    # (the job's lease is ours now), so end it instead of waiting for it to go stale.
                    calibrations.end_calibration(
                        session,
                        active.id,
                        status="failed",
                        error="interrupted: its job was resumed elsewhere",
                    )
                    active = None
                cal = None
                if active is None:
                    params = {
                        "samples": samples,
                        "seed": self.ctx.spec.seed,
                        "runs": 100,
                        "plan": "focused",
                        "model": ids[1],
                        "scope": "device" if scope is None else "tenant",
                    }
                    cal = calibrations.create_calibration(
                        session,
                        device=dev,
                        tenant_id=self.tenant_id,
                        params=params,
                        job_id=self.ctx.job_id,
                        model_id=self.ctx.model.id,
                    )
                active_id = active.id if active is not None else None
                own = active is not None and active.tenant_id == self.tenant_id
                cal_id = cal.id if cal is not None else None
            if active_id is not None:
                if active_id in waited:
                    time.sleep(0.5)
                waited.add(active_id)
                self._wait(active_id, own)
                continue
            if cal_id is None:  # lost a race to another creator: wait for theirs next turn
                continue
            self._calibrate(cal_id, model, ids)
            ran_own = True
        raise CalibrationError(f"device {self.device.name}: gave up waiting for a predictor")

    def _calibrate(self, cal_id: int, model: CompressibleModel, ids: tuple[str, str]) -> None:
        self._phase("calibrating", calibration={"id": cal_id, "done": 0})

        def progress(done: int, total: int, message: str) -> None:
            self._phase(
                f"calibrating {done}/{total}",
                calibration={"id": cal_id, "done": done, "total": total, "message": message[:200]},
            )

        started = time.monotonic()
        version = calibrations.run_calibration(
            self.factory,
            self.data_dir,
            cal_id,
            owner=f"job-{self.ctx.job_id}:{self.owner}",
            timeouts=self.timeouts,
            model=model,
            model_ids=ids,
            should_stop=self.cancelled,
            progress=progress,
        )
        self._phase(
            f"calibrated predictor v{version}",
            calibration={"id": cal_id, "version": version, "seconds": round(time.monotonic() - started, 1)},
        )

    def _wait(self, cal_id: int, own: bool) -> None:
        """Wait for the device's running calibration; another tenant's is shown by its count only
        (its id and messages, which name its models, are that tenant's)."""

        def progress(p: dict[str, Any]) -> None:
            done, total = p.get("done", 0), p.get("total", 0)
            if own:
                self._phase(
                    f"waiting for calibration {cal_id}: {done}/{total}", calibration={"id": cal_id, **p}
                )
            else:
                self._phase(
                    f"waiting for another calibration of {self.device.name}: {done}/{total}",
                    calibration={"done": done, "total": total},
                )

        calibrations.wait_for(self.factory, cal_id, should_stop=self.cancelled, on_progress=progress)

    # -- measuring on the device ---------------------------------------------------

    def _export(self, model: CompressibleModel, policy: Policy, name: str) -> tuple[Any, Any, bool]:
        from compression.space_builder import space_for
        from latency_models.calibrate import export_for_device
        from latency_models.sampling import SPACE_OPTIONS

        space = space_for(model, SPACE_OPTIONS)
        return export_for_device(model, space, policy, harness_device(self.device), self.workdir / name)

    def _dense(self, model: CompressibleModel) -> tuple[Any, Any]:
        from compression.policy import Policy

        runnable, shape, _int8 = self._export(model, Policy.dense(), "dense.onnx")
        if isinstance(runnable, Path):
            self._dense_file = runnable
        return runnable, shape

    def _add_task(self, purpose: str, model: Path, info: dict[str, Any], baseline: Path | None = None) -> int:
        """Queue one timing of this job for the device's agent (re-measurement settings); its id."""
        with self.factory() as session:
            m = add_task(
                session,
                data_dir=self.data_dir,
                device=self.device,
                tenant_id=self.tenant_id,
                purpose=purpose,
                model=model,
                baseline=baseline,
                runs=REMEASURE_RUNS,
                warmup=20,
                job_id=self.ctx.job_id,
                info=info,
            )
            return int(m.id)

    def measure_dense(self, model: CompressibleModel) -> float | None:
        """The dense model's measured latency now (local devices); remote ones get a task
        whose result :meth:`dense_result` collects later. None if unknown yet."""
        from latency_models.harness import measure

        runnable, shape = self._dense(model)
        if self.remote:
            self._dense_task = self._add_task("dense", Path(runnable), {"policy_hash": "dense"})
            return None
        result = measure(runnable, harness_device(self.device), runs=REMEASURE_RUNS, input_shape=shape)
        self._add_row("dense", result.median_ms, measurement_stats(result), {"policy_hash": "dense"})
        return float(result.median_ms)

    def dense_result(self, timeout_s: float) -> float | None:
        """The remote dense task's latency, waiting up to ``timeout_s``."""
        if self._dense_task is None:
            return None
        rows = self._wait_tasks([self._dense_task], timeout_s)
        row = rows.get(self._dense_task)
        return float(row[1]) if row is not None and row[0] == "done" and row[1] is not None else None

    def _add_row(self, purpose: str, latency_ms: float, stats: dict[str, Any], info: dict[str, Any]) -> None:
        with self.factory() as session:
            session.add(
                Measurement(
                    device_id=self.device.id,
                    tenant_id=self.tenant_id,
                    status="done",
                    purpose=purpose,
                    spec=info,
                    features={},
                    latency_ms=latency_ms,
                    latency_stats=stats,
                    job_id=self.ctx.job_id,
                    measured_at=utcnow(),
                )
            )
            session.commit()

    def _wait_tasks(
        self, ids: Sequence[int], timeout_s: float
    ) -> dict[int, tuple[str, float | None, dict[str, Any], str | None]]:
        """Poll task rows until all ended, the timeout passes, or the job is cancelled."""
        return wait_tasks(self.factory, ids, timeout_s, should_stop=self.cancelled)

    def remeasure(
        self,
        model: CompressibleModel,
        front: Sequence[tuple[Policy, float | None]],
        k: int,
    ) -> list[Remeasured]:
        """Time ``k`` front points (policy, predicted ms) on the device; store them on the candidates."""
        from latency_models.harness import measure_pair

        order = sorted(front, key=lambda pc: (pc[1] is None, pc[1] or 0.0))
        chosen = [order[i] for i in spread(len(order), k)]
        if not chosen:
            return []
        dense, shape = (self._dense_file, None) if self._dense_file is not None else self._dense(model)
        out: list[Remeasured] = []
        pending: dict[int, tuple[Policy, float | None, bool]] = {}
        for i, (policy, predicted) in enumerate(chosen):
            if self.cancelled():
                break
            self._phase(f"re-measuring {i + 1}/{len(chosen)} on {self.device.name}")
            try:
                runnable, _shape, int8 = self._export(model, policy, f"top{i}.onnx")
            except Exception as exc:
                out.append(Remeasured(policy.hash, predicted, None, error=f"{type(exc).__name__}: {exc}"))
                continue
            if self.remote:
                info = {"policy_hash": policy.hash, "int8": int8}
                task = self._add_task("candidate", Path(runnable), info, baseline=Path(dense))
                pending[task] = (policy, predicted, int8)
                continue
            pair = measure_pair(
                dense,
                runnable,
                harness_device(self.device),
                runs=REMEASURE_RUNS,
                input_shape=shape,
                with_reference=True,
            )
            b = pair.b
            detail = {
                "speedup": pair.speedup,
                "dense_latency_ms": pair.a.median_ms,
                "int8": int8,
                "ratio_to_reference": b.ratio_to_reference,
                "noisy": b.noisy,
                "predicted_latency_ms": predicted,
            }
            self._add_row(
                "candidate",
                b.median_ms,
                measurement_stats(b, baseline=pair.a.to_dict(), speedup=pair.speedup),
                {"policy_hash": policy.hash, "int8": int8},
            )
            out.append(Remeasured(policy.hash, predicted, b.median_ms, pair.speedup, detail=detail))
        if pending:
            self._phase(f"re-measuring {len(pending)} front points: waiting for the device agent")
            wait_s = self.timeouts.remeasure_wait_s
            results = self._wait_tasks(list(pending), wait_s)
            for mid, (policy, predicted, int8) in pending.items():
                got = results.get(mid)
                if got is None or got[0] != "done" or got[1] is None:
                    why = got[3] if got is not None else f"no device agent result within {wait_s:.0f} s"
                    out.append(Remeasured(policy.hash, predicted, None, error=why))
                    continue
                stats = got[2]
                base = stats.get("baseline") or {}
                detail = {
                    "speedup": stats.get("speedup"),
                    "dense_latency_ms": base.get("median_ms"),
                    "int8": int8,
                    "ratio_to_reference": stats.get("ratio_to_reference"),
                    "predicted_latency_ms": predicted,
                }
                out.append(Remeasured(policy.hash, predicted, got[1], stats.get("speedup"), detail=detail))
        self._store(out)
        return out

    def _store(self, points: Sequence[Remeasured]) -> None:
        with self.factory() as session:
            job = session.get(Job, self.ctx.job_id)
            if job is None or job.lease_owner != self.owner:
                return
            for p in points:
                c = session.scalar(
                    select(Candidate).where(
                        Candidate.job_id == self.ctx.job_id, Candidate.policy_hash == p.policy_hash
                    )
                )
                if c is None:
                    continue
                extra = dict(c.extra or {})
                if p.measured_ms is not None:
                    c.measured_latency_ms = float(p.measured_ms)
                    extra["measured"] = {**p.detail, "measured_at": utcnow().isoformat(timespec="seconds")}
                else:
                    extra["measured"] = {"error": p.error}
                c.extra = extra
            session.commit()

    # -- the job's own measurements and refits (engine.active_measurement) ---------

    def _scope(self) -> int | None:
        return versions.scope_of(self.device, self.tenant_id)

    def _stores(self) -> list[DeviceStore]:
        """The stores a refit learns from: the job's own scope first, then (on a shared device)
        the device's own measurements."""
        scope = self._scope()
        out = [versions.device_store(self.data_dir, self.device, scope)]
        if scope is not None:
            out.append(versions.device_store(self.data_dir, self.device, None))
        return out

    def model_seen(self, ids: tuple[str, str]) -> bool:
        """Whether the measurements a refit learns from include the job's model."""
        scope = self._scope()
        scopes = [scope] if scope is None else [scope, None]
        return any(versions.model_seen(self.data_dir, self.device, ids[1], s) for s in scopes)

    def measure_policies(
        self,
        model: CompressibleModel,
        ids: tuple[str, str],
        policies: Sequence[Policy],
        *,
        purpose: str,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Measured]:
        """Time policies of the job's model as calibration samples: in this process, or as tasks
        (of ``purpose``) for the device's agent; appended to the job's store and kept as
        measurement rows.

        Raises:
            CalibrationStopped: the job was cancelled meanwhile.
            CalibrationError: no device agent answered within ``Timeouts.remeasure_wait_s``.
        """
        from latency_models.calibration_run import AgentTransport, HarnessTransport, Transport
        from latency_models.incremental import measure_policies

        transport: Transport
        if self.remote:
            tasks = DbTaskQueue(
                self.factory,
                self.data_dir,
                self.device,
                self.tenant_id,
                purpose=purpose,
                job_id=self.ctx.job_id,
            )
            transport = AgentTransport(
                harness_device(self.device),
                self.device.id,
                tasks,
                self.timeouts.remeasure_wait_s,
                device_name=self.device.name,
            )
        else:
            transport = HarnessTransport(harness_device(self.device))
        measured = measure_policies(
            transport,
            model,
            ids,
            policies,
            should_stop=self.cancelled,
            progress=progress,
            workdir=self.workdir,
        )
        records = [r for m in measured for r in m.records]
        if records:
            self._stores()[0].append(records)
        if records and not transport.records_itself:
            self._add_records(purpose, measured)
        return measured

    def _add_records(self, purpose: str, measured: Sequence[Measured]) -> None:
        from latency_models.calibration_run import sample_features, sample_info
        from latency_models.harness import Measurement as HM

        now = utcnow()
        with self.factory() as session:
            for m in measured:
                for r in m.records:
                    raw = r.measurement.get("compressed") or r.measurement.get("dense") or {}
                    stats = measurement_stats(HM.from_dict(raw)) if raw else {}
                    sample = _RecordSample(r.arch_id, r.space_id, r.space)
                    session.add(
                        Measurement(
                            device_id=self.device.id,
                            tenant_id=self.tenant_id,
                            status="done",
                            purpose=purpose,
                            spec=sample_info(sample, r.policy, r.int8),  # type: ignore[arg-type]
                            features=sample_features(r.space, r.policy),
                            latency_ms=r.latency_ms,
                            latency_stats={
                                **stats,
                                "dense_latency_ms": r.dense_latency_ms,
                                "speedup": r.speedup,
                            },
                            job_id=self.ctx.job_id,
                            measured_at=now,
                        )
                    )
            session.commit()

    def refit(self, base: LoadedPredictor, note: Mapping[str, Any]) -> LoadedPredictor:
        """``base``'s kind fitted on the measurements of :meth:`_stores`, stored as a new version of
        the job's scope (capabilities carried over) and mirrored; the loaded new version."""
        from latency_models import incremental

        stores = self._stores()
        records = [r for store in stores for r in store.records()]
        predictor = incremental.refit(records, base.predictor, seed=self.ctx.spec.seed)
        doc = incremental.refit_document(
            records,
            predictor,
            base_version=base.version,
            capabilities=base.capabilities,
            note={"job_id": self.ctx.job_id, **dict(note)},
        )
        stored = incremental.save_version(stores[0], predictor, doc)
        folder = f"v{stored:04d}"
        scope = self._scope()
        with self.factory() as session:
            dev = session.get(Device, self.device.id)
            if dev is None:
                raise CalibrationError("the device was deleted")
            rows = versions.sync_predictors(session, device=dev, data_dir=self.data_dir, tenant_id=scope)
            row = next(
                (
                    p
                    for p in rows
                    if p.tenant_id == scope and p.artifact_path and Path(p.artifact_path).name == folder
                ),
                None,
            )
            if row is None:
                raise CalibrationError(
                    f"device {self.device.name}: refitted predictor {folder} was not recorded"
                )
            number = row.version
        caps = dict(base.capabilities) if base.capabilities else None
        return versions.LoadedPredictor(predictor, number, predictor.kind, self.device.name, scope, caps)

    def relabel(self, points: Sequence[Relabelled], version: int) -> None:
        """Re-predicted latencies onto the job's candidates (while it holds the lease); their
        feasibility against the job's bounds and the front follow. Commits."""
        from engine.job import Scores
        from engine.spec import JobSpec
        from service import queries

        by_hash = {p.policy_hash: p for p in points}
        with self.factory() as session:
            job = session.get(Job, self.ctx.job_id)
            if job is None or job.lease_owner != self.owner:
                return
            spec = JobSpec.model_validate(job.spec)
            rows = session.scalars(select(Candidate).where(Candidate.job_id == self.ctx.job_id)).all()
            for c in rows:
                p = by_hash.get(c.policy_hash)
                if p is None:
                    continue
                c.latency_ms = p.latency_ms
                c.predictor_version = version
                if p.measured_latency_ms is not None:
                    c.measured_latency_ms = p.measured_latency_ms
                if p.extra:
                    c.extra = {**(c.extra or {}), **p.extra}
                scores = Scores(
                    accuracy=c.accuracy, latency_ms=c.latency_ms, size_bytes=c.size_bytes, macs=c.macs
                )
                c.feasible = queries.is_feasible(scores, spec=spec, baseline=job.baseline)
            session.flush()
            queries.refresh_front(session, job=job)


@dataclass(frozen=True)
class _RecordSample:
    """What ``sample_info`` reads of a calibration sample, from a record."""

    arch_id: str
    space_id: str
    space: Any
