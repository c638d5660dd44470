"""`/api/v1/...`: the native job API. Submit a job (202 at once), follow it as server-sent events
(a `step` event per step with a preview as a PNG data URL, then `done`, `cancelled` or
`failed`), cancel it, fetch its images (PNGs carrying their parameters) or its whole result."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from .. import __version__
from ..pipelines.metadata import format_parameters
from .codec import png_base64, png_bytes
from .errors import RequestError
from .jobs import Job
from .native_request import JobRequest, to_generation
from .state import ServerState

KEEPALIVE = 15.0  # seconds: a comment line keeps proxies from closing a quiet stream
QUEUED_POLL = 1.0  # seconds: a waiting job's position is re-sent as the jobs ahead finish


class JobView(BaseModel):
    id: str
    state: str = Field(description="queued, running, done, cancelled or failed")
    position: int | None = Field(description="jobs ahead in the queue (0: next); null unless queued")
    step: int
    total: int = Field(description="steps of the whole run; 0 until it starts")
    progress: float
    eta: float | None = Field(description="seconds left, from the pace so far")
    model: str
    prompt: str
    seeds: list[int]
    images: list[str] = Field(description="URLs of the result PNGs once done")
    infotexts: list[str] = Field(description="A1111 'parameters' text of each image")
    warnings: list[str]
    error: str | None
    cancelled_at_step: int | None = Field(description="steps done when a cancel arrived (it stops after one more)")


class JobResult(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its 'parameters' text chunk")
    infotexts: list[str]
    parameters: list[dict[str, Any]] = Field(description="the A1111 fields of each image")
    seeds: list[int]


EVENTS_DOC = {200: {"description": "server-sent events: `state` {state, position}; `step` {step, total, progress, "
                                   "eta, preview?: PNG data URL}; then one of `done`, `cancelled`, `failed` "
                                   "carrying the job (as GET /api/v1/jobs/{id}), and the stream ends",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}},
              404: {"description": "no such job"}}
PNG_DOC = {200: {"description": "the PNG, with its A1111 'parameters' text chunk",
                 "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
           404: {"description": "no such job or image"}, 409: {"description": "the job is not done"}}


def native_router(state: ServerState) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["native job API"])
    queue = state.queue

    def find(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id!r} (finished jobs are kept for the last "
                               f"{state.settings.limits.keep_finished})", status=404)
        return job

    def view(job: Job) -> dict[str, Any]:
        result = job.result
        return {"id": job.id, "state": job.state, "position": queue.position(job), "step": job.step,
                "total": job.total, "progress": job.progress(), "eta": job.eta(), "model": job.model,
                "prompt": job.request.prompt, "seeds": result.seeds if result else [],
                "images": [f"/api/v1/jobs/{job.id}/images/{i}" for i in range(len(result.images))] if result else [],
                "infotexts": [format_parameters(p) for p in result.parameters] if result else [],
                "warnings": job.warnings, "error": job.error, "cancelled_at_step": job.cancelled_at_step}

    @router.post("/jobs", status_code=202, response_model=JobView, summary="Queue a generation")
    async def submit(body: JobRequest):
        request, model = to_generation(body, state.models, state.current_model, state.settings.limits)
        return view(queue.submit(Job(request, model)))

    @router.get("/jobs", response_model=list[JobView], summary="The jobs still kept, oldest first")
    async def jobs():
        return [view(job) for job in queue.jobs()]

    @router.get("/jobs/{job_id}", response_model=JobView, responses={404: {"description": "no such job"}})
    async def job_status(job_id: str):
        return view(find(job_id))

    @router.post("/jobs/{job_id}/cancel", response_model=JobView, responses={404: {"description": "no such job"}},
                 summary="Cancel: a queued job is dropped, a running one stops after its current step")
    async def cancel(job_id: str):
        job = find(job_id)
        queue.cancel(job)
        return view(job)

    @router.get("/jobs/{job_id}/events", responses=EVENTS_DOC, response_class=StreamingResponse,
                summary="Follow a job: its steps with previews, then its end")
    async def events(job_id: str):
        job = find(job_id)
        return StreamingResponse(_event_stream(job, view, queue.position), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @router.get("/jobs/{job_id}/images/{index}", response_class=Response, responses=PNG_DOC,
                summary="One result image as a PNG with its parameters")
    async def image(job_id: str, index: int):
        result = _result_of(find(job_id))
        if not 0 <= index < len(result.images):
            raise RequestError(f"job {job_id} has images 0 to {len(result.images) - 1}, not {index}", status=404)
        data = png_bytes(result.images[index], result.parameters[index])
        return Response(data, media_type="image/png", headers={
            "Content-Disposition": f'attachment; filename="{result.seeds[index]}-{job_id[:8]}-{index}.png"'})

    @router.get("/jobs/{job_id}/result", response_model=JobResult,
                responses={404: {"description": "no such job"}, 409: {"description": "the job is not done"}},
                summary="All result images (base64 PNGs) and their parameters")
    async def result(job_id: str):
        result = _result_of(find(job_id))
        return {"images": [png_base64(im, p) for im, p in zip(result.images, result.parameters)],
                "infotexts": [format_parameters(p) for p in result.parameters],
                "parameters": result.parameters, "seeds": result.seeds}

    @router.get("/server", summary="The server: version, models, devices and their memory plans, queue, limits")
    async def server() -> dict[str, Any]:
        return {"version": __version__, "model": state.current_model, "models": state.models.names(),
                "workers": [{"device": _device(w), "model": w.model,
                             "plan": _plan(w.pipe), "job": w.job.id if w.job else None} for w in queue.workers],
                "queue": {"waiting": queue.waiting(), "running": len(queue.running())},
                "limits": vars(state.settings.limits)}

    return router


def _result_of(job: Job):
    if job.state != "done" or job.result is None:
        raise RequestError(f"job {job.id} is {job.state}{': ' + job.error if job.error else ''}; "
                           "results exist once it is done", status=409)
    return job.result


def _device(worker) -> str:
    """The device a worker's model is on (what "auto" chose), else what it was asked for."""
    if worker.pipe is not None:
        return str(next(worker.pipe.parts.unet.parameters()).device)
    return str(worker.device or "auto")


def _plan(pipe) -> dict[str, Any] | None:
    if pipe is None:
        return None
    plain = (bool, int, float, str, type(None))
    return {name: value if isinstance(value, plain) else str(value) for name, value in vars(pipe.plan).items()}


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _event_stream(job: Job, view, position) -> AsyncIterator[str]:
    """Events until the job ends. Each wake-up sends what changed since the last one; steps a
    slow reader missed are skipped (the latest step and preview are what matter)."""
    sent_state, sent_position, sent_step, sent_preview = None, None, -1, 0
    while True:
        version = job.version
        where = position(job)
        if job.state != sent_state or where != sent_position:
            sent_state, sent_position = job.state, where
            yield _sse("state", {"state": job.state, "position": where})
        if job.state == "running" and job.step != sent_step:
            sent_step = job.step
            data: dict[str, Any] = {"step": job.step, "total": job.total, "progress": job.progress(),
                                    "eta": job.eta()}
            preview = job.preview
            if preview is not None and job.preview_step != sent_preview:
                sent_preview = job.preview_step
                data["preview"] = "data:image/png;base64," + png_base64(preview)
            yield _sse("step", data)
        if job.is_finished:
            yield _sse(job.state, view(job))
            return
        if not await job.changed(version, QUEUED_POLL if job.state == "queued" else KEEPALIVE):
            if job.state != "queued":
                yield ": keep-alive\n\n"
        await asyncio.sleep(0)
