"""Engine and session factory for SQLite (embedded default) and PostgreSQL (scale-out).

SQLite gets WAL mode, a busy timeout and foreign keys on every connection, so the API,
the runner threads and a separate worker process can share one file without
"database is locked" errors on short write bursts.

Two kinds of transaction on SQLite:

* A plain session (``factory()``) may write, so its transaction starts with ``BEGIN
  IMMEDIATE``: it takes the write lock up front and concurrent writers queue on the busy
  timeout. A deferred transaction that reads and then writes would instead fail at once
  with ``SQLITE_BUSY_SNAPSHOT`` whenever another writer committed after its read (WAL
  cannot upgrade a stale snapshot, and the busy timeout does not apply), which is why
  "begin deferred and let SQLite upgrade" is not used for writers.
* A :func:`read_session` only reads, so it starts with a deferred ``BEGIN``: in WAL mode a
  reader takes no lock a writer waits on and waits on no writer. Hot read paths that must
  not queue behind writers use it: the API key lookup of every request, each poll of an
  event stream, the runner's stop and cancel checks.

PostgreSQL needs neither: MVCC readers never block writers, and the lease compare-and-set
re-checks its WHERE clause after a concurrent commit.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY_OPTION = "modeltailor_read_only"  # execution option: this connection's transactions only read


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


def _sqlite_begin(conn: Connection) -> None:
    # Writers: IMMEDIATE takes the write lock when the transaction starts, so two writers queue
    # on the busy timeout instead of one failing on a read-to-write upgrade. Readers: deferred,
    # so they never hold (or wait for) the write lock. See the module docstring.
    read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


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


def read_session(factory: sessionmaker[Session]) -> Session:
    """A session of ``factory`` for reads only: a deferred ``BEGIN`` on SQLite (no write lock).

    Use it where a read must neither take nor wait for SQLite's write lock; anything that may
    write uses a plain ``factory()`` session. Objects it loads keep their values after it closes.
    """
    engine = factory.kw["bind"]
    return factory(bind=engine.execution_options(**{READ_ONLY_OPTION: True}))
