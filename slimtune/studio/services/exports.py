"""Exports: one background worker job per request (``slimtune.export.export``), zipped for download."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from slimtune.studio import library
from slimtune.studio.context import Studio
from slimtune.studio.db import ACTIVE_STATES, COMPLETED, QUEUED
from slimtune.studio.jobs import Job, JobResult
from slimtune.studio.paths import check_id, new_id, slug
from slimtune.studio.services import runs as runs_svc
from slimtune.studio.services.archive import zip_folder


def formats() -> list[dict[str, str]]:
    """The formats ``slimtune.export`` offers."""
    return library.export_formats()


def get_export(studio: Studio, export_id: str) -> dict[str, Any]:
    row = studio.store.get("exports", check_id(export_id, "export id"))
    if row is None:
        raise HTTPException(status_code=404, detail=f"No export with id {export_id}.")
    return row


def _folder(studio: Studio, export_id: str) -> Path:
    # Like runs, export paths come from the id (and format), not from stored strings.
    return studio.dirs.exports / export_id


def paths(studio: Studio, row: dict[str, Any]) -> dict[str, Path]:
    """``out`` (what the export writes), ``zip`` (what is downloaded) and ``log`` of one export."""
    folder = _folder(studio, row["id"])
    return {"out": folder / "out", "zip": folder / f"{row['run_id']}-{slug(row['format'], 'export')}.zip",
            "log": folder / "export.log"}


def export_info(studio: Studio, row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "queue_position": studio.jobs.queue_position("exports", row["id"]),
            "download_ready": row["status"] == COMPLETED and paths(studio, row)["zip"].is_file()}


def _job(studio: Studio, row: dict[str, Any]) -> Job:
    export_id = row["id"]
    p = paths(studio, row)
    out_dir, zip_path = p["out"], p["zip"]

    def finalize(result: JobResult) -> JobResult:
        # Runs in the job's watcher thread, never on the event loop.
        if not out_dir.exists():
            return JobResult("failed", result.exit_code, "The export finished but wrote nothing.")
        zip_folder(out_dir, zip_path, root=studio.dirs.root, arc_prefix=zip_path.stem)
        studio.store.update("exports", export_id, zip_path=str(zip_path))
        return result

    argv = [*studio.settings.export_command, row["source_dir"], row["format"], str(out_dir)]
    return Job(table="exports", id=export_id, argv=argv, log_path=p["log"], finalize=finalize)


def _row_with_source(studio: Studio, row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "source_dir": str(runs_svc.run_dir(studio, row["run_id"]))}


def create_export(studio: Studio, run_id: str, fmt: str) -> dict[str, Any]:
    """Queue an export of a finished run in one of ``EXPORT_FORMATS``."""
    run = runs_svc.get_run(studio, run_id)
    names = [f["name"] for f in formats()]
    if fmt not in names:
        raise HTTPException(status_code=400, detail=f"Unknown export format {fmt!r}; choose one of {', '.join(names)}.")
    if not runs_svc.adapter_dir(studio, run_id).is_dir():
        raise HTTPException(status_code=409, detail=f"Run {run['name']} has no adapter yet; export it once it "
                                                    f"has finished training.")
    export_id = new_id()
    folder = _folder(studio, export_id)
    folder.mkdir(parents=True)
    row = {"id": export_id, "run_id": run_id, "format": fmt, "status": QUEUED, "out_dir": str(folder / "out"),
           "log_path": str(folder / "export.log"), "created_at": time.time()}
    studio.store.insert("exports", row)
    studio.jobs.submit(_job(studio, _row_with_source(studio, row)))
    return get_export(studio, export_id)


def requeue(studio: Studio, export_id: str) -> None:
    """Queue an export that was still waiting when the server last stopped."""
    studio.jobs.submit(_job(studio, _row_with_source(studio, get_export(studio, export_id))))


def stop_export(studio: Studio, export_id: str) -> None:
    row = get_export(studio, export_id)
    if not studio.jobs.stop("exports", export_id):
        raise HTTPException(status_code=409, detail=f"The export is {row['status']}, not queued or running.")


def delete_export(studio: Studio, export_id: str) -> None:
    row = get_export(studio, export_id)
    if row["status"] in ACTIVE_STATES:
        raise HTTPException(status_code=409, detail="Stop the export before deleting it.")
    folder = _folder(studio, export_id)
    if folder.is_symlink():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)
    studio.store.delete("exports", export_id)


def delete_exports_of_run(studio: Studio, run_id: str) -> None:
    """Remove a run's exports (used when the run is deleted). Raises 409 while one is active."""
    rows = studio.store.list("exports", where={"run_id": run_id})
    if any(r["status"] in ACTIVE_STATES for r in rows):
        raise HTTPException(status_code=409, detail="An export of this run is still queued or running.")
    for r in rows:
        delete_export(studio, r["id"])
