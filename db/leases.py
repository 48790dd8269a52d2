"""Job leases: atomic claim, renew and release, identical on SQLite and PostgreSQL.

A claim is a compare-and-set ``UPDATE jobs SET owner=.. WHERE id=.. AND (status='queued'
OR (status='running' AND lease_expires_at < now))``: the database decides the race, so
exactly one runner's UPDATE matches the row (PostgreSQL re-checks the WHERE clause after
a concurrent writer commits; SQLite serialises writers). A runner whose process died
simply stops renewing; once its lease expires any runner claims the job and resumes it.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from db.models import Job, utcnow


def _claimable(now: dt.datetime) -> ColumnElement[bool]:
    return or_(
        and_(Job.status == "queued", Job.cancel_requested.is_(False)),
        and_(Job.status == "running", Job.lease_expires_at < now),
    )


def claim_job(session: Session, *, owner: str, lease_s: float, job_id: int | None = None) -> int | None:
    """Claim one queued (or lease-expired) job for ``owner``; return its id or None.

    Commits. Tries the oldest claimable jobs first and moves on when another runner
    wins a row, so many runners drain a queue without waiting on each other.
    """
    for _ in range(10):
        now = utcnow()
        query = select(Job.id).where(_claimable(now)).order_by(Job.id).limit(5)
        if job_id is not None:
            query = query.where(Job.id == job_id)
        ids = list(session.scalars(query))
        session.rollback()  # end the read transaction before the writes
        if not ids:
            return None
        for candidate in ids:
            now = utcnow()
            result = session.execute(
                update(Job)
                .where(Job.id == candidate, _claimable(now))
                .values(
                    status="running",
                    lease_owner=owner,
                    lease_expires_at=now + dt.timedelta(seconds=lease_s),
                    attempts=Job.attempts + 1,
                    started_at=func.coalesce(Job.started_at, now),
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            session.commit()
            if _rowcount(result) == 1:
                return candidate
    return None


def _rowcount(result: object) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def renew_lease(session: Session, *, job_id: int, owner: str, lease_s: float) -> bool:
    """Extend ``owner``'s lease on a running job; False means the lease was lost. Commits."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(lease_expires_at=now + dt.timedelta(seconds=lease_s), updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1


def release_job(session: Session, *, job_id: int, owner: str, status: str, error: str | None = None) -> bool:
    """Finish ``owner``'s job with ``status`` (or requeue it with ``"queued"``). Commits.

    Only the lease holder can release, so a runner that lost its lease never overwrites
    the result of the runner that took over.
    """
    now = utcnow()
    values: dict[str, object] = {
        "status": status,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": now,
    }
    if status in ("succeeded", "failed", "cancelled"):
        values["finished_at"] = now
    if error is not None:
        values["error"] = error
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1
