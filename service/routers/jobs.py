"""``/v1/jobs``: submit, watch (JSON or server-sent events), cancel, read candidates and the front."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import Receive, Scope, Send

from db.engine import read_session
from db.models import TERMINAL_JOB_STATUSES, Candidate, Job
from engine.spec import JobSpec
from service import queries, quotas
from service.deps import CurrentTenant, ReadSessionDep, SessionDep, SettingsDep
from service.routers.models import ERRORS
from service.schemas import (
    CandidatePublic,
    CandidatesPublic,
    FrontPoint,
    FrontPublic,
    JobAccepted,
    JobPublic,
    JobsPublic,
    Message,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])
SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0
SSE_DESCRIPTION = (
    "A `text/event-stream` (server-sent events). Each stored event of the job is one message: "
    "`id:` (the event id, send it back as `Last-Event-ID` to resume), `event:` (`status`, "
    "`progress`, `phase`, ...) and `data:` (a JSON object). `status` data: `status` and, once "
    "finished, `error`; `progress` data: `phase`, `done`, `total`, `elapsed_s`, `eta_s`, "
    "`best_accuracy`. A `: keepalive` comment comes every 15 s of silence. Once the job is "
    "finished and every event sent, a last `event: end` with `data: {}` closes the stream."
)
SSE_EXAMPLE = (
    'id: 2\nevent: status\ndata: {"status": "running", "resumed_from": 0}\n\n'
    'id: 3\nevent: progress\ndata: {"phase": "searching", "done": 1, "total": 200, '
    '"elapsed_s": 3.9, "eta_s": 776.1, "best_accuracy": 0.9034}\n\n'
    'id: 41\nevent: status\ndata: {"status": "succeeded", "error": null}\n\n'
    "event: end\ndata: {}\n\n"
)


def to_candidate(candidate: Candidate) -> CandidatePublic:
    out = CandidatePublic.model_validate(candidate, from_attributes=True)
    extra = candidate.extra or {}
    update: dict[str, Any] = {}
    if "one_shot_accuracy" in extra:  # a candidate the job fine-tuned (engine.finetune_front)
        update["one_shot_accuracy"] = extra.get("one_shot_accuracy")
        update["finetuned_accuracy"] = extra.get("finetuned_accuracy")
    std = extra.get("latency_std_ms")  # the predictor's uncertainty (engine.active_measurement)
    if isinstance(std, (int, float)) and not isinstance(std, bool):
        update["latency_std_ms"] = float(std)
    return out.model_copy(update=update) if update else out


def to_public(session: Session, job: Job, *, with_best: bool = True) -> JobPublic:
    best = [to_candidate(c) for c in queries.best_candidates(session, job=job)] if with_best else []
    return JobPublic(
        id=job.id,
        status=job.status,  # type: ignore[arg-type]
        algorithm=job.algorithm,
        model_id=job.model_id,
        dataset_id=job.dataset_id,
        device_id=job.device_id,
        spec=JobSpec.model_validate(job.spec),
        progress=job.progress,
        baseline=job.baseline,
        best=best,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def job_or_404(session: Session, tenant_id: int, job_id: int) -> Job:
    """The tenant's job ``job_id``; HTTP 404 when it does not exist or is another tenant's."""
    job = queries.get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


@router.post("", response_model=JobAccepted, status_code=status.HTTP_201_CREATED, responses=ERRORS)
def create_job(
    body: JobSpec, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> JobAccepted:
    """Queue a search job; the spec is fully validated before anything is stored."""
    if queries.get_model(session, tenant_id=tenant.id, model_id=body.model_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {body.model_id} not found")
    if queries.get_dataset(session, tenant_id=tenant.id, dataset_id=body.dataset_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {body.dataset_id} not found")
    if queries.get_device(session, tenant_id=tenant.id, device_id=body.device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {body.device_id} not found")
    quotas.admit_job(session, settings, tenant_id=tenant.id, spec=body)
    job = queries.add_job(session, tenant_id=tenant.id, spec=body)
    session.commit()
    return JobAccepted(id=job.id, status=job.status)


@router.get("", response_model=JobsPublic, responses=ERRORS)
def list_jobs(
    session: ReadSessionDep,
    tenant: CurrentTenant,
    status_: Annotated[str | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=queries.MAX_ID)] = 0,
) -> JobsPublic:
    """Your jobs, newest first."""
    rows, total = queries.list_jobs(session, tenant_id=tenant.id, status=status_, limit=limit, offset=offset)
    return JobsPublic(data=[to_public(session, j, with_best=False) for j in rows], count=total)


@router.get("/{job_id}", response_model=JobPublic, responses=ERRORS)
def get_job(job_id: int, session: ReadSessionDep, tenant: CurrentTenant) -> JobPublic:
    """Status, progress (done / total, best so far, ETA), the best front points and any error."""
    return to_public(session, job_or_404(session, tenant.id, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=ERRORS)
def cancel_job(job_id: int, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    """Stop a job; its candidates are kept. A running job stops within seconds."""
    job = queries.request_cancel(session, job=job_or_404(session, tenant.id, job_id))
    return to_public(session, job)


@router.get("/{job_id}/candidates", response_model=CandidatesPublic, responses=ERRORS)
def list_candidates(
    job_id: int,
    session: ReadSessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=queries.MAX_ID)] = 0,
) -> CandidatesPublic:
    """Evaluated candidates in evaluation order, with policy and every score."""
    job = job_or_404(session, tenant.id, job_id)
    rows = queries.list_candidates(session, job_id=job.id, limit=limit, offset=offset)
    return CandidatesPublic(
        data=[to_candidate(c) for c in rows], count=queries.count_candidates(session, job_id=job.id)
    )


@router.get("/{job_id}/pareto", response_model=FrontPublic, responses=ERRORS)
def get_pareto(
    job_id: int,
    session: ReadSessionDep,
    tenant: CurrentTenant,
    fold: Annotated[
        bool,
        Query(description="leave out the points folded under a representative (equal within resolution)"),
    ] = False,
) -> FrontPublic:
    """The non-dominated feasible candidates under the job's objectives, best first.

    Points equal in every objective within measurement resolution (accuracy: one validation
    image; latency, size, MACs: 1 %) are folded: the representative lists them in
    ``duplicates`` and each names it in ``duplicate_of``; ``fold=true`` returns the
    representatives alone.
    """
    job = job_or_404(session, tenant.id, job_id)
    front = queries.pareto(session, job=job)
    resolution = queries.job_resolution(session, job=job)
    groups = queries.front_groups(session, job=job, front=front, resolution=resolution)
    rep_of = {i: g[0] for g in groups for i in g[1:]}
    dups = {g[0]: [front[i].id for i in g[1:]] for g in groups}
    data = [
        _front_point(c, duplicates=dups.get(i, []), duplicate_of=front[rep_of[i]].id if i in rep_of else None)
        for i, c in enumerate(front)
        if not (fold and i in rep_of)
    ]
    return FrontPublic(data=data, count=len(data), folded=len(rep_of), resolution=resolution.to_dict())


def _front_point(c: Candidate, *, duplicates: list[int], duplicate_of: int | None) -> FrontPoint:
    """As :func:`to_candidate`, with the fold's fields (one validation per point: GET /pareto stays fast)."""
    update: dict[str, Any] = {"duplicates": duplicates, "duplicate_of": duplicate_of}
    extra = c.extra or {}
    if "one_shot_accuracy" in extra:
        update |= {
            "one_shot_accuracy": extra.get("one_shot_accuracy"),
            "finetuned_accuracy": extra.get("finetuned_accuracy"),
        }
    return FrontPoint.model_validate(c, from_attributes=True).model_copy(update=update)


