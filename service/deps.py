"""FastAPI dependencies as Annotated aliases: the database session, settings, the caller's tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from db.engine import read_session
from db.models import Tenant
from service.auth import tenant_for_key
from service.settings import Settings, Timeouts

_bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, closed (and rolled back if uncommitted) afterwards.

    It opens its transaction (and, on SQLite, takes the write lock) only when the handler
    first uses it; a handler that streams closes it before its stream starts.
    """
    with request.app.state.session_factory() as session:
        yield session


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_read_session(request: Request) -> Iterator[Session]:
    """One read-only session per request (``db.engine.read_session``: on SQLite a deferred
    transaction that neither takes nor waits for the write lock). For GET handlers, which
    never write."""
    with read_session(request.app.state.session_factory) as session:
        yield session


def get_timeouts(request: Request) -> Timeouts:
    """The device-latency timeouts the app was created with."""
    timeouts: Timeouts = request.app.state.timeouts
    return timeouts


SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TimeoutsDep = Annotated[Timeouts, Depends(get_timeouts)]


def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant of the bearer key; 401 with a message saying what is wrong otherwise.

    The lookup runs in its own read-only session, closed before the handler starts: on
    SQLite a deferred transaction that takes no write lock, so any number of requests (event
    streams included) authenticate while a writer holds the lock. The returned tenant is
    detached and keeps its loaded values.
    """
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send the header 'Authorization: Bearer <key>'",
            headers=challenge,
        )
    with read_session(request.app.state.session_factory) as session:
        tenant = tenant_for_key(session, key=credentials.credentials)
    if tenant is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked API key", headers=challenge)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
