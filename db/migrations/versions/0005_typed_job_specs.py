"""Job specs rewritten to the typed ``engine.spec.JobSpec`` form.

Before this revision a stored spec held every constraint as ``{"min": x, "max": y}`` (with
nulls), could name constraints the engine never honoured (``accuracy``, ``macs``, ``min``
bounds: such jobs failed at start) and space choices outside today's limits. Jobs are now
parsed back into ``JobSpec`` wherever they are read, so each spec is brought to that form
here: a bound keeps its ``max``; anything the type no longer accepts is moved, unchanged, to
``progress["legacy_spec"]`` so nothing stored is lost. The rules are written out here
(not imported from ``engine``) so this revision keeps its meaning when the type evolves.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FIELDS = {
    "model_id", "dataset_id", "device_id", "algorithm", "space", "objectives", "constraints", "budget",
    "seed", "remeasure_top_k", "reconstruct", "calibrate", "calibration_samples",
}  # fmt: skip
CONSTRAINTS = {"latency_ms", "size_bytes", "accuracy_drop"}


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _space(space: dict[str, Any]) -> dict[str, Any]:
    out = dict(space)
    if isinstance(out.get("bits"), list):
        out["bits"] = [b for b in out["bits"] if b is None or (_int(b) and 2 <= b <= 8)] or [None]
    if isinstance(out.get("nm_choices"), list):
        out["nm_choices"] = [
            p for p in out["nm_choices"]
            if isinstance(p, list) and len(p) == 2 and all(map(_int, p)) and 1 <= p[0] < p[1] <= 32
        ]  # fmt: skip
    if isinstance(out.get("block_choices"), list):
        out["block_choices"] = [b for b in out["block_choices"] if _int(b) and 2 <= b <= 64]
    if _int(out.get("round_to")):
        out["round_to"] = min(max(out["round_to"], 1), 64)
    return out


def typed(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``spec`` in the typed form, and what had to leave it (empty when nothing did)."""
    legacy: dict[str, Any] = {k: v for k, v in spec.items() if k not in FIELDS}
    out = {k: v for k, v in spec.items() if k in FIELDS}
    bounds: dict[str, Any] = {}
    for name, bound in (out.get("constraints") or {}).items():
        if (
            name in CONSTRAINTS
            and isinstance(bound, dict)
            and bound.get("max") is not None
            and bound.get("min") is None
            and set(bound) <= {"min", "max"}
        ):
            bounds[name] = {"max": bound["max"]}
        else:
            legacy.setdefault("constraints", {})[name] = bound
    if "constraints" in out:
        out["constraints"] = bounds
    if isinstance(out.get("space"), dict):
        space = _space(out["space"])
        if space != out["space"]:
            legacy["space"] = out["space"]
        out["space"] = space
    return out, legacy


def upgrade() -> None:
    conn = op.get_bind()
    jobs = sa.table(
        "jobs", sa.column("id", sa.Integer), sa.column("spec", sa.JSON), sa.column("progress", sa.JSON)
    )
    for job_id, spec, progress in conn.execute(sa.select(jobs.c.id, jobs.c.spec, jobs.c.progress)).all():
        spec = json.loads(spec) if isinstance(spec, str) else spec
        progress = json.loads(progress) if isinstance(progress, str) else progress
        if not isinstance(spec, dict):
            continue
        new, legacy = typed(spec)
        if new == spec:
            continue
        if legacy:
            progress = {**(progress or {}), "legacy_spec": legacy}
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(spec=new, progress=progress))


def downgrade() -> None:
    # The typed form is valid input to the code before this revision; nothing to undo.
    pass
