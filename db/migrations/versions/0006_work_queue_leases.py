"""``lease_expires_at`` on calibrations and measurements: one lease-based work queue.

Jobs already held a lease that expires at a stored time (``jobs.lease_expires_at``). A
running calibration was abandoned when its ``heartbeat_at`` was older than the reader's
``MODELTAILOR_CALIBRATION_STALE_S``, and a claimed device-agent task when its ``claimed_at``
was older than ``MODELTAILOR_TASK_LEASE_S``. All three are now items of ``db.work_queue``,
whose holder stores when its lease lapses. Rows held at upgrade get the expiry the old rule
would have given them under the default settings (300 s after the heartbeat, 600 s after the
claim). Additive only.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The defaults of the settings the old rules read (written out: this revision keeps its meaning).
CALIBRATION_STALE_S = 300.0
TASK_LEASE_S = 600.0


def _backfill(table: str, status: str, stamp: str, seconds: float) -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(f"SELECT id, {stamp}, created_at FROM {table} WHERE status = :status"), {"status": status}
    ).all()
    for row_id, stamped, created in rows:
        start = stamped or created
        if isinstance(start, str):  # SQLite without type information in a raw query
            start = dt.datetime.fromisoformat(start)
        if start is None:
            continue
        bind.execute(
            sa.text(f"UPDATE {table} SET lease_expires_at = :at WHERE id = :id"),
            {"at": start + dt.timedelta(seconds=seconds), "id": row_id},
        )


def upgrade() -> None:
    with op.batch_alter_table("calibrations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("measurements", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    _backfill("calibrations", "running", "heartbeat_at", CALIBRATION_STALE_S)
    _backfill("measurements", "claimed", "claimed_at", TASK_LEASE_S)


def downgrade() -> None:
    with op.batch_alter_table("measurements", schema=None) as batch_op:
        batch_op.drop_column("lease_expires_at")
    with op.batch_alter_table("calibrations", schema=None) as batch_op:
        batch_op.drop_column("lease_expires_at")
