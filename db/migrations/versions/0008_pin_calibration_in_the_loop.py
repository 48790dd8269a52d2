"""Jobs stored before calibration in the loop keep what they meant.

Two ``JobSpec`` defaults changed after 0007: ``calibrate`` ("auto" → "model": a device whose
measurements have none of the job's model is topped up with the model's own policies before
the search) and the new ``active_measurement`` (absent → measuring front points and uncertain
candidates during the search and refitting the predictor). A job queued, running or resumed
after the upgrade must search as it was submitted: each stored spec gets ``calibrate`` written
out ("auto" where it left it unset, as the type's default was then) and active measurement
off. A stored ``calibrate: "model"`` job used to measure its model in a full focused
calibration of ``calibration_samples`` (48 by default) samples; it now tops up, so it gets
``topup_samples`` of that size. The values are written here (not imported from ``engine``) so
this revision keeps its meaning when the type evolves.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_CALIBRATE = "auto"
OLD_MODEL_SAMPLES = 48  # the job calibration a "model" job ran on a model the device never measured
ACTIVE_OFF = {"share": 0.0}


def pinned(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the pre-0008 behaviour written out where it leaves it unset."""
    out = dict(spec)
    out.setdefault("calibrate", OLD_CALIBRATE)
    out.setdefault("active_measurement", dict(ACTIVE_OFF))
    if out["calibrate"] == "model" and "topup_samples" not in out:
        samples = out.get("calibration_samples")
        out["topup_samples"] = samples if isinstance(samples, int) and samples > 0 else OLD_MODEL_SAMPLES
    return out


def upgrade() -> None:
    conn = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.Integer), sa.column("spec", sa.JSON))
    for job_id, spec in conn.execute(sa.select(jobs.c.id, jobs.c.spec)).all():
        spec = json.loads(spec) if isinstance(spec, str) else spec
        if not isinstance(spec, dict):
            continue
        new = pinned(spec)
        if new != spec:
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(spec=new))


def downgrade() -> None:
    # Code before this revision rejects the new keys (a spec forbids unknown fields): drop them.
    conn = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.Integer), sa.column("spec", sa.JSON))
    for job_id, spec in conn.execute(sa.select(jobs.c.id, jobs.c.spec)).all():
        spec = json.loads(spec) if isinstance(spec, str) else spec
        if not isinstance(spec, dict):
            continue
        new = {k: v for k, v in spec.items() if k not in ("active_measurement", "topup_samples")}
        if new != spec:
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(spec=new))
