"""Fresh databases for tests: one per test, on SQLite or PostgreSQL, never shared-and-wiped.

PostgreSQL is expected at ``MODELTAILOR_TEST_PG`` (default 127.0.0.1:5432, user postgres,
trust auth). If it cannot be reached the fixture raises: a suite that silently skipped
the PostgreSQL half would hide exactly the bugs it exists to catch.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BACKENDS = ("sqlite", "postgresql")
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _admin_dsn() -> str:
    return os.environ.get("MODELTAILOR_TEST_PG", DEFAULT_PG)


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """Create an empty PostgreSQL database, yield its SQLAlchemy URL, drop it afterwards."""
    import psycopg

    dsn = _admin_dsn()
    name = f"mt_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise RuntimeError(
            f"PostgreSQL is required by this test and is not reachable at {dsn}: {exc}. "
            "Start it (port 5432, trust auth) or set MODELTAILOR_TEST_PG."
        ) from exc
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = dsn.rsplit("/", 1)[0]
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of an empty database of ``backend`` ("sqlite" or "postgresql")."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'modeltailor.db'}"
    elif backend == "postgresql":
        with fresh_postgres() as url:
            yield url
    else:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
