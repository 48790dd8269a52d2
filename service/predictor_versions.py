"""Predictor versions of a device: where they are stored, which one a tenant's job uses.

A device's measurements and predictors are a ``latency_models.store.DeviceStore`` under the
service's data directory (built-in devices use their plain name, so ``modeltailor calibrate
--device cpu-ort-1t`` with the same data directory feeds the service, and the other way
round; a tenant's device gets ``t<tenant>-<name>``). A built-in device is shared by every
tenant: what a tenant's job calibrates on it goes to that tenant's own store
(``<name>@t<tenant>``) and predictors, which no other tenant sees or uses; only the admin's
calibrations make the device's own.

Every stored version is mirrored into the ``predictors`` table with its held-out metrics and
a version number unique on the device (:func:`sync_predictors`). Mirroring writes, so it
happens on write paths only: when a calibration publishes its version, when a job looks for
its predictor (:func:`current_predictor`), and in the housekeeping loop
(:func:`mirror_all`, which picks up versions written outside the service). Read paths (the
REST GETs) list the table as it is (:func:`predictor_rows`).

Heavy imports (torch, the predictors) happen inside functions: the API imports this module.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from db.engine import read_session
from db.models import Device, Predictor, Tenant
from latency_models.calibration_run import predictor_metrics

if TYPE_CHECKING:
    from latency_models.predictors import Predictor as LatencyPredictor
    from latency_models.store import DeviceStore

log = logging.getLogger("modeltailor.latency")


def store_key(device: Device, tenant_id: int | None = None) -> str:
    """Folder name of a store: a built-in's name, ``t<tenant>-<name>`` for a tenant's device, and
    ``<name>@t<tenant>`` for a tenant's own predictors of a built-in (no device name has ``@``)."""
    if device.tenant_id is not None:
        return f"t{device.tenant_id}-{device.name}"
    return device.name if tenant_id is None else f"{device.name}@t{tenant_id}"


def device_store(data_dir: Path, device: Device, tenant_id: int | None = None) -> DeviceStore:
    """The measurement / predictor store of ``device`` (of ``tenant_id``'s own predictors of a
    shared device) under the service's data directory."""
    from latency_models.store import DeviceStore

    return DeviceStore(store_key(device, tenant_id), root=Path(data_dir))


def scope_of(device: Device, tenant_id: int | None) -> int | None:
    """Whose predictors a tenant's calibration of ``device`` makes: the tenant's own on a shared
    device, the device's own (None) on a tenant's device."""
    return tenant_id if device.tenant_id is None else None


def _folder_names(session: Session, device_id: int, scope: int | None) -> set[str]:
    """Version folders of one store that have a predictors row (names, so a moved data dir matches)."""
    owner = Predictor.tenant_id.is_(None) if scope is None else Predictor.tenant_id == scope
    paths = session.scalars(
        select(Predictor.artifact_path).where(Predictor.device_id == device_id, owner)
    ).all()
    return {Path(p).name for p in paths if p}


def _mirror(session: Session, device: Device, data_dir: Path, scope: int | None) -> None:
    """Add a predictors row for every version of one store that has none. Commits when it adds."""
    store = device_store(data_dir, device, scope)
    versions = store.versions()
    known = _folder_names(session, device.id, scope)
    if all(f"v{v:04d}" in known for v in versions):
        return
    # Version numbers are allocated across the device's stores: one mirror at a time per device
    # (a row lock on PostgreSQL; SQLite transactions take the write lock anyway).
    session.scalar(select(Device.id).where(Device.id == device.id).with_for_update())
    known = _folder_names(session, device.id, scope)
    top = session.scalar(select(func.max(Predictor.version)).where(Predictor.device_id == device.id)) or 0
    for version in versions:
        folder = store.predictors / f"v{version:04d}"
        if folder.name in known:
            continue
        try:
            doc = store.metrics(version)
        except (OSError, ValueError) as exc:
            log.warning("device %s: unreadable predictor version %s: %s", device.name, folder, exc)
            continue
        top += 1
        session.add(
            Predictor(
                device_id=device.id,
                version=top,
                tenant_id=scope,
                kind=str(doc.get("default", "")),
                metrics=predictor_metrics(doc, doc.get("holdout_pairs")),
                artifact_path=str(folder),
                sha256=hashlib.sha256((folder / "metrics.json").read_bytes()).hexdigest(),
            )
        )
    session.commit()


def _visible(device: Device, tenant_id: int | None) -> Any:
    return (Predictor.device_id == device.id) & or_(
        Predictor.tenant_id.is_(None), Predictor.tenant_id == tenant_id
    )


def predictor_rows(session: Session, *, device: Device, tenant_id: int | None) -> list[Predictor]:
    """The predictors table rows ``tenant_id`` may see on ``device``, oldest first (a read):
    the device's own, and on a shared device the tenant's own as well."""
    return list(
        session.scalars(select(Predictor).where(_visible(device, tenant_id)).order_by(Predictor.version))
    )


