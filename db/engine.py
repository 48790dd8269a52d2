"""Engine and session factory for SQLite (embedded default) and PostgreSQL (scale-out).

SQLite gets WAL mode, a busy timeout and foreign keys on every connection, so the API,
the runner threads and a separate worker process can share one file without
"database is locked" errors on short write bursts.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (what users and Docker images write)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    """Whether ``url`` names a SQLite database."""
    return make_url(normalize_url(url)).get_backend_name() == "sqlite"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit at the driver level; SQLAlchemy emits BEGIN itself (see _sqlite_begin),
    # which lets us take the write lock up front with BEGIN IMMEDIATE.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE: take the write lock when the transaction starts, so two writers queue on
    # the busy timeout instead of one failing on a read-to-write lock upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """JSON for the database: NaN / ±Infinity (e.g. an error metric over a zero) become null.

    PostgreSQL rejects them in JSON columns and SQLite would store text no client can parse.
    """
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` with the per-backend settings this service relies on."""
    url = normalize_url(url)
    kwargs.setdefault("json_serializer", json_dumps)
    if is_sqlite(url):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (handlers read them after committing)."""
    return sessionmaker(engine, expire_on_commit=False)
