"""API keys: generated once, shown once, stored only as sha256."""

from __future__ import annotations

import hashlib
import os
import secrets

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.models import ApiKey, Tenant
from service.settings import Settings

KEY_PREFIX = "mt_"
LOCAL_TENANT = "local"


def hash_key(key: str) -> str:
    """sha256 hex of a key: what the database stores and looks up."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def issue_key(session: Session, *, tenant_id: int) -> str:
    """Store a new key for ``tenant_id`` and return it in clear (the only time it exists)."""
    key = new_key()
    session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:10]))
    session.flush()
    return key


def create_tenant(session: Session, *, name: str) -> tuple[Tenant, str]:
    """Create tenant ``name`` with one key; raises ValueError if the name is taken. Commits."""
    name = name.strip()
    if not name:
        raise ValueError("tenant name must not be empty")
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise ValueError(f"tenant {name!r} already exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    key = issue_key(session, tenant_id=tenant.id)
    session.commit()
    return tenant, key


def tenant_for_key(session: Session, *, key: str) -> Tenant | None:
    """The tenant owning ``key``, or None for unknown or revoked keys.

    Only reads: every request runs it, so callers give it a ``db.engine.read_session`` (no
    SQLite write lock; see ``service.deps.current_tenant``).
    """
    return session.scalar(
        select(Tenant)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )


def ensure_local_tenant(factory: sessionmaker[Session], settings: Settings) -> str | None:
    """On a database with no tenant yet, create tenant "local" and save its key.

    Returns the new key (the caller prints it), or None when tenants already exist.
    The key goes to ``<data_dir>/local_api_key`` with mode 0600 so the SDK and CLI on
    this machine work without configuration.
    """
    with factory() as session:
        if session.scalar(select(func.count(Tenant.id))):
            return None
        try:
            _tenant, key = create_tenant(session, name=LOCAL_TENANT)
        except (ValueError, IntegrityError):  # another process won the first start
            session.rollback()
            return None
    path = settings.local_key_path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    os.chmod(path, 0o600)
    return key
