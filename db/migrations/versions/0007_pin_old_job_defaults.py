"""Jobs stored before one-shot recovery, front fine-tuning and device-resolved spaces keep
what they meant.

Three ``JobSpec`` defaults changed after 0006: ``recovery`` ("magnitude" → "obc"),
``finetune`` (absent → the top 5 front points fine-tuned) and the space's ``schemes``,
``bits`` and ``round_to`` (fixed lists and 1 → null, "what the device accelerates"). A job
queued, running or resumed after the upgrade, and the export of any old candidate, must build
the models its candidates were scored with, so each stored spec gets the old values written
out wherever it left them unset. The values are written here (not imported from ``engine``)
so this revision keeps its meaning when the type evolves.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_SPACE = {"schemes": ["dense", "unstructured", "nm", "block"], "bits": [None, 8], "round_to": 1}


def pinned(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the pre-0007 defaults written out where it leaves them unset."""
    out = dict(spec)
    out.setdefault("recovery", "magnitude")
    out.setdefault("finetune", {"top_k": 0})
    space = dict(out["space"]) if isinstance(out.get("space"), dict) else {}
    for key, value in OLD_SPACE.items():
        if space.get(key) is None:
            space[key] = value
    out["space"] = space
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
    # The written-out values are valid input to the code before this revision; nothing to undo.
    pass
