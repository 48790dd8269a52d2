"""Job leases: the jobs of ``db.work_queue`` (claim, renew, release) taken in a fair order.

A claim is a compare-and-set ``UPDATE jobs SET owner=.. WHERE id=.. AND (status='queued'
OR (status='running' AND lease_expires_at < now))``: the database decides the race, so
exactly one runner's UPDATE matches the row (PostgreSQL re-checks the WHERE clause after
a concurrent writer commits; SQLite serialises writers). A runner whose process died
simply stops renewing; once its lease expires any runner claims the job and resumes it.

Claims are fair across tenants: of the claimable jobs, the one taken is the oldest job of
the tenant with the fewest running jobs, ties going to the tenant served least recently
(the latest ``updated_at`` of its jobs that ever ran: claims, lease renewals, progress and
releases all touch it; a tenant that never ran goes first). A tenant's flood of jobs thus
waits its turn behind every other tenant's next job instead of ahead of it, and the runner's
time slice (``service.runner``) hands a long job's slot over when another tenant waits.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection

from sqlalchemy import Select, and_, case, func, select
from sqlalchemy.orm import Session

from db import work_queue
from db.models import Job, utcnow
from db.work_queue import JOBS


def _fair_queue(now: dt.datetime) -> Select[int]:
    """Ids of claimable jobs in fair order: tenants with fewer running jobs, then served longer ago."""
    tenants = (
        select(
            Job.tenant_id,
            func.sum(case((and_(Job.status == "running", Job.lease_expires_at >= now), 1), else_=0)).label(
                "running"
            ),
            func.max(case((Job.started_at.is_not(None), Job.updated_at))).label("served"),
        )
        .group_by(Job.tenant_id)
        .subquery()
    )
    return (
        select(Job.id)
        .join(tenants, tenants.c.tenant_id == Job.tenant_id)
        .where(work_queue.claimable(JOBS, now))
        .order_by(tenants.c.running.asc(), tenants.c.served.asc().nulls_first(), Job.id.asc())
    )


def claim_job(
    session: Session,
    *,
    owner: str,
    lease_s: float,
    job_id: int | None = None,
    exclude: Collection[int] = (),
) -> int | None:
    """Claim one queued (or lease-expired) job for ``owner``; return its id or None.

    Commits. Tries claimable jobs in fair order (see the module docstring) and moves on
    when another runner wins a row, so many runners drain a queue without waiting on each
    other. ``exclude``: jobs the caller must not take (ones it is still winding down).
    """
    for _ in range(10):
        query = _fair_queue(utcnow()).limit(5)
        if job_id is not None:
            query = query.where(Job.id == job_id)
        if exclude:
            query = query.where(Job.id.not_in(exclude))
        ids = list(session.scalars(query))
        session.rollback()  # end the read transaction before the writes
        if not ids:
            return None
        for candidate in ids:
            if work_queue.claim(session, JOBS, candidate, owner=owner, lease_s=lease_s):
                return candidate
    return None


def other_tenant_waiting(session: Session, *, job_id: int) -> bool:
    """Whether a claimable job of a tenant other than ``job_id``'s is waiting for a runner."""
    tenant = select(Job.tenant_id).where(Job.id == job_id).scalar_subquery()
    query = select(Job.id).where(work_queue.claimable(JOBS, utcnow()), Job.tenant_id != tenant).limit(1)
    return session.scalar(query) is not None


def renew_lease(session: Session, *, job_id: int, owner: str, lease_s: float) -> bool:
    """Extend ``owner``'s lease on a running job; False means the lease was lost. Commits."""
    return work_queue.renew(session, JOBS, job_id, owner=owner, lease_s=lease_s)


def release_job(session: Session, *, job_id: int, owner: str, status: str, error: str | None = None) -> bool:
    """Finish ``owner``'s job with ``status`` (or requeue it with ``"queued"``). Commits.

    Only the lease holder can release, so a runner that lost its lease never overwrites
    the result of the runner that took over.
    """
    now = utcnow()
    values: dict[str, object] = {"lease_owner": None, "updated_at": now}
    if status in ("succeeded", "failed", "cancelled"):
        values["finished_at"] = now
    if error is not None:
        values["error"] = error
    return work_queue.release(session, JOBS, job_id, owner=owner, status=status, values=values)
