"""Password check, login sessions, login rate limit, and the ASGI guard in front of every request.

The guard enforces, in order: request-body size caps (HTTP 413), the Host header on loopback binds
(stops DNS-rebinding pages from talking to the Studio), same-origin for state-changing requests (no CORS,
no cross-site form posts), and a valid session cookie when a password is set (HTTP 401, or a redirect to
the login page for browser navigation). Passwords and session tokens are never logged or stored in clear.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slimtune.studio.settings import is_loopback

SESSION_COOKIE = "slimtune_session"
JSON_BODY_LIMIT = 2 * 1024 * 1024
UPLOAD_PATH = "/api/datasets/upload"
# Reachable without a session: the login page, what it loads, and the login API itself.
PUBLIC_PATHS = frozenset({
    "/login", "/api/auth/login", "/api/auth/status", "/static/login.js", "/static/css/studio.css",
    "/static/favicon.svg",
})
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The app loads only its own files; no framing (clickjacking), no MIME sniffing, no referrer leaks.
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", (b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                  b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'")),
]
# FastAPI's interactive docs load Swagger UI / ReDoc from a CDN, so they get every header but the CSP.
_CDN_PAGES = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})


@dataclass(frozen=True)
class PasswordHash:
    """A salted scrypt hash of the Studio password; the clear password is dropped after hashing."""

    salt: bytes
    digest: bytes
    n: int = 2**14
    r: int = 8
    p: int = 1

    @classmethod
    def create(cls, password: str) -> PasswordHash:
        salt = secrets.token_bytes(16)
        return cls(salt, cls._kdf(password, salt, 2**14, 8, 1))

    @staticmethod
    def _kdf(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
        return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)

    def verify(self, password: str) -> bool:
        """Constant-time comparison of the candidate's hash with the stored one."""
        return hmac.compare_digest(self._kdf(password, self.salt, self.n, self.r, self.p), self.digest)

    def __repr__(self) -> str:  # keep hashes out of tracebacks and logs too
        return "PasswordHash(<hidden>)"


class Sessions:
    """In-memory login sessions keyed by the SHA-256 of their token (a restart logs everyone out)."""

    def __init__(self, ttl_s: int) -> None:
        self._ttl = ttl_s
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def create(self) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._expiry[self._key(token)] = time.time() + self._ttl
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        key = self._key(token)
        with self._lock:
            exp = self._expiry.get(key)
            if exp is None:
                return False
            if exp < time.time():
                del self._expiry[key]
                return False
        return True

    def revoke(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._expiry.pop(self._key(token), None)


class RateLimiter:
    """At most ``limit`` events per ``window_s`` seconds for each key (the client's address)."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self._limit, self._window = limit, window_s
        self._hits: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, int]:
        """Record an attempt. Returns (allowed, seconds until the next attempt would be allowed)."""
        now = time.monotonic()
        with self._lock:
            hits = self._hits[key]
            while hits and hits[0] <= now - self._window:
                hits.popleft()
            if len(hits) >= self._limit:
                return False, max(1, int(hits[0] + self._window - now) + 1)
            hits.append(now)
            return True, 0


@dataclass
class Auth:
    """The Studio's authentication state: the password hash (None = open), sessions and the limiter."""

    password_hash: PasswordHash | None
    sessions: Sessions
    limiter: RateLimiter
    enabled: bool = field(init=False)

    def __post_init__(self) -> None:
        self.enabled = self.password_hash is not None

    def request_ok(self, scope: Scope) -> bool:
        """True when no password is set or the request carries a valid session cookie."""
        return not self.enabled or self.sessions.valid(cookie_from_scope(scope, SESSION_COOKIE))


def cookie_from_scope(scope: Scope, name: str) -> str | None:
    """Read one cookie from raw ASGI headers (the guard runs before Starlette parses a Request)."""
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    return v
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class BodyTooLarge(Exception):
    """Raised from the wrapped ``receive`` when a body grows past its cap."""


class Guard:
    """Pure ASGI middleware (not BaseHTTPMiddleware) so streaming responses pass straight through."""

    def __init__(self, app: ASGIApp, *, auth: Auth, upload_limit: int, loopback_only: bool) -> None:
        self.app, self.auth, self.upload_limit, self.loopback_only = app, auth, upload_limit, loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        host = _header(scope, b"host") or ""
        if self.loopback_only and not is_loopback(_host_name(host)):
            await _json(send, 400, "This Studio only answers requests addressed to localhost/127.0.0.1.")
            return
        origin = _header(scope, b"origin")
        if method in _UNSAFE_METHODS and origin is not None and urlsplit(origin).netloc != host:
            await _json(send, 403, "Cross-origin requests are not allowed.")
            return
        if path not in PUBLIC_PATHS and not self.auth.request_ok(scope):
            if path != "/" or method != "GET":
                await _json(send, 401, "Log in first: this Studio is password-protected.")
            else:  # the app's page: send the browser to the login page instead
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", b"/login"), (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
            return
        # The upload route enforces its own cap while streaming; the slack lets it answer first.
        limit = self.upload_limit + 65536 if path == UPLOAD_PATH else JSON_BODY_LIMIT
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _json(send, 413, _too_large(path, self.upload_limit))
            return
        await self._call_capped(scope, receive, send, limit)

    async def _call_capped(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        headers = _SECURITY_HEADERS if scope["path"] not in _CDN_PAGES else _SECURITY_HEADERS[:-1]
        if scope["path"].startswith("/static/"):
            # Revalidate (cheap, ETag) so an upgraded Studio never runs a stale mix of modules.
            headers = [*headers, (b"cache-control", b"no-cache")]

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _json(send, 413, _too_large(scope["path"], self.upload_limit))


def _too_large(path: str, upload_limit: int) -> str:
    if path == UPLOAD_PATH:
        return f"Upload too large: the limit is {upload_limit // (1024 * 1024)} MiB (see --max-upload-mb)."
    return f"Request body too large: the limit is {JSON_BODY_LIMIT // (1024 * 1024)} MiB."


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
