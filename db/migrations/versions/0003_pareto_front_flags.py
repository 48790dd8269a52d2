"""Pareto front flags: ``candidates.on_front`` and ``jobs.front_candidates``.

``GET /v1/jobs/{id}/pareto`` reads the flagged rows (an index on job and flag) instead of
every candidate of the job. Additive only. Existing jobs get ``front_candidates`` NULL,
which marks their flags as not computed yet: the first read of each job's front
computes them, so no data is rewritten here.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("on_front", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index("ix_candidates_job_id_on_front", ["job_id", "on_front"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("front_candidates", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("front_candidates")
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.drop_index("ix_candidates_job_id_on_front")
        batch_op.drop_column("on_front")
