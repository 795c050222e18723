"""Builds the Studio's FastAPI app: routers, static front end, error mapping and start/stop hooks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from slimtune.errors import SlimtuneError
from slimtune.studio.context import Studio
from slimtune.studio.library import LibraryUnavailable
from slimtune.studio.routes import ROUTERS
from slimtune.studio.security import Guard
from slimtune.studio.services import exports as exports_svc
from slimtune.studio.services import runs as runs_svc
from slimtune.studio.settings import StudioSettings

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("slimtune.studio")


def _recover(studio: Studio) -> None:
    """Mark jobs cut off by the last shutdown as interrupted, and queue again those that never started."""
    for table, job_id in studio.store.recover_after_restart():
        if table == "runs":
            runs_svc.requeue(studio, job_id)
        else:
            exports_svc.requeue(studio, job_id)


def create_app(settings: StudioSettings) -> FastAPI:
    """Create the Studio app for ``settings`` (the caller checks the bind address first).

    Example:
        >>> app = create_app(StudioSettings(data_dir=tmp_path))          # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8888)                 # doctest: +SKIP
    """
    studio = Studio.open(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _recover(studio)
        try:
            yield
        finally:
            studio.close()

    app = FastAPI(
        title="slimtune Studio",
        description="Local web app to fine-tune Gemma 4 with LoRA/QLoRA: data, training, live metrics, chat, "
                    "export. Every route but login needs a session cookie when the Studio has a password.",
        version="1",
        lifespan=lifespan,
    )
    app.state.studio = studio
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # No CORS middleware on purpose: the browser's same-origin policy stays closed.
    app.add_middleware(Guard, auth=studio.auth, upload_limit=settings.max_upload_bytes,
                       loopback_only=studio.loopback_only)

    @app.exception_handler(LibraryUnavailable)
    async def _unavailable(_: Request, exc: LibraryUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)})

    @app.exception_handler(SlimtuneError)
    async def _slimtune_error(_: Request, exc: SlimtuneError) -> JSONResponse:
        # The library's messages are written for users (what is wrong, what to do): show them as they are.
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    return app
