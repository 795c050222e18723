"""Export routes: formats, queue an export job, follow it, download the zipped result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import FileResponse

from slimtune.studio.context import StudioDep
from slimtune.studio.paths import resolve_inside
from slimtune.studio.schemas import Detail, ExportFormat, ExportInfo, ExportRequest, LogResponse
from slimtune.studio.services import exports as svc
from slimtune.studio.services.tails import tail_lines

router = APIRouter(prefix="/api/exports", tags=["export"])
_ERRORS = {400: {"model": Detail}, 404: {"model": Detail}, 409: {"model": Detail}}


@router.get("/formats", response_model=list[ExportFormat], responses={503: {"model": Detail}})
def list_formats() -> list[dict]:
    """The formats of ``slimtune.export.EXPORT_FORMATS``."""
    return svc.formats()


@router.get("", response_model=list[ExportInfo])
def list_exports(studio: StudioDep,
                 run_id: Annotated[str | None, Query(pattern=r"^[a-z0-9]{6,32}$")] = None) -> list[dict]:
    """Exports, newest first (optionally those of one run)."""
    rows = studio.store.list("exports", where={"run_id": run_id} if run_id else None)
    return [svc.export_info(studio, r) for r in rows]


@router.post("", response_model=ExportInfo, status_code=201, responses=_ERRORS)
def create_export(body: ExportRequest, studio: StudioDep) -> dict:
    """Queue an export of a trained run; it shares the GPU queue with training."""
    return svc.export_info(studio, svc.create_export(studio, body.run_id, body.format))


@router.get("/{export_id}", response_model=ExportInfo, responses=_ERRORS)
def get_export(export_id: str, studio: StudioDep) -> dict:
    return svc.export_info(studio, svc.get_export(studio, export_id))


@router.get("/{export_id}/logs", response_model=LogResponse, responses=_ERRORS)
def export_logs(export_id: str, studio: StudioDep,
                tail: Annotated[int, Query(ge=0, le=20_000)] = 200) -> LogResponse:
    """The export worker's output."""
    row = svc.get_export(studio, export_id)
    return LogResponse(lines=tail_lines(svc.paths(studio, row)["log"], tail))


@router.post("/{export_id}/stop", response_model=ExportInfo, responses=_ERRORS)
def stop_export(export_id: str, studio: StudioDep) -> dict:
    svc.stop_export(studio, export_id)
    return svc.export_info(studio, svc.get_export(studio, export_id))


@router.delete("/{export_id}", status_code=204, responses=_ERRORS)
def delete_export(export_id: str, studio: StudioDep) -> Response:
    svc.delete_export(studio, export_id)
    return Response(status_code=204)


@router.get("/{export_id}/download", response_class=FileResponse, responses=_ERRORS)
def download_export(export_id: str, studio: StudioDep) -> FileResponse:
    """The exported folder as a zip (ready once the export has completed)."""
    row = svc.get_export(studio, export_id)
    if not svc.export_info(studio, row)["download_ready"]:
        raise HTTPException(status_code=409, detail=f"The export is {row['status']}; nothing to download yet.")
    zip_path = svc.paths(studio, row)["zip"]
    path = resolve_inside(studio.dirs.exports, zip_path.relative_to(studio.dirs.exports))
    return FileResponse(path, media_type="application/zip", filename=path.name)
