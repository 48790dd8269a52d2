"""FastAPI dependencies as Annotated aliases: the database session, settings, the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from db.models import Tenant
from service.auth import tenant_for_key
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) afterwards."""
    with request.app.state.session_factory() as session:
        yield session


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def current_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant of the bearer key; 401 with a message saying what is wrong otherwise."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send the header 'Authorization: Bearer <key>'",
            headers=challenge,
        )
    tenant = tenant_for_key(session, key=credentials.credentials)
    if tenant is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key", headers=challenge)
    # End the lookup's transaction now: on SQLite every transaction holds the write lock
    # (BEGIN IMMEDIATE), so a slow handler (an upload check, an event stream) must not
    # start with one open. Expunged, the tenant keeps its loaded values.
    session.expunge(tenant)
    session.rollback()
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
