"""The state one Studio server shares between its routes: settings, folders, database, jobs, chat, auth."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from slimtune.studio.db import Store
from slimtune.studio.jobs import JobManager
from slimtune.studio.paths import DataDirs
from slimtune.studio.security import Auth, PasswordHash, RateLimiter, Sessions
from slimtune.studio.services.chat import ChatManager
from slimtune.studio.settings import StudioSettings, is_loopback


@dataclass
class Studio:
    """Everything a route needs; created once per app by :func:`slimtune.studio.app.create_app`."""

    settings: StudioSettings
    dirs: DataDirs
    store: Store
    jobs: JobManager
    chat: ChatManager
    auth: Auth
    shutting_down: threading.Event = field(default_factory=threading.Event)
    tiny_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, settings: StudioSettings) -> Studio:
        """Create the data folders and database, and hash the password.

        The clear-text password is dropped from the settings kept here: from now on ``auth.enabled``
        (not ``settings.auth_required``) says whether a login is needed.
        """
        dirs = DataDirs(settings.data_dir)
        dirs.create()
        store = Store(dirs.db)
        auth = Auth(
            password_hash=PasswordHash.create(settings.password) if settings.password is not None else None,
            sessions=Sessions(settings.session_ttl_s),
            limiter=RateLimiter(settings.login_attempts_per_minute),
        )
        settings = dataclasses.replace(settings, password=None)
        return cls(
            settings=settings, dirs=dirs, store=store,
            jobs=JobManager(store, stop_grace_s=settings.stop_grace_s),
            chat=ChatManager(settings.chat_command, dirs.logs / "chat.log"),
            auth=auth,
        )

    @property
    def loopback_only(self) -> bool:
        """True when the server listens on loopback only, so the Host header must name loopback too."""
        return is_loopback(self.settings.host)

    def close(self) -> None:
        """Stop workers and close the database (server shutdown)."""
        self.shutting_down.set()
        self.jobs.shutdown()
        self.chat.shutdown()
        self.store.close()


def get_studio(request: Request) -> Studio:
    """FastAPI dependency: the Studio attached to the running app."""
    return request.app.state.studio


StudioDep = Annotated[Studio, Depends(get_studio)]
"""Route parameter type that injects the Studio."""
