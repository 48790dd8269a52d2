"""Per-tenant limits, so that one tenant cannot starve the others (issue 18).

* Jobs: at most ``Settings.queued_jobs_per_tenant`` queued or running jobs per tenant (429
  beyond, naming the limit and its setting); a job's budget at most
  ``Settings.max_job_candidates`` candidates and ``Settings.max_job_seconds`` seconds (422
  beyond). A job with no candidate limit (a seconds-only budget, ``"candidates": null``) is
  accepted and runs with ``max_job_candidates`` as its effective limit (``service.runner``
  applies it), so every job is bounded by both settings. The runner shares its slots among
  tenants (``db.leases.claim_job`` and the runner's time slice).
* Event streams: at most ``Settings.streams_per_tenant`` open ``/events`` streams per tenant
  (429 beyond). They are counted in this process: exact for the embedded default (one API
  process); behind a balancer each API process allows that many, so a tenant's bound is the
  limit times the number of API processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from fastapi import HTTPException, status
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.datastructures import State

from db.models import Job, Tenant
from engine.spec import JobSpec
from service.settings import Settings

ACTIVE_JOB_STATUSES = ("queued", "running")


def admit_job(session: Session, settings: Settings, *, tenant_id: int, spec: JobSpec) -> None:
    """Refuse a job over its tenant's quota (429) or over the budget limits (422).

    Call it in the session that then stores the job: on PostgreSQL it locks the tenant's row
    until that session commits, so concurrent submissions of one tenant are counted one
    after the other and never overshoot the limit (SQLite's write transaction already
    serialises them).
    """
    budget = spec.budget
    for name, samples in (
        ("calibration_samples", spec.calibration_samples),
        ("topup_samples", spec.topup_samples),
    ):
        if samples is not None and samples > settings.max_calibration_samples:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"{name} {samples} is over this server's limit of "
                f"{settings.max_calibration_samples} (MODELTAILOR_MAX_CALIBRATION_SAMPLES)",
            )
    if budget.candidates is not None and budget.candidates > settings.max_job_candidates:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"budget.candidates {budget.candidates} is over this server's limit of "
            f"{settings.max_job_candidates} (MODELTAILOR_MAX_JOB_CANDIDATES)",
        )
    if budget.seconds is not None and budget.seconds > settings.max_job_seconds:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"budget.seconds {budget.seconds:g} is over this server's limit of "
            f"{settings.max_job_seconds:g} (MODELTAILOR_MAX_JOB_SECONDS)",
        )
    # FOR NO KEY UPDATE: serialises this tenant's submissions, not the inserts that reference it.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    active = session.scalar(
        select(func.count(Job.id)).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_JOB_STATUSES))
    )
    limit = settings.queued_jobs_per_tenant
    if (active or 0) >= limit:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"you have {active} queued or running jobs and the limit is {limit} per tenant "
            "(MODELTAILOR_QUEUED_JOBS_PER_TENANT); submit again once one has finished or "
            "after cancelling one",
        )


class StreamSlots:
    """Open event streams per tenant in this process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}

    def acquire(self, tenant_id: int, limit: int) -> Callable[[], None]:
        """Take one of ``tenant_id``'s ``limit`` slots or raise 429; returns its release.

        The release function may be called any number of times; it frees the slot once.
        """
        with self._lock:
            held = self._open.get(tenant_id, 0)
            if held >= limit:
                raise HTTPException(
                    status.HTTP_429_TOO_MANY_REQUESTS,
                    f"you have {held} event streams open and the limit is {limit} per tenant "
                    "(MODELTAILOR_STREAMS_PER_TENANT); close one first",
                )
            self._open[tenant_id] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._open[tenant_id] -= 1
                if not self._open[tenant_id]:
                    del self._open[tenant_id]

        return release


_state_lock = threading.Lock()


def stream_slots(state: State) -> StreamSlots:
    """The app's stream counter (``app.state``), created on first use."""
    with _state_lock:
        slots: StreamSlots | None = getattr(state, "stream_slots", None)
        if slots is None:
            slots = state.stream_slots = StreamSlots()
        return slots
