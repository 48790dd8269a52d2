"""The job runner: claims jobs with a lease, runs the search, keeps the lease alive, stops on cancel.

One :class:`Runner` per process (the API process in the embedded default, or
``modeltailor worker``). Each claimed job gets a watcher thread that renews the lease
every third of its length and polls the cancel flag every second; ``should_stop()``
turns true within about a second of a cancel, an exhausted budget, a lost lease or a
shutdown. A runner killed with SIGKILL simply stops renewing: when the lease expires
another runner claims the job and resumes it from its stored agent state and candidates.

Sharing the slots among tenants: ``claim_job`` takes the next job of the tenant served
least recently (``db.leases``), and a running job yields its slot once it has held it for
one time slice (``Settings.lease_s``) while another tenant's job is waiting: at its next
``should_stop()`` poll (between candidate batches) the runner releases it as ``queued``
with its state kept, and it resumes later like a job whose runner died. So another
tenant's job waits at most about one slice plus one batch per slot, however many or however
long one tenant's jobs are. (No yield during a device calibration the job runs first: that
phase polls only for cancellation.) The time a job waits after a yield does not count
against its seconds budget (``progress.paused_s``). A job with no candidate limit runs
with ``Settings.max_job_candidates`` as its limit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import read_session
from db.leases import claim_job, other_tenant_waiting, release_job, renew_lease
from db.models import Candidate, Dataset, Device, Job, Model, utcnow
from engine.executors import Executor, describe_executor, make_executor
from engine.job import (
    DatasetRef,
    DeviceRef,
    DoneCandidate,
    JobContext,
    ModelRef,
    Scores,
)
from engine.job import run_job as default_search
from engine.spec import Budget, JobSpec
from service import queries
from service.job_latency import JobLatency
from service.settings import Settings, Timeouts

log = logging.getLogger("modeltailor.runner")
SearchFn = Callable[[JobContext], None]
CANCEL_POLL_S = 1.0
# Progress entries a candidate's progress update keeps (the rest is the runner's own).
KEPT_PROGRESS = ("calibration", "paused_s", "space", "topup", "active_measurement")


def job_refs(session: Session, job: Job) -> tuple[ModelRef, DatasetRef, DeviceRef]:
    """The job's model, data set and device as plain values for the search or an export."""
    from pathlib import Path

    model = session.get(Model, job.model_id)
    dataset = session.get(Dataset, job.dataset_id)
    device = session.get(Device, job.device_id)
    if model is None or dataset is None or device is None:
        raise RuntimeError("the job's model, data set or device was deleted")
    return (
        ModelRef(model.id, model.name, Path(model.path) if model.path else None, model.zoo, model.sha256),
        DatasetRef(dataset.id, dataset.name, Path(dataset.path) if dataset.path else None, dataset.builtin),
        DeviceRef(device.id, device.name, device.kind, device.runtime, device.threads, dict(device.settings)),
    )


def candidate_scores(c: Candidate) -> Scores:
    """A stored candidate's scores as the search sees them."""
    return Scores(
        accuracy=c.accuracy,
        latency_ms=c.latency_ms,
        predictor_version=c.predictor_version,
        measured_latency_ms=c.measured_latency_ms,
        size_bytes=c.size_bytes,
        macs=c.macs,
        eval_seconds=c.eval_seconds,
        extra=dict(c.extra or {}),
    )


