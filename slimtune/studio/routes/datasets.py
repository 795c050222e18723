"""Dataset routes: streamed, size-capped upload; the bundled sample; preview; delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from slimtune.studio.context import StudioDep
from slimtune.studio.schemas import DatasetInfo, DatasetPreview, Detail
from slimtune.studio.services import datasets as svc

router = APIRouter(prefix="/api/datasets", tags=["datasets"])


@router.get("", response_model=list[DatasetInfo])
def list_datasets(studio: StudioDep) -> list[dict]:
    """Uploaded datasets, newest first."""
    return svc.list_datasets(studio)


@router.post(
    "/upload", response_model=DatasetInfo, status_code=201,
    responses={400: {"model": Detail}, 413: {"model": Detail}},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def upload_dataset(
    request: Request,
    filename: Annotated[str, Query(min_length=1, max_length=255, description="Original file name; it is sanitised.")],
    studio: StudioDep,
) -> dict:
    """Upload a dataset file as the raw request body (.jsonl, .json, .csv, .tsv, .parquet, .txt).

    The body is streamed to disk and the upload stops with HTTP 413 as soon as it passes
    ``--max-upload-mb``; nothing is kept from a rejected upload.
    """
    return await svc.save_upload(studio, filename, request.stream())


@router.post("/sample", response_model=DatasetInfo, status_code=201, responses={503: {"model": Detail}})
def add_sample(studio: StudioDep) -> dict:
    """Add slimtune's bundled sample dataset (one click, no upload)."""
    return svc.add_sample(studio)


@router.get("/{dataset_id}/preview", response_model=DatasetPreview,
            responses={404: {"model": Detail}, 422: {"model": Detail}})
def preview_dataset(dataset_id: str, studio: StudioDep, n: Annotated[int, Query(ge=0, le=50)] = 5) -> dict:
    """Detected format, columns, row counts, skipped rows with reasons, and the first ``n`` normalised rows."""
    return svc.preview(studio, dataset_id, n)


@router.delete("/{dataset_id}", status_code=204, responses={404: {"model": Detail}, 409: {"model": Detail}})
def delete_dataset(dataset_id: str, studio: StudioDep) -> Response:
    """Delete a dataset file (refused while a queued or running run uses it)."""
    svc.delete_dataset(studio, dataset_id)
    return Response(status_code=204)
