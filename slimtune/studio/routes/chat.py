"""Chat routes: stream one side (base or adapter) of a run's model, worker status, unload."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse

from slimtune.studio.context import StudioDep
from slimtune.studio.schemas import ChatRequest, ChatStatus, Detail, TrainConfig
from slimtune.studio.services import runs as runs_svc
from slimtune.studio.services.events import sse

router = APIRouter(prefix="/api/chat", tags=["chat"])
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/stream", responses={200: {"content": {"text/event-stream": {}}}, 404: {"model": Detail},
                                   409: {"model": Detail}})
def chat_stream(body: ChatRequest, studio: StudioDep) -> StreamingResponse:
    """Generate a reply with the run's base model or with its adapter, streamed as server-sent events.

    Events: ``status`` (e.g. loading the model), ``token`` (a piece of text), ``done`` or ``error``.
    Generation runs in the chat worker process; the browser asks once per side and shows both.
    Closing the connection cancels the generation.
    """
    row = runs_svc.get_run(studio, body.run_id)
    adapter = runs_svc.adapter_dir(studio, body.run_id)
    if body.side == "adapter" and not adapter.is_dir():
        raise HTTPException(status_code=409, detail="This run has no adapter yet; chat with the base model, "
                                                    "or wait until training has finished.")
    cfg = TrainConfig.model_validate_json(row["config_json"])
    request = {
        "load": {"model": row["model_ref"], "adapter": str(adapter) if adapter.is_dir() else None,
                 "load_in_4bit": cfg.load_in_4bit},
        "side": body.side,
        "messages": [m.model_dump() for m in body.messages],
        "params": body.params.model_dump(),
    }

    async def frames() -> AsyncIterator[str]:
        async for message in studio.chat.stream(request):
            kind = message.pop("type", "status")
            message.pop("id", None)
            yield sse(kind, message)

    return StreamingResponse(frames(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/status", response_model=ChatStatus)
def chat_status(studio: StudioDep) -> ChatStatus:
    """What the chat worker has loaded, and whether it is answering."""
    return ChatStatus(loaded=studio.chat.loaded, busy=studio.chat.busy)


@router.post("/unload", response_model=ChatStatus)
def chat_unload(studio: StudioDep) -> ChatStatus:
    """Stop the chat worker to free the memory its models hold (e.g. before training a large model)."""
    studio.chat.unload()
    return ChatStatus(loaded=None, busy=False)
