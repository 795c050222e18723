"""The two HTML pages: the single-page app and the login page (assets come from /static)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).resolve().parents[1] / "static"
# The app is a few static files; no-cache makes the browser revalidate so an upgrade shows at once.
_HEADERS = {"Cache-Control": "no-cache"}


@router.get("/")
def index() -> FileResponse:
    """The Studio app (the guard redirects to /login first when a session is needed)."""
    return FileResponse(STATIC / "index.html", headers=_HEADERS)


@router.get("/login")
def login_page() -> FileResponse:
    return FileResponse(STATIC / "login.html", headers=_HEADERS)
