"""Migrations build exactly the schema the models describe, on every backend."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from db.engine import make_engine
from db.migrate import alembic_config, current, upgrade
from db.models import Base, Job


def _head(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def test_upgrade_empty_database_to_head_matches_models(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(ctx, Base.metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diffs == []
    assert set(Base.metadata.tables) <= tables
    assert current(db_url) == _head(db_url)


def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    upgrade(db_url)
    upgrade(db_url)
    assert current(db_url) == _head(db_url)


def test_sqlite_runs_in_wal_mode(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/wal.db"
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()


def test_old_job_specs_are_rewritten_to_the_typed_form_and_nothing_is_lost(db_url: str) -> None:
    from engine.spec import JobSpec

    old = {
        "model_id": 1, "dataset_id": 1, "device_id": 1, "algorithm": "rule",
        "space": {"schemes": ["dense", "nm"], "bits": [None, 8, 16], "nm_choices": [[2, 4], [5, 4]]},
        "objectives": [{"metric": "accuracy", "direction": "max"}],
        "constraints": {"accuracy_drop": {"min": None, "max": 0.01}, "accuracy": {"min": 0.9, "max": None}},
        "budget": {"candidates": 20, "seconds": 900}, "seed": 3,
    }  # fmt: skip
    job = _job_after_upgrade(db_url, "0004", old, {"done": 20})
    spec = JobSpec.model_validate(job.spec)
    legacy = job.progress["legacy_spec"]
    assert spec.bound("accuracy_drop") == 0.01 and spec.seed == 3
    assert spec.space.bits == [None, 8] and [tuple(p) for p in spec.space.nm_choices] == [(2, 4)]
    assert legacy["constraints"] == {"accuracy": {"min": 0.9, "max": None}}
    assert legacy["space"]["bits"] == [None, 8, 16] and job.progress["done"] == 20


def test_jobs_stored_before_0007_keep_their_recovery_finetune_and_space(db_url: str) -> None:
    """Old jobs resume and export with the models they were scored with, not today's defaults."""
    from engine.spec import JobSpec

    old = {"algorithm": "rule", "space": {"schemes": ["dense", "nm"]}, "seed": 2}
    job = _job_after_upgrade(db_url, "0006", old, {})
    spec = JobSpec.model_validate(job.spec)
    assert spec.recovery == "magnitude" and spec.finetune.top_k == 0
    assert spec.space.schemes == ["dense", "nm"] and spec.space.bits == [None, 8]
    assert spec.space.round_to == 1 and spec.seed == 2
    # A job submitted today gets today's defaults.
    ids = {"model_id": job.model_id, "dataset_id": job.dataset_id, "device_id": job.device_id}
    fresh = JobSpec.model_validate({**ids, "algorithm": "rule"})
    assert fresh.recovery == "obc" and fresh.finetune.top_k == 5 and fresh.space.round_to is None


def test_jobs_stored_before_0008_keep_calibrate_and_measure_nothing_during_the_search(db_url: str) -> None:
    """Old jobs search as submitted: no top-up they did not ask for, no active measurement; an old
    ``calibrate: "model"`` job measures its model as much as its calibration did."""
    from engine.spec import JobSpec

    old = {"algorithm": "rule", "calibrate": "model", "calibration_samples": 24, "seed": 4}
    job = _job_after_upgrade(db_url, "0007", old, {})
    spec = JobSpec.model_validate(job.spec)
    assert spec.calibrate == "model" and spec.topup_samples == 24 and spec.calibration_samples == 24
    assert not spec.active_measurement.on and spec.active_measurement.limit(200) == 0
    # A job submitted today tops up its model and measures during its search.
    ids = {"model_id": job.model_id, "dataset_id": job.dataset_id, "device_id": job.device_id}
    fresh = JobSpec.model_validate({**ids, "algorithm": "rule"})
    assert fresh.calibrate == "model" and fresh.topup_samples == 16
    assert fresh.active_measurement.on and fresh.active_measurement.limit(200) == 30


def test_jobs_stored_without_calibrate_keep_auto_after_0008(db_url: str) -> None:
    from engine.spec import JobSpec

    job = _job_after_upgrade(db_url, "0007", {"algorithm": "random", "seed": 1}, {})
    spec = JobSpec.model_validate(job.spec)
    assert spec.calibrate == "auto" and not spec.active_measurement.on and spec.seed == 1


def _job_after_upgrade(
    db_url: str, from_revision: str, spec: dict[str, Any], progress: dict[str, Any]
) -> Job:
    """Store one job with ``spec`` at ``from_revision``, upgrade to head, return the stored job."""
    from sqlalchemy import select

    from db.engine import make_session_factory
    from db.models import Dataset, Device, Model, Tenant

    upgrade(db_url, from_revision)
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as s:
            tenant = Tenant(name="t")
            s.add(tenant)
            s.flush()
            data = Dataset(tenant_id=tenant.id, name="d", builtin="digits")
            device = Device(name="cpu", runtime="onnxruntime")
            model = Model(tenant_id=tenant.id, name="m", source="zoo", zoo="lenet5")
            s.add_all([data, device, model])
            s.flush()
            ids = {"model_id": model.id, "dataset_id": data.id, "device_id": device.id}
            s.add(Job(tenant_id=tenant.id, algorithm="rule", spec={**spec, **ids}, progress=progress, **ids))
            s.commit()
        upgrade(db_url)
        with make_session_factory(engine)() as s:
            return s.scalars(select(Job)).one()
    finally:
        engine.dispose()