class _Watch:
    """Per-job state shared by the search thread and the lease watcher."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.lease_lost = threading.Event()
        self.done = threading.Event()
        self.claimed_at = time.monotonic()
        self.yield_wanted = threading.Event()  # slice used up and another tenant waits
        self.yielded = threading.Event()  # released as queued; the search is winding down


class Runner:
    """Claims and runs jobs until stopped.

    Args:
        factory: session factory of the service database.
        settings: lease length, poll interval, executor choice.
        timeouts: device-latency timeouts of the jobs' calibrations and re-measurements
            (read once at start; default: ``Timeouts()`` from the environment now).
        search: the search entry point (``engine.job.run_job``; tests pass a fake).
        owner: lease owner id; default host:pid:random, unique per runner.
    """

    def __init__(
        self,
        factory: sessionmaker[Session],
        settings: Settings,
        *,
        timeouts: Timeouts | None = None,
        search: SearchFn | None = None,
        owner: str | None = None,
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.timeouts = timeouts if timeouts is not None else Timeouts()
        self.search = search or default_search
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: set[int] = set()  # jobs whose search has not returned (yielded ones too)
        self._running_lock = threading.Lock()

    # --- loop -----------------------------------------------------------------------

    def start(self, slots: int = 1) -> None:
        """Run ``slots`` claim loops in daemon threads."""
        for i in range(slots):
            t = threading.Thread(target=self.run_forever, name=f"runner-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every loop to stop; a running job is requeued for the next runner."""
        self.stopping.set()
        for t in self._threads:
            t.join(timeout)

    def run_forever(self) -> None:
        """Claim and run jobs until :meth:`stop`."""
        while not self.stopping.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the loop must survive a database hiccup
                log.exception("runner loop error")
                ran = False
            if not ran:
                self.stopping.wait(self.settings.poll_s)

    def run_once(self) -> bool:
        """Claim one job and run it to its end; False if nothing was claimable."""
        with self._running_lock:
            # A job this runner yielded whose search is still returning must not be taken by
            # another of its slots: both would hold the one lease (same owner).
            busy = set(self._running)
        with self.factory() as session:
            job_id = claim_job(session, owner=self.owner, lease_s=self.settings.lease_s, exclude=busy)
        if job_id is None:
            return False
        self.run_claimed(job_id)
        return True

    # --- one job --------------------------------------------------------------------

    def run_claimed(self, job_id: int) -> None:
        """Run a job this runner holds the lease on, then release it with its outcome."""
        watch = _Watch()
        watcher = threading.Thread(
            target=self._watch, args=(job_id, watch), daemon=True, name=f"lease-{job_id}"
        )
        with self._running_lock:
            self._running.add(job_id)
        watcher.start()
        error: str | None = None
        try:
            ctx = self._context(job_id, watch)
            self._event(job_id, "status", {"status": "running", "resumed_from": len(ctx.done)})
            self.search(ctx)
        except NotImplementedError as exc:
            error = str(exc) or "not implemented"
        except Exception as exc:
            log.exception("job %s failed", job_id)
            error = f"{type(exc).__name__}: {exc}"
            log.debug("%s", traceback.format_exc())
        finally:
            watch.done.set()
            watcher.join()
            with self._running_lock:
                self._running.discard(job_id)
        self._finish(job_id, watch, error)

    def _finish(self, job_id: int, watch: _Watch, error: str | None) -> None:
        if watch.yielded.is_set():  # already released as queued; its next claim resumes it
            if error is not None:
                log.warning("job %s: error after yielding its slot (it will resume): %s", job_id, error)
            return
        if watch.lease_lost.is_set():
            log.warning("job %s: lease lost; another runner owns it now", job_id)
            return
        with read_session(self.factory) as session:
            job = session.get(Job, job_id)
            cancelled = job is not None and job.cancel_requested
        if cancelled:
            status = "cancelled"
        elif error is not None:
            status = "failed"
        elif self.stopping.is_set() and not self._budget_spent(job_id):
            status = "queued"  # shutting down: hand the job to the next runner now
        else:
            status = "succeeded"
        with self.factory() as session:
            if release_job(session, job_id=job_id, owner=self.owner, status=status, error=error):
                job = session.get(Job, job_id)
                if job is not None:
                    job.progress = {**job.progress, "phase": status}
                queries.add_event(
                    session, job_id=job_id, kind="status", data={"status": status, "error": error}
                )
                session.commit()

    def _budget_spent(self, job_id: int) -> bool:
        with read_session(self.factory) as session:
            job = session.get(Job, job_id)
            return job is None or self._over_budget(session, job)

    def _budget(self, spec: JobSpec) -> Budget:
        """The job's budget in effect: no candidate limit means this server's largest one."""
        if spec.budget.candidates is not None:
            return spec.budget
        return spec.budget.model_copy(update={"candidates": self.settings.max_job_candidates})

    def _over_budget(self, session: Session, job: Job) -> bool:
        budget = self._budget(JobSpec.model_validate(job.spec))
        if budget.seconds is not None and _search_seconds(job) >= budget.seconds:
            return True
        n = budget.candidates
        return n is not None and queries.count_candidates(session, job_id=job.id) >= n

    def _watch(self, job_id: int, watch: _Watch) -> None:
        """Renew the lease and poll the cancel flag until the job's search returns."""
        renew_every = max(0.05, self.settings.lease_s / 3)
        next_renew = time.monotonic() + renew_every
        while not watch.done.wait(min(CANCEL_POLL_S, renew_every)):
            try:
                if time.monotonic() >= next_renew:
                    with self.factory() as session:
                        if not renew_lease(
                            session, job_id=job_id, owner=self.owner, lease_s=self.settings.lease_s
                        ):
                            watch.lease_lost.set()
                    next_renew = time.monotonic() + renew_every
                with read_session(self.factory) as session:
                    if session.scalar(select(Job.cancel_requested).where(Job.id == job_id)):
                        watch.cancelled.set()
                    if (
                        not watch.yield_wanted.is_set()
                        and time.monotonic() - watch.claimed_at >= self.settings.lease_s
                        and other_tenant_waiting(session, job_id=job_id)
                    ):
                        watch.yield_wanted.set()
            except Exception:  # keep trying: a transient DB error must not kill the lease
                log.exception("lease watcher error for job %s", job_id)

    def _yield(self, job_id: int, watch: _Watch) -> None:
        """Give the job's slot back (queued, state and candidates kept) to another tenant's job."""
        with self.factory() as session:
            if not release_job(session, job_id=job_id, owner=self.owner, status="queued"):
                watch.lease_lost.set()
                return
            watch.yielded.set()
            job = session.get(Job, job_id)
            if job is not None:
                # The seconds budget stands still while the job waits (see _search_seconds).
                job.progress = {**job.progress, "phase": "queued", "yielded_at": utcnow().isoformat()}
            queries.add_event(
                session, job_id=job_id, kind="status", data={"status": "queued", "yielded": True}
            )
            session.commit()
        log.info("job %s yields its slot: another tenant's job is waiting", job_id)

    def _context(self, job_id: int, watch: _Watch) -> JobContext:
        with self.factory() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise RuntimeError(f"job {job_id} vanished")
            if "yielded_at" in (job.progress or {}):  # back from a yield: bank the time it waited
                progress = dict(job.progress)
                waited = queries.seconds_since(dt.datetime.fromisoformat(progress.pop("yielded_at")))
                progress["paused_s"] = round(float(progress.get("paused_s") or 0.0) + waited, 3)
                job.progress = progress
                session.commit()
            model, dataset, device = job_refs(session, job)
            done = [
                DoneCandidate(c.index, dict(c.policy), c.policy_hash, candidate_scores(c))
                for c in session.scalars(
                    select(Candidate).where(Candidate.job_id == job_id).order_by(Candidate.index)
                )
            ]
            spec, state = JobSpec.model_validate(job.spec), job.agent_state
            spec = spec.model_copy(update={"budget": self._budget(spec)})

        def should_stop() -> bool:
            if watch.cancelled.is_set() or watch.lease_lost.is_set() or watch.yielded.is_set():
                return True
            if self.stopping.is_set():
                return True
            with read_session(self.factory) as session:
                current = session.get(Job, job_id)
                if current is None or self._over_budget(session, current):
                    return True
                # Re-checked: another slot may have taken the waiting job since the watcher saw it.
                if not (watch.yield_wanted.is_set() and other_tenant_waiting(session, job_id=job_id)):
                    watch.yield_wanted.clear()
                    return False
            self._yield(job_id, watch)  # between batches: nothing is being evaluated now
            return True

        def make(initializer: Callable[..., Any], initargs: tuple[Any, ...] = ()) -> Executor:
            s = self.settings
            executor = make_executor(
                initializer, initargs, kind=s.executor, workers=s.workers, ray_address=s.ray_address
            )
            self._event(job_id, "executor", describe_executor(executor))  # where evaluations run
            return executor

        return JobContext(
            job_id=job_id,
            spec=spec,
            model=model,
            dataset=dataset,
            device=device,
            data_dir=self.settings.data_dir,
            agent_state=state,
            done=done,
            persist_candidate=lambda *a, **kw: self._persist(job_id, watch, *a, **kw),
            progress=lambda kind, data: self._event(job_id, kind, data),
            set_baseline=lambda scores: self._set_baseline(job_id, scores),
            should_stop=should_stop,
            make_executor=make,
            latency=lambda ctx: JobLatency(ctx, self.factory, self.timeouts),
            rescore=lambda h, acc, extra: self._rescore(job_id, watch, h, acc, extra),
            cancelled=lambda: watch.cancelled.is_set() or watch.lease_lost.is_set(),
        )

    def _rescore(
        self, job_id: int, watch: _Watch, policy_hash: str, accuracy: float, extra: dict[str, Any]
    ) -> bool:
        """A candidate's accuracy after fine-tuning, with its front and feasibility (only while leased)."""
        with self._leased(job_id, watch) as held:
            if held is None:
                return False
            session, job = held
            return queries.rescore_candidate(
                session, job=job, policy_hash=policy_hash, accuracy=accuracy, extra=extra
            )

    @contextlib.contextmanager
    def _leased(self, job_id: int, watch: _Watch) -> Iterator[tuple[Session, Job] | None]:
        """A write session and the job while this runner still holds its lease, else None
        (and the lease is marked lost, so the search stops)."""
        if watch.lease_lost.is_set():
            yield None
            return
        with self.factory() as session:
            job = session.get(Job, job_id)
            if job is None or job.lease_owner != self.owner:
                watch.lease_lost.set()
                yield None
                return
            yield session, job

    def _persist(
        self,
        job_id: int,
        watch: _Watch,
        policy: dict[str, Any],
        policy_hash: str,
        scores: Scores,
        agent_state: bytes | None = None,
    ) -> bool:
        """Store a candidate + agent state + progress in one transaction (only while leased)."""
        with self._leased(job_id, watch) as held:
            if held is None:
                return False
            session, job = held
            done = queries.count_candidates(session, job_id=job_id)
            elapsed = _search_seconds(job)
            progress = self._progress(session, job, done + 1, elapsed)
            job.progress = progress
            queries.add_event(session, job_id=job_id, kind="progress", data=progress)
            stored = queries.add_candidate(
                session,
                job=job,
                policy=policy,
                policy_hash=policy_hash,
                scores=scores,
                agent_state=agent_state,
            )
            return stored is not None

    @staticmethod
    def _progress(session: Session, job: Job, done: int, elapsed: float) -> dict[str, Any]:
        budget = JobSpec.model_validate(job.spec).budget
        total, seconds = budget.candidates, budget.seconds
        eta: float | None = None
        if total:
            eta = elapsed / max(done, 1) * max(total - done, 0)
        if seconds is not None:
            eta = min(eta, max(seconds - elapsed, 0.0)) if eta is not None else max(seconds - elapsed, 0.0)
        best = session.scalar(
            select(Candidate.accuracy)
            .where(Candidate.job_id == job.id, Candidate.feasible.is_(True), Candidate.accuracy.is_not(None))
            .order_by(Candidate.accuracy.desc())
            .limit(1)
        )
        return {
            "phase": "searching",
            "done": done,
            "total": total,
            "elapsed_s": round(elapsed, 2),
            "eta_s": None if eta is None else round(eta, 1),
            "best_accuracy": best,
            # kept so the seconds budget keeps excluding the calibration, top-up and yields (see
            # _search_seconds), and the space the device resolved (engine.device_space) and the job's
            # own measurements (engine.active_measurement) stay visible
            **{k: v for k, v in (job.progress or {}).items() if k in KEPT_PROGRESS},
        }

    def _event(self, job_id: int, kind: str, data: dict[str, Any]) -> None:
        with self.factory() as session:
            if kind == "phase":
                job = session.get(Job, job_id)
                if job is not None:
                    job.progress = {**job.progress, **data}
            queries.add_event(session, job_id=job_id, kind=kind, data=data)
            session.commit()

    def _set_baseline(self, job_id: int, scores: Scores) -> None:
        with self.factory() as session:
            job = session.get(Job, job_id)
            if job is not None and job.lease_owner == self.owner:
                job.baseline = {k: v for k, v in vars(scores).items() if v is not None and k != "extra"}
                session.commit()


def _search_seconds(job: Job) -> float:
    """Seconds the job has spent searching: a device calibration (or its model's top-up, see
    ``engine.active_measurement``) it ran first does not count; measuring during the search does.

    The seconds budget is the user's search budget; calibrating a device is a one-off cost
    shared by later jobs (it shows in the job's progress as its own phase). Nor does the
    time the job waited in the queue after yielding its slot to another tenant.
    """
    progress = job.progress or {}
    phase = str(progress.get("phase") or "")
    if phase.startswith(("calibrating", "waiting for calibration", "topping up")):
        return 0.0
    spent = 0.0
    for key in ("calibration", "topup"):  # the job's calibration and its model's top-up
        entry = progress.get(key) or {}
        value = entry.get("seconds") if isinstance(entry, dict) else None
        spent += float(value) if isinstance(value, (int, float)) else 0.0
    paused = float(progress.get("paused_s") or 0.0)
    if "yielded_at" in progress:  # waiting now
        paused += queries.seconds_since(dt.datetime.fromisoformat(progress["yielded_at"]))
    return max(0.0, queries.seconds_since(job.started_at) - spent - paused)
