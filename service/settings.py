"""Service configuration from the environment, read once when the app or CLI starts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".modeltailor"


class Settings(BaseSettings):
    """Everything the server, the worker and the CLI's admin commands need to know.

    Attributes:
        data_dir: uploaded files, artifacts, the SQLite database and the local API key.
        database_url: SQLAlchemy URL; default a SQLite file in ``data_dir``.
        executor: where candidate evaluations run: a local process pool or Ray.
        workers: processes of the local pool (the CLI's ``--workers``; 1 evaluates in the
            runner's own process), or Ray actors of a job (capped at the cluster's CPUs).
        ray_address: Ray cluster to join; None starts a local Ray for the process (loopback only).
        max_upload_bytes: largest model or data set upload accepted.
        run_jobs: run the job runner inside the API process (the embedded default).
        runner_slots: jobs one process runs at once.
        http_threads: requests the API handles at once; more wait their turn in the server
            (never on the database pool, which is sized to hold them all with the runner's).
        lease_s: job lease length; a dead runner's job is resumed after this long.
        poll_s: how often an idle runner looks for queued jobs.
        create_local_tenant: on first start, create tenant "local" and save its key.
        max_json_body_bytes: largest JSON request body (read in chunks, refused with 413 past it).
        max_unpacked_bytes: largest total inflated size of an uploaded archive (.pt2 / .npz
            members), checked from the archive's directory before anything is inflated.
        max_model_params: most elements all tensors of an uploaded model may declare together.
        max_dataset_elements: most elements all arrays of an uploaded data set may hold together.
        uploads_per_tenant: uploads of one tenant checked at the same time (more answer 429).
        inspect_memory_bytes: address-space limit of the process that loads and inspects an upload.
        inspect_timeout_s: wall-clock limit of that process.
        streams_per_tenant: open event streams of one tenant (more answer 429).
        queued_jobs_per_tenant: queued or running jobs of one tenant (more answer 429).
        max_job_candidates: largest ``budget.candidates`` of a job.
        max_job_seconds: largest ``budget.seconds`` of a job.
        max_calibration_samples: largest ``samples`` of a calibration.
        admin_key: key that may calibrate the shared built-in devices (None: nobody may; tenants
            calibrate devices they created).

    Each field is read from ``MODELTAILOR_<FIELD>`` (``DATABASE_URL`` and ``RAY_ADDRESS`` also
    without the prefix). The device-latency timeouts are in :class:`Timeouts`.
    """

    model_config = SettingsConfigDict(env_prefix="MODELTAILOR_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("database_url", "DATABASE_URL", "MODELTAILOR_DATABASE_URL"),
    )
    executor: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=1, le=256)
    ray_address: str | None = Field(
        default=None, validation_alias=AliasChoices("ray_address", "RAY_ADDRESS", "MODELTAILOR_RAY_ADDRESS")
    )
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    run_jobs: bool = True
    runner_slots: int = Field(default=1, ge=1, le=64)
    http_threads: int = Field(default=32, ge=2, le=256)
    lease_s: float = Field(default=30.0, gt=0)
    poll_s: float = Field(default=1.0, gt=0)
    create_local_tenant: bool = True
    # Limits a single tenant's requests can reach (the hostile-tenant suite checks each).
    max_json_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_unpacked_bytes: int = Field(default=2 * 1024**3, ge=1)
    max_model_params: int = Field(default=100_000_000, ge=1)
    max_dataset_elements: int = Field(default=256 * 1024**2, ge=1)
    uploads_per_tenant: int = Field(default=2, ge=1, le=64)
    inspect_memory_bytes: int = Field(default=6 * 1024**3, ge=256 * 1024**2)
    inspect_timeout_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    streams_per_tenant: int = Field(default=8, ge=1, le=1024)
    queued_jobs_per_tenant: int = Field(default=20, ge=1)
    max_job_candidates: int = Field(default=5000, ge=1)
    max_job_seconds: float = Field(default=86_400.0, gt=0, allow_inf_nan=False)
    max_calibration_samples: int = Field(default=1000, ge=2)
    admin_key: str | None = None

    @property
    def db_pool_size(self) -> int:
        """Connections one API process may hold: every HTTP thread, each runner slot's job and
        its lease renewal, the housekeeper, and a margin for start-up work."""
        return self.http_threads + 2 * self.runner_slots + 4

    @property
    def db_url(self) -> str:
        """The database URL in effect."""
        return self.database_url or f"sqlite:///{self.data_dir / 'modeltailor.db'}"

    @property
    def local_key_path(self) -> Path:
        """Where the embedded default's API key is written (mode 0600)."""
        return self.data_dir / "local_api_key"

    def ensure_dirs(self) -> None:
        """Create the data directory tree (files land in sub-folders by kind)."""
        for sub in ("", "models", "datasets", "artifacts", "tmp"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)


class Timeouts(BaseSettings):
    """Device-latency timeouts, in seconds, read once at start: ``create_app`` and the
    ``worker`` command build one and pass it down (the runner, the calibration threads, the
    device routes); no module reads it at import.

    A bad value (not a positive finite number) stops the start with a ``ValidationError``
    that names the field, instead of falling back to the default.

    Attributes:
        calibration_stale_s: ``MODELTAILOR_CALIBRATION_STALE_S`` (300): the lease of a running
            calibration (``db.work_queue.CALIBRATIONS``), renewed at each of its progress
            beats; once it lapses the calibration was abandoned and is ended as failed.
        task_lease_s: ``MODELTAILOR_TASK_LEASE_S`` (600): the lease of a measurement task a
            device agent claimed (``db.work_queue.DEVICE_TASKS``); not answered within this
            long, it is handed out again.
        agent_wait_s: ``MODELTAILOR_AGENT_WAIT_S`` (900): how long a calibration waits for
            any device agent to pick up its tasks before failing.
        remeasure_wait_s: ``MODELTAILOR_REMEASURE_WAIT_S`` (300): how long the end of a job
            (and an export) waits for device agents to time its re-measurement tasks.
    """

    model_config = SettingsConfigDict(env_prefix="MODELTAILOR_", extra="ignore")

    calibration_stale_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    task_lease_s: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    agent_wait_s: float = Field(default=900.0, gt=0, allow_inf_nan=False)
    remeasure_wait_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
