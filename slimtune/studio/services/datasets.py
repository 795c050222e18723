"""Datasets: size-capped uploads stored under sanitised names, the bundled sample, and previews."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from slimtune.errors import DataError
from slimtune.studio import library
from slimtune.studio.context import Studio
from slimtune.studio.paths import check_id, new_id, resolve_inside, sanitize_filename


def list_datasets(studio: Studio) -> list[dict[str, Any]]:
    return studio.store.list("datasets")


def get_dataset(studio: Studio, dataset_id: str) -> dict[str, Any]:
    """One dataset record. Raises HTTPException 400/404."""
    row = studio.store.get("datasets", check_id(dataset_id, "dataset id"))
    if row is None:
        raise HTTPException(status_code=404, detail=f"No dataset with id {dataset_id}.")
    return row


def dataset_path(studio: Studio, row: dict[str, Any]) -> Path:
    """The stored file, checked to resolve inside the datasets folder (a symlink out is refused)."""
    path = resolve_inside(studio.dirs.datasets, row["filename"])
    if not path.is_file():
        raise HTTPException(status_code=404, detail="The dataset file is missing.")
    return path


async def save_upload(studio: Studio, filename: str, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
    """Stream an upload to disk, stopping with HTTP 413 as soon as it passes the size cap.

    The bytes go to a temporary file first and are moved into place only when complete, so a
    rejected or broken upload leaves nothing behind.
    """
    safe = sanitize_filename(filename)
    ds_id = new_id()
    stored = f"{ds_id}-{safe}"
    cap = studio.settings.max_upload_bytes
    tmp = studio.dirs.incoming / f"{ds_id}.part"
    size = 0
    # Disk writes run in worker threads so a slow disk never stalls the event loop (and other streams).
    out = await asyncio.to_thread(open, tmp, "xb")
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > cap:
                raise HTTPException(
                    status_code=413,
                    detail=f"Upload too large: the limit is {studio.settings.max_upload_mb} MiB "
                           f"(start the Studio with a larger --max-upload-mb to raise it).",
                )
            await asyncio.to_thread(out.write, chunk)
        await asyncio.to_thread(out.close)
        if size == 0:
            raise HTTPException(status_code=400, detail="The uploaded file is empty.")
        os.replace(tmp, studio.dirs.datasets / stored)
    finally:
        out.close()
        tmp.unlink(missing_ok=True)
    row = {"id": ds_id, "name": safe, "filename": stored, "size_bytes": size, "created_at": time.time()}
    return studio.store.insert("datasets", row)


def add_sample(studio: Studio) -> dict[str, Any]:
    """Copy the bundled sample dataset into the data directory (so every dataset lives there)."""
    src = library.bundled_dataset()
    ds_id = new_id()
    stored = f"{ds_id}-{src.name}"
    shutil.copyfile(src, studio.dirs.datasets / stored)
    row = {"id": ds_id, "name": f"{src.name} (sample)", "filename": stored,
           "size_bytes": src.stat().st_size, "created_at": time.time()}
    return studio.store.insert("datasets", row)


def preview(studio: Studio, dataset_id: str, n_preview: int) -> dict[str, Any]:
    """Format, columns, counts, skipped rows and the first rows, from ``slimtune.data.summarize_dataset``.

    Raises:
        HTTPException: 422 with the library's message when the file is unusable.
    """
    row = get_dataset(studio, dataset_id)
    path = dataset_path(studio, row)
    try:
        summary = library.summarize_dataset(path, n_preview=n_preview)
    except DataError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return {"dataset": row, **summary}


def delete_dataset(studio: Studio, dataset_id: str) -> None:
    row = get_dataset(studio, dataset_id)
    in_use = [r["id"] for r in studio.store.list("runs", where={"dataset_id": dataset_id})
              if r["status"] in ("queued", "running")]
    if in_use:
        raise HTTPException(status_code=409, detail=f"Dataset is used by active run(s): {', '.join(in_use)}.")
    # The stored name was made by save_upload/add_sample (flat, sanitised); unlink the entry itself,
    # not what a symlink might point to.
    (studio.dirs.datasets / row["filename"]).unlink(missing_ok=True)
    studio.store.delete("datasets", dataset_id)
