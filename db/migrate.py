"""Apply Alembic migrations programmatically: the service upgrades its database at start-up."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from db.engine import is_sqlite, make_engine, normalize_url

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` without an ini file (the package ships no ini to edit)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision``; safe to call on every start.

    Concurrent starts (API + worker) are serialised: on PostgreSQL by an advisory lock,
    on SQLite by the exclusive write lock taken by the migration transaction.
    """
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if not is_sqlite(url):
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at (None if never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
