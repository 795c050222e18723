"""Run artifacts: list a run's files, download one, or download the adapter as a zip."""

from __future__ import annotations

import os

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from slimtune.studio.context import StudioDep
from slimtune.studio.paths import resolve_inside, slug
from slimtune.studio.schemas import ArtifactFile, Detail
from slimtune.studio.services import runs as runs_svc
from slimtune.studio.services.archive import cached_zip

router = APIRouter(prefix="/api/runs", tags=["artifacts"])
_ERRORS = {400: {"model": Detail}, 404: {"model": Detail}}
MAX_LISTED = 2000


@router.get("/{run_id}/artifacts", response_model=list[ArtifactFile], responses=_ERRORS)
def list_artifacts(run_id: str, studio: StudioDep) -> list[ArtifactFile]:
    """Files in the run folder (config.yaml, metrics.jsonl, adapter/…, checkpoints), up to 2,000."""
    runs_svc.get_run(studio, run_id)
    folder = runs_svc.run_dir(studio, run_id)
    if folder.is_symlink() or not folder.is_dir():
        return []
    out: list[ArtifactFile] = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue  # links are neither listed nor served
            out.append(ArtifactFile(path=os.path.relpath(path, folder), size_bytes=os.path.getsize(path)))
            if len(out) >= MAX_LISTED:
                return out
    return out


@router.get("/{run_id}/files/{file_path:path}", response_class=FileResponse, responses=_ERRORS)
def download_file(run_id: str, file_path: str, studio: StudioDep) -> FileResponse:
    """One file of the run folder. Paths that leave the folder (``..``, absolute, symlinks out) get 400."""
    runs_svc.get_run(studio, run_id)
    path = resolve_inside(runs_svc.run_dir(studio, run_id), file_path)
    if not path.is_file():
        raise HTTPException(status_code=404, detail="Not a file.")
    return FileResponse(path, filename=path.name)


@router.get("/{run_id}/adapter.zip", response_class=FileResponse, responses=_ERRORS)
def download_adapter(run_id: str, studio: StudioDep) -> FileResponse:
    """The trained LoRA adapter (PEFT format) as a zip, built once and cached."""
    row = runs_svc.get_run(studio, run_id)
    adapter = resolve_inside(studio.dirs.runs, run_id, "adapter", must_exist=False)
    if not adapter.is_dir():
        raise HTTPException(status_code=404, detail="This run has no adapter yet (it is written when training ends).")
    dest = studio.dirs.cache / f"run-{run_id}-adapter.zip"
    name = f"{slug(row['name'], run_id)}-adapter"
    zip_path = cached_zip(adapter, dest, root=studio.dirs.root, arc_prefix=name)
    return FileResponse(zip_path, media_type="application/zip", filename=f"{name}.zip")
