"""Training run routes: create (queues a ``slimtune train`` worker), list, get, stop, resume, delete."""

from __future__ import annotations

from fastapi import APIRouter, Response

from slimtune.studio.context import StudioDep
from slimtune.studio.schemas import Detail, RunInfo, TrainConfig
from slimtune.studio.services import runs as svc

router = APIRouter(prefix="/api/runs", tags=["runs"])
_ERRORS = {400: {"model": Detail}, 404: {"model": Detail}, 409: {"model": Detail}}


@router.get("", response_model=list[RunInfo])
def list_runs(studio: StudioDep) -> list[dict]:
    """Every run, newest first, with its status, queue place and latest loss."""
    return [svc.run_info(studio, r) for r in studio.store.list("runs")]


@router.post("", response_model=RunInfo, status_code=201, responses={**_ERRORS, 422: {"model": Detail}})
def create_run(cfg: TrainConfig, studio: StudioDep) -> dict:
    """Start a training run, or queue it behind the job using the GPU.

    Choosing the embedded tiny model builds it first if needed (a few seconds).
    """
    return svc.run_info(studio, svc.create_run(studio, cfg))


@router.get("/{run_id}", response_model=RunInfo, responses=_ERRORS)
def get_run(run_id: str, studio: StudioDep) -> dict:
    """One run."""
    return svc.run_info(studio, svc.get_run(studio, run_id))


@router.post("/{run_id}/stop", response_model=RunInfo, responses=_ERRORS)
def stop_run(run_id: str, studio: StudioDep) -> dict:
    """Stop a queued or running run; its worker's whole process group is terminated."""
    return svc.run_info(studio, svc.stop_run(studio, run_id))


@router.post("/{run_id}/resume", response_model=RunInfo, responses=_ERRORS)
def resume_run(run_id: str, studio: StudioDep) -> dict:
    """Queue a stopped, failed or interrupted run again with ``--resume`` (continues from its last checkpoint)."""
    return svc.run_info(studio, svc.resume_run(studio, run_id))


@router.delete("/{run_id}", status_code=204, responses=_ERRORS)
def delete_run(run_id: str, studio: StudioDep) -> Response:
    """Delete a finished run with its folder, log and exports."""
    svc.delete_run(studio, run_id)
    return Response(status_code=204)
