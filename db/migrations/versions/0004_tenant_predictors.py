"""``predictors.tenant_id``: a predictor of a shared device made for one tenant only.

A tenant's job that calibrates a shared built-in device makes a predictor that only that
tenant sees and uses; the admin's calibrations (and every predictor made before this
revision) stay the device's own, with ``tenant_id`` NULL. Additive only.

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictors", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_predictors_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_predictors_tenant_id_tenants"),
            "tenants",
            ["tenant_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    with op.batch_alter_table("predictors", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_predictors_tenant_id_tenants"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_predictors_tenant_id"))
        batch_op.drop_column("tenant_id")