def _poll(factory: sessionmaker[Session], job_id: int, after: int) -> tuple[list[tuple[int, str, Any]], bool]:
    """Events after ``after`` and whether the job is finished, read in one short read-only session."""
    with read_session(factory) as session:
        events = queries.events_after(session, job_id=job_id, after_id=after)
        job_status = session.scalar(select(Job.status).where(Job.id == job_id))  # not the whole row
        finished = job_status is None or job_status in TERMINAL_JOB_STATUSES
        return [(e.id, e.kind, e.data) for e in events], finished


async def _sse(factory: sessionmaker[Session], job_id: int, after: int) -> AsyncIterator[str]:
    """Stream stored events from ``after``; ends once the job is finished and drained.

    Between polls a stream holds no session, connection or thread: each poll is a short
    read-only session (no SQLite write lock) run in a worker thread, and the wait is an
    asyncio sleep. (A sync generator would sleep in a threadpool thread: some 40 open
    streams then took every thread, and every other request queued behind them.)
    """
    last_sent = time.monotonic()
    while True:
        payload, finished = await anyio.to_thread.run_sync(_poll, factory, job_id, after)
        for event_id, kind, data in payload:
            after = event_id
            yield f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"
            last_sent = time.monotonic()
        if finished and not payload:
            yield "event: end\ndata: {}\n\n"
            return
        if not payload:
            if time.monotonic() - last_sent > SSE_KEEPALIVE_S:
                yield ": keepalive\n\n"
                last_sent = time.monotonic()
            await anyio.sleep(SSE_POLL_S)


class _EventStream(StreamingResponse):
    """A stream that gives its tenant's stream slot back when the response ends, however it ends."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {
            "description": SSE_DESCRIPTION,
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": SSE_EXAMPLE}},
        },
        429: {"model": Message, "description": "the tenant has `streams_per_tenant` event streams open"},
    },
)
def job_events(
    job_id: int,
    request: Request,
    settings: SettingsDep,
    tenant: CurrentTenant,
    last_event_id: Annotated[int | None, Header(ge=0, le=queries.MAX_ID)] = None,
) -> StreamingResponse:
    """Progress as server-sent events (``status``, ``progress``, ``phase``...); resumes from Last-Event-ID.

    A tenant may hold ``streams_per_tenant`` streams open at once (429 beyond).
    """
    factory: sessionmaker[Session] = request.app.state.session_factory
    with read_session(factory) as session:  # no request session: nothing is held while streaming
        job_or_404(session, tenant.id, job_id)
    release = quotas.stream_slots(request.app.state).acquire(tenant.id, settings.streams_per_tenant)
    return _EventStream(_sse(factory, job_id, last_event_id or 0), release)
