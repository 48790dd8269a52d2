"""Uploads are data, never code: size-limited, hashed, content-checked, then stored.

A file is streamed to ``<data_dir>/tmp``, checked in a child process with memory and time
limits (:mod:`service.inspect_process`: ``torch.export`` archives through
:func:`compression.model_io.load_pt2`, .npz through :func:`compression.data.load_npz`, both
of which check every declared size against the settings' limits before inflating anything
and never unpickle) and only then moved to its content-addressed place, so a rejected upload
leaves nothing behind and never touches what was stored before. A tenant checks at most
``Settings.uploads_per_tenant`` uploads at a time (429 beyond), counted in this process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.settings import Settings

if TYPE_CHECKING:
    from compression.archive_check import ArchiveLimits
    from service.inspect_process import Kind

CHUNK = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024


class UploadError(ValueError):
    """The uploaded file is not acceptable; the message tells the user why.

    ``status``: 413 when it is over a size or memory limit, else 400.
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether loading failed for want of memory (Python's or torch's allocator)."""
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


@dataclass
class Received:
    """A validated upload waiting in the tmp folder."""

    tmp_path: Path
    sha256: str
    size_bytes: int
    name: str
    filename: str


async def receive_file(request: Request, settings: Settings, *, suffix: str) -> Received:
    """Read the multipart ``file`` (+ optional ``name``) field into a tmp file, within limits."""
    length = request.headers.get("content-length")
    if length is None:
        raise HTTPException(status.HTTP_411_LENGTH_REQUIRED, "uploads need a Content-Length header")
    if not length.isdigit() or int(length) > settings.max_upload_bytes + MULTIPART_OVERHEAD:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"upload larger than the limit of {settings.max_upload_bytes} bytes",
        )
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # malformed multipart bodies raise parser-specific errors
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"malformed multipart body: {exc}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, "multipart field 'file' (the uploaded file) is required"
        )
    raw_name = form.get("name")
    filename = Path(upload.filename or f"upload{suffix}").name
    name = (raw_name if isinstance(raw_name, str) and raw_name.strip() else Path(filename).stem).strip()[:200]
    tmp = settings.data_dir / "tmp" / f"{uuid.uuid4().hex}{suffix}"
    digest = hashlib.sha256()
    size = 0
    try:
        with tmp.open("wb") as out:
            while chunk := await upload.read(CHUNK):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise HTTPException(
                        status.HTTP_413_CONTENT_TOO_LARGE,
                        f"upload larger than the limit of {settings.max_upload_bytes} bytes",
                    )
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        discard(tmp)
        raise
    finally:
        await upload.close()
    if size == 0:
        discard(tmp)
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the uploaded file is empty")
    return Received(tmp_path=tmp, sha256=digest.hexdigest(), size_bytes=size, name=name, filename=filename)


def discard(path: Path) -> None:
    """Remove a tmp file if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def store(received: Received, folder: Path, suffix: str) -> Path:
    """Move a validated upload to ``folder/<sha256><suffix>``; identical content is kept once."""
    final = folder / f"{received.sha256}{suffix}"
    if final.exists():
        discard(received.tmp_path)
    else:
        os.replace(received.tmp_path, final)
    return final


