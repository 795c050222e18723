"""Login, logout and session status (the only API routes reachable without a session)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response

from slimtune.studio.context import StudioDep
from slimtune.studio.schemas import AuthStatus, Detail, LoginRequest, StudioInfo
from slimtune.studio.security import SESSION_COOKIE

router = APIRouter(prefix="/api", tags=["auth"])


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get("/auth/status", response_model=AuthStatus)
def auth_status(request: Request, studio: StudioDep) -> AuthStatus:
    """Whether a password is set and whether this browser is logged in."""
    token = request.cookies.get(SESSION_COOKIE)
    return AuthStatus(auth_required=studio.auth.enabled,
                      authenticated=not studio.auth.enabled or studio.auth.sessions.valid(token))


@router.post("/auth/login", response_model=AuthStatus,
             responses={401: {"model": Detail}, 429: {"model": Detail}})
def login(body: LoginRequest, request: Request, response: Response,
          studio: StudioDep) -> AuthStatus:
    """Check the password and set an HttpOnly, SameSite=Strict session cookie.

    Attempts are limited per client address (default 5 per minute, then HTTP 429 with Retry-After).
    Sync route on purpose: scrypt takes tens of milliseconds and must not block the event loop.
    """
    if not studio.auth.enabled:
        return AuthStatus(auth_required=False, authenticated=True)
    allowed, retry_after = studio.auth.limiter.allow(_client(request))
    if not allowed:
        raise HTTPException(status_code=429, detail=f"Too many login attempts; try again in {retry_after} s.",
                            headers={"Retry-After": str(retry_after)})
    assert studio.auth.password_hash is not None
    if not studio.auth.password_hash.verify(body.password):
        raise HTTPException(status_code=401, detail="Wrong password.")
    token = studio.auth.sessions.create()
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", path="/",
                        max_age=studio.settings.session_ttl_s)
    return AuthStatus(auth_required=True, authenticated=True)


@router.post("/auth/logout", response_model=AuthStatus)
def logout(request: Request, response: Response, studio: StudioDep) -> AuthStatus:
    """End this browser's session."""
    studio.auth.sessions.revoke(request.cookies.get(SESSION_COOKIE))
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return AuthStatus(auth_required=studio.auth.enabled, authenticated=not studio.auth.enabled)


@router.get("/info", response_model=StudioInfo, tags=["system"])
def info(studio: StudioDep) -> StudioInfo:
    """Server settings the UI needs and the job holding the GPU."""
    running = studio.jobs.running()
    return StudioInfo(auth_required=studio.auth.enabled, max_upload_mb=studio.settings.max_upload_mb,
                      running="/".join(running) if running else None)
