"""Live run data: metrics as JSON, log lines, and an SSE stream of both plus status changes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from slimtune.studio.context import StudioDep
from slimtune.studio.schemas import Detail, LogResponse, MetricsResponse
from slimtune.studio.services import runs as runs_svc
from slimtune.studio.services.events import run_events
from slimtune.studio.services.tails import read_metrics, tail_lines

router = APIRouter(prefix="/api/runs", tags=["metrics"])
_ERRORS = {400: {"model": Detail}, 404: {"model": Detail}}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/{run_id}/metrics", response_model=MetricsResponse, responses=_ERRORS)
def get_metrics(run_id: str, studio: StudioDep,
                offset: Annotated[int, Query(ge=0, description="From a previous answer's offset.")] = 0,
                ) -> MetricsResponse:
    """Step records and events from the run's metrics.jsonl (all, or those after ``offset``)."""
    runs_svc.get_run(studio, run_id)
    metrics, events, new_offset = read_metrics(runs_svc.run_dir(studio, run_id) / "metrics.jsonl", offset)
    return MetricsResponse(metrics=metrics, events=events, offset=new_offset)


@router.get("/{run_id}/logs", response_model=LogResponse, responses=_ERRORS)
def get_logs(run_id: str, studio: StudioDep, tail: Annotated[int, Query(ge=0, le=20_000)] = 500) -> LogResponse:
    """The last ``tail`` lines of the worker's stdout/stderr."""
    runs_svc.get_run(studio, run_id)
    return LogResponse(lines=tail_lines(runs_svc.log_path(studio, run_id), tail))


@router.get("/{run_id}/events", responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}})
def stream_events(run_id: str, studio: StudioDep) -> StreamingResponse:
    """Server-sent events: ``metrics``, ``events``, ``log``, ``status`` and a final ``end``.

    Every existing metric is sent first, so a (re)connecting client gets the whole curve.
    """
    runs_svc.get_run(studio, run_id)  # 404 before the stream starts
    return StreamingResponse(run_events(studio, run_id), media_type="text/event-stream", headers=SSE_HEADERS)