def sync_predictors(
    session: Session, *, device: Device, data_dir: Path, tenant_id: int | None = None
) -> list[Predictor]:
    """Mirror the stored predictor versions ``tenant_id`` may use into the predictors table.

    Versions written outside the service (``modeltailor calibrate``) appear here too. Returns
    the rows ``tenant_id`` may see, oldest first: the device's own, and on a shared device the
    tenant's own as well. Commits.
    """
    scopes = [None] if tenant_id is None or device.tenant_id is not None else [None, tenant_id]
    for scope in scopes:
        _mirror(session, device, data_dir, scope)
    return predictor_rows(session, device=device, tenant_id=tenant_id)


_TENANT_STORE = re.compile(r"^(?P<name>.+)@t(?P<tenant>[0-9]+)$")


def _unmirrored(session: Session, device: Device, data_dir: Path, scope: int | None) -> bool:
    """Whether one store holds a version the predictors table lacks (a read)."""
    folder = device_store(data_dir, device, scope).predictors
    if not folder.is_dir():
        return False
    versions = {p.name for p in folder.iterdir() if re.fullmatch(r"v[0-9]{4,}", p.name)}
    return not versions <= _folder_names(session, device.id, scope)


def mirror_all(factory: sessionmaker[Session], *, data_dir: Path) -> int:
    """Mirror every store of every device that holds an unmirrored version (the housekeeping
    loop): versions written outside the service (``modeltailor calibrate``) and tenants' own
    stores of shared devices. Reads first; writes only for a store that needs it. Returns how
    many stores it mirrored."""
    root = Path(data_dir) / "devices"
    tenant_stores: dict[str, set[int]] = {}
    if root.is_dir():
        for folder in root.iterdir():
            m = _TENANT_STORE.match(folder.name)
            if m is not None and (folder / "predictors").is_dir():
                tenant_stores.setdefault(m["name"], set()).add(int(m["tenant"]))
    todo: list[tuple[int, int | None]] = []
    with read_session(factory) as session:
        tenants = set(session.scalars(select(Tenant.id))) if tenant_stores else set()
        for device in session.scalars(select(Device).order_by(Device.id)).all():
            scopes: list[int | None] = [None]
            if device.tenant_id is None:
                scopes += sorted(tenant_stores.get(device.name, set()) & tenants)
            todo += [(device.id, s) for s in scopes if _unmirrored(session, device, data_dir, s)]
    for device_id, scope in todo:
        with factory() as session:
            row = session.get(Device, device_id)
            if row is not None:
                _mirror(session, row, data_dir, scope)
    return len(todo)


def preferred(rows: Sequence[Predictor], version: int | None = None) -> Predictor | None:
    """The predictor a tenant's job uses among ``rows`` (from :func:`sync_predictors`): ``version``
    if named, else the tenant's own newest, else the device's newest."""
    if version is not None:
        return next((p for p in rows if p.version == version), None)
    own = [p for p in rows if p.tenant_id is not None]
    newest = own or rows
    return newest[-1] if newest else None


@dataclass(frozen=True)
class LoadedPredictor:
    """A predictor ready to answer, which version of which device it is, and whose (None: the
    device's own)."""

    predictor: LatencyPredictor
    version: int
    kind: str
    device: str
    tenant_id: int | None = None
    #: What the device accelerates, measured by the calibration that made this version.
    capabilities: dict[str, Any] | None = None


_CACHE: dict[tuple[str, int], tuple[Any, int, str]] = {}
_CACHE_LOCK = threading.Lock()


def current_predictor(
    session: Session, *, data_dir: Path, device: Device, tenant_id: int | None, version: int | None = None
) -> LoadedPredictor | None:
    """The predictor ``tenant_id``'s jobs use on ``device`` (or ``version``); None when there is none.

    Rows without a stored folder (nothing to load) are passed over. Commits (mirrors first).
    """
    rows = sync_predictors(session, device=device, data_dir=data_dir, tenant_id=tenant_id)
    row = preferred([p for p in rows if p.artifact_path], version)
    if row is None or row.artifact_path is None:
        return None
    store = device_store(data_dir, device, row.tenant_id)
    stored = int(Path(row.artifact_path).name.removeprefix("v"))  # the store's own number
    key = (str(store.root), stored)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is None:
        from latency_models.predictors.base import StalePredictorError

        try:
            cached = store.load(stored, row.kind or None)
        except StalePredictorError as exc:  # an older feature encoding: the job calibrates anew
            log.warning("device %s: %s", device.name, exc)
            return None
        with _CACHE_LOCK:
            _CACHE[key] = cached
    predictor, _stored, kind = cached
    caps = (row.metrics or {}).get("capabilities")
    return LoadedPredictor(
        predictor, row.version, kind, device.name, row.tenant_id, caps if isinstance(caps, dict) else None
    )


def model_seen(data_dir: Path, device: Device, space_id: str, tenant_id: int | None = None) -> bool:
    """Whether the measurements of one store (see :func:`device_store`) include model ``space_id``."""
    store = device_store(data_dir, device, tenant_id)
    if not store.spaces.is_file():
        return False
    needle = f'"space_id": "{space_id}"'
    return any(needle in line for line in store.spaces.read_text().splitlines())
