"""One lease-based work queue for every kind of background work the service hands out.

Three kinds of item live in their own tables and share one life cycle and one implementation:

========================  ================  ==================  ================================
kind                      table             waiting -> held     who holds it
========================  ================  ==================  ================================
:data:`JOBS`              ``jobs``          queued -> running   a runner slot (``lease_owner``)
:data:`CALIBRATIONS`      ``calibrations``  queued -> running   the thread measuring it (``owner``)
:data:`DEVICE_TASKS`      ``measurements``  pending -> claimed  a device agent (anonymous)
========================  ================  ==================  ================================

Every held item has a lease, ``lease_expires_at``: the holder sets it when it claims
(:func:`claim`), pushes it forward while it works (:func:`renew`) and clears it when it lets
go (:func:`release`). The length of a lease is the holder's (a runner's ``lease_s``, a
calibration's ``calibration_stale_s``, a device agent task's ``task_lease_s``), so a reader
never needs a setting to tell whether an item was abandoned: ``lease_expires_at < now``.
What happens to an item whose lease lapsed depends on whether its work can be resumed:

* jobs and device-agent tasks are claimable again (``reclaim_expired``): the next runner
  resumes the job from its stored state, the next agent times the task again;
* a calibration's measurements live in the memory of the thread that died, so a lapsed
  calibration is ended by :func:`expire` (the runner's housekeeping, or the write path that
  wants the device), never re-claimed.

Every transition is a compare-and-set ``UPDATE .. WHERE <expected state>``: the database
decides each race, identically on SQLite (writers serialise) and PostgreSQL (the WHERE clause
is re-checked after a concurrent commit). Functions commit, and take a plain (writing)
session; reads of the queue elsewhere use ``db.engine.read_session``.

The order in which waiting items are taken is the caller's: jobs round-robin across tenants
(``db.leases``), calibrations by id (one per device at a time), tasks by id per device.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import ColumnElement

from db.models import Calibration, Job, Measurement, utcnow


@dataclass(frozen=True)
class Kind:
    """How one table plays the queue.

    Attributes:
        name: for messages.
        model: the mapped class (its ``id``, ``status`` and ``lease_expires_at`` are used).
        waiting: status of an item nobody holds yet.
        held: status of an item someone holds.
        owner: column naming the holder (None: holders are anonymous, e.g. device agents).
        reclaim_expired: whether a held item whose lease lapsed may be claimed again.
        stamp_on_claim: columns set to "now" by a claim (e.g. ``claimed_at``).
        stamp_on_renew: columns set to "now" by a claim and by each renewal (``heartbeat_at``).
        first_claim: columns set to "now" by the first claim only (``started_at``).
        attempts: column counting the claims (None: not counted).
        waiting_guard: extra condition a waiting item must meet to be claimed (a job whose
            cancel was requested is not started).
    """

    name: str
    model: Any
    waiting: str
    held: str
    owner: str | None
    reclaim_expired: bool
    stamp_on_claim: tuple[str, ...] = ()
    stamp_on_renew: tuple[str, ...] = ()
    first_claim: tuple[str, ...] = ()
    attempts: str | None = None
    waiting_guard: tuple[ColumnElement[bool], ...] = field(default=())

    def col(self, name: str) -> InstrumentedAttribute[Any]:
        column: InstrumentedAttribute[Any] = getattr(self.model, name)
        return column


JOBS = Kind(
    name="job",
    model=Job,
    waiting="queued",
    held="running",
    owner="lease_owner",
    reclaim_expired=True,
    stamp_on_renew=("updated_at",),
    first_claim=("started_at",),
    attempts="attempts",
    waiting_guard=(Job.cancel_requested.is_(False),),
)
CALIBRATIONS = Kind(
    name="calibration",
    model=Calibration,
    waiting="queued",
    held="running",
    owner="owner",
    reclaim_expired=False,
    stamp_on_renew=("heartbeat_at",),
    first_claim=("started_at",),
)
DEVICE_TASKS = Kind(
    name="device task",
    model=Measurement,
    waiting="pending",
    held="claimed",
    owner=None,
    reclaim_expired=True,
    stamp_on_claim=("claimed_at",),
    attempts="attempts",
)


def _rowcount(result: object) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def expired(kind: Kind, now: dt.datetime) -> ColumnElement[bool]:
    """Held items whose lease lapsed before ``now``."""
    return and_(kind.col("status") == kind.held, kind.col("lease_expires_at") < now)


def claimable(kind: Kind, now: dt.datetime) -> ColumnElement[bool]:
    """Items a claim at ``now`` may take: waiting ones (and lapsed held ones, where resumable)."""
    waiting = and_(kind.col("status") == kind.waiting, *kind.waiting_guard)
    return or_(waiting, expired(kind, now)) if kind.reclaim_expired else waiting


def _lease_values(kind: Kind, now: dt.datetime, lease_s: float) -> dict[str, Any]:
    values: dict[str, Any] = {"lease_expires_at": now + dt.timedelta(seconds=lease_s)}
    values.update({name: now for name in kind.stamp_on_renew})
    return values


def claim(
    session: Session,
    kind: Kind,
    item_id: int,
    *,
    owner: str | None,
    lease_s: float,
    where: Sequence[ColumnElement[bool]] = (),
) -> bool:
    """Take item ``item_id`` for ``owner`` with a lease of ``lease_s`` (compare-and-set). Commits."""
    now = utcnow()
    values = {"status": kind.held, **_lease_values(kind, now, lease_s)}
    values.update({name: now for name in kind.stamp_on_claim})
    values.update({name: func.coalesce(kind.col(name), now) for name in kind.first_claim})
    if kind.owner is not None:
        values[kind.owner] = owner
    if kind.attempts is not None:
        values[kind.attempts] = kind.col(kind.attempts) + 1
    result = session.execute(
        update(kind.model)
        .where(kind.col("id") == item_id, claimable(kind, now), *where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1


def claim_next(
    session: Session,
    kind: Kind,
    *,
    owner: str | None,
    lease_s: float,
    where: Sequence[ColumnElement[bool]] = (),
    limit: int = 1,
    max_attempts: int | None = None,
    give_up: Callable[[int], Mapping[str, Any]] | None = None,
) -> list[int]:
    """Claim up to ``limit`` claimable items matching ``where``, oldest id first. Commits.

    ``max_attempts``: an item claimed that many times already is not handed out again but
    ended with the values ``give_up(attempts)`` answers (e.g. ``status="failed"`` and an error).
    """
    out: list[int] = []
    candidates = list(
        session.scalars(
            select(kind.col("id"))
            .where(claimable(kind, utcnow()), *where)
            .order_by(kind.col("id"))
            .limit(limit * 4)
        )
    )
    session.rollback()  # end the read before the writes
    for item_id in candidates:
        if len(out) >= limit:
            break
        if max_attempts is not None and kind.attempts is not None:
            tries = session.scalar(select(kind.col(kind.attempts)).where(kind.col("id") == item_id))
            if tries is not None and tries >= max_attempts:
                values = dict(give_up(tries)) if give_up is not None else {}
                session.execute(
                    update(kind.model)
                    .where(kind.col("id") == item_id, claimable(kind, utcnow()))
                    .values(lease_expires_at=None, **values)
                    .execution_options(synchronize_session=False)
                )
                session.commit()
                continue
        if claim(session, kind, item_id, owner=owner, lease_s=lease_s, where=where):
            out.append(item_id)
    return out


def renew(
    session: Session,
    kind: Kind,
    item_id: int,
    *,
    owner: str | None,
    lease_s: float,
    values: Mapping[str, Any] | None = None,
) -> bool:
    """Extend the lease of a held item (``owner``'s, where holders are named) and set
    ``values`` with it (e.g. progress); False when it was lost (released, ended, or taken
    over). Commits."""
    now = utcnow()
    mine = [kind.col(kind.owner) == owner] if kind.owner is not None else []
    result = session.execute(
        update(kind.model)
        .where(kind.col("id") == item_id, kind.col("status") == kind.held, *mine)
        .values(**_lease_values(kind, now, lease_s), **dict(values or {}))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1


def release(
    session: Session,
    kind: Kind,
    item_id: int,
    *,
    owner: str | None,
    status: str,
    values: Mapping[str, Any] | None = None,
    from_statuses: Iterable[str] | None = None,
) -> bool:
    """Let go of an item with ``status`` (an end, or back to waiting), clearing its lease.

    Only the holder releases (where holders are named), and only from ``from_statuses``
    (default: held), so a holder that lost its item never overwrites its successor's
    outcome. ``values``: further columns to set. Commits; False when nothing matched.
    """
    statuses = tuple(from_statuses) if from_statuses is not None else (kind.held,)
    mine = [kind.col(kind.owner) == owner] if kind.owner is not None and owner is not None else []
    result = session.execute(
        update(kind.model)
        .where(kind.col("id") == item_id, kind.col("status").in_(statuses), *mine)
        .values(status=status, lease_expires_at=None, **dict(values or {}))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return _rowcount(result) == 1


def expire(
    session: Session,
    kind: Kind,
    *,
    status: str,
    values: Mapping[str, Any] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
) -> list[int]:
    """End every held item matching ``where`` whose lease lapsed, with ``status``; their ids.

    For kinds whose work cannot be resumed (calibrations). Commits only when something ended.
    """
    now = utcnow()
    ids = list(session.scalars(select(kind.col("id")).where(expired(kind, now), *where)))
    session.rollback()
    ended = []
    for item_id in ids:
        result = session.execute(
            update(kind.model)
            .where(kind.col("id") == item_id, expired(kind, utcnow()))
            .values(status=status, lease_expires_at=None, **dict(values or {}))
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if _rowcount(result) == 1:
            ended.append(item_id)
    return ended


def has_expired(session: Session, kind: Kind, *, where: Sequence[ColumnElement[bool]] = ()) -> bool:
    """Whether a held item matching ``where`` has a lapsed lease (a read)."""
    query = select(kind.col("id")).where(expired(kind, utcnow()), *where).limit(1)
    return session.scalar(query) is not None


__all__ = [
    "CALIBRATIONS",
    "DEVICE_TASKS",
    "JOBS",
    "Kind",
    "claim",
    "claim_next",
    "claimable",
    "expire",
    "expired",
    "has_expired",
    "release",
    "renew",
]
