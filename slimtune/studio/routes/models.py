"""Model picker routes: list, register (local folder or hub id), forget, build the tiny model."""

from __future__ import annotations

from fastapi import APIRouter, Response

from slimtune.studio.context import StudioDep
from slimtune.studio.schemas import Detail, ModelInfo, RegisterModelRequest
from slimtune.studio.services import models as svc

router = APIRouter(prefix="/api/models", tags=["models"])


@router.get("", response_model=list[ModelInfo])
def list_models(studio: StudioDep) -> list[dict]:
    """The embedded tiny model first, then registered local folders and hub ids."""
    return svc.list_models(studio)


@router.post("", response_model=ModelInfo, status_code=201, responses={400: {"model": Detail}})
def register_model(body: RegisterModelRequest, studio: StudioDep) -> dict:
    """Add a local model folder (absolute path with a config.json) or a hub id such as google/gemma-4-e2b-it."""
    return svc.register_model(studio, body.kind, body.ref, body.name)


@router.post("/{model_id}/prepare", response_model=ModelInfo, responses={500: {"model": Detail}})
def prepare_model(model_id: str, studio: StudioDep) -> dict:
    """Make a model ready to use: writes the embedded tiny model on first use (a few seconds)."""
    svc.model_ref(studio, model_id)
    return svc.get_model(studio, model_id)


@router.delete("/{model_id}", status_code=204, responses={404: {"model": Detail}})
def delete_model(model_id: str, studio: StudioDep) -> Response:
    """Remove a registered model from the picker; files on disk are not touched."""
    svc.delete_model(studio, model_id)
    return Response(status_code=204)