def inspect_model(path: Path, limits: ArchiveLimits | None = None) -> dict[str, Any]:
    """Load a .pt2 with ``torch.export`` and describe it; raises UploadError if it is not one.

    Runs in the inspection child (:mod:`service.inspect_process`); MemoryError propagates.
    """
    from compression.model_io import ModelLoadError, ModelTooLargeError, load_pt2

    try:
        model = load_pt2(path, name=path.stem, limits=limits)
    except ModelLoadError as exc:
        if _out_of_memory(exc.__cause__):  # torch.export.load failed for want of memory
            raise MemoryError from exc
        status = 413 if isinstance(exc, ModelTooLargeError) else 400
        raise UploadError(str(exc).replace(str(path), "uploaded file"), status=status) from None
    except Exception as exc:  # anything else a hostile archive provokes is still a bad upload
        if _out_of_memory(exc):
            raise MemoryError from exc
        raise UploadError(
            f"uploaded file is not a usable torch.export archive: {type(exc).__name__}: {exc}"
        ) from None
    params = sum(int(p.numel()) for p in model.gm.parameters())
    layers: list[dict[str, Any]] = []
    macs: int | None = None
    try:
        graph = model.graph
        for info in graph.layers:
            layers.append({"name": info.name, **info.features.to_dict()})
        macs = sum(int(layer["macs"]) for layer in layers)
    except Exception as exc:
        if _out_of_memory(exc):
            raise MemoryError from exc
        raise UploadError(
            f"the model loads but its graph cannot be analysed for compression: {exc}"
        ) from None
    return {"params": params, "macs": macs, "layers": layers, "input_shape": list(model.input_shape)}


def inspect_dataset(path: Path, limits: ArchiveLimits | None = None) -> dict[str, Any]:
    """Validate a .npz data set; returns the shapes of its splits; raises UploadError.

    Runs in the inspection child (:mod:`service.inspect_process`); MemoryError propagates.
    """
    from compression.data import DataError, DataTooLargeError, load_npz

    try:
        data = load_npz(path, name=path.stem, limits=limits)
    except DataError as exc:
        status = 413 if isinstance(exc, DataTooLargeError) else 400
        raise UploadError(str(exc).replace(str(path), "uploaded file"), status=status) from None
    except Exception as exc:
        if _out_of_memory(exc):
            raise MemoryError from exc
        raise UploadError(
            f"uploaded file is not a valid .npz data set: {type(exc).__name__}: {exc}"
        ) from None
    return dataset_shapes(data)


def dataset_shapes(data: Any) -> dict[str, Any]:
    """The shapes of a ``compression.data.Dataset``'s splits and its number of classes."""
    shapes: dict[str, Any] = {key: list(arr.shape) for key, arr in data.arrays().items()}
    shapes["num_classes"] = data.num_classes
    return shapes


@functools.cache
def builtin_shapes(name: str) -> dict[str, Any]:
    """Shapes of a built-in data set, read from the data itself once per process."""
    from compression.data import load_builtin

    return dataset_shapes(load_builtin(name))


async def inspected(kind: Kind, path: Path, settings: Settings) -> dict[str, Any]:
    """Check an upload in the inspection child, off the event loop; a refusal discards the file
    and becomes its status (400 or 413) with the reason."""
    from service.inspect_process import inspect_in_child

    try:
        result: dict[str, Any] = await run_in_threadpool(inspect_in_child, kind, path, settings)
    except UploadError as exc:
        discard(path)
        raise HTTPException(exc.status, str(exc)) from None
    return result


@contextlib.asynccontextmanager
async def upload_slot(request: Request, settings: Settings, tenant_id: int) -> AsyncIterator[None]:
    """Hold one of the tenant's ``uploads_per_tenant`` upload slots while receiving and checking.

    Raises:
        HTTPException: 429 when the tenant's uploads already fill every slot.
    """
    # Counted on the event loop only (handlers are async), so no lock is needed.
    state = request.app.state
    in_flight: dict[int, int] | None = getattr(state, "uploads_in_flight", None)
    if in_flight is None:
        in_flight = state.uploads_in_flight = {}
    held = in_flight.get(tenant_id, 0)
    if held >= settings.uploads_per_tenant:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"you have {held} uploads being checked and the limit is {settings.uploads_per_tenant} "
            "per tenant (MODELTAILOR_UPLOADS_PER_TENANT); send this one when one has finished",
            headers={"Retry-After": "5"},
        )
    in_flight[tenant_id] = held + 1
    try:
        yield
    finally:
        in_flight[tenant_id] -= 1
        if not in_flight[tenant_id]:
            del in_flight[tenant_id]
