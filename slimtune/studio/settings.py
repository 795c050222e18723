"""Settings of one Studio server and the rule that decides whether it may listen where it was asked to."""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8888
DEFAULT_DATA_DIR = Path("~/.slimtune/studio")
DEFAULT_MAX_UPLOAD_MB = 512
PASSWORD_ENV = "SLIMTUNE_STUDIO_PASSWORD"


def _default_train_command() -> list[str]:
    return [sys.executable, "-m", "slimtune", "train"]


def _default_export_command() -> list[str]:
    return [sys.executable, "-m", "slimtune.studio.workers.export"]


def _default_chat_command() -> list[str]:
    return [sys.executable, "-m", "slimtune.studio.workers.chat"]


def _default_tiny_command() -> list[str]:
    return [sys.executable, "-m", "slimtune.studio.workers.tiny"]


@dataclass
class StudioSettings:
    """Everything one Studio server needs to know; built by the CLI or by tests.

    The worker commands are argv prefixes. Tests swap them for small fake scripts so the job
    lifecycle can be exercised in milliseconds without loading a model.
    """

    host: str = DEFAULT_HOST
    """Address to listen on; anything but loopback needs a password."""
    port: int = DEFAULT_PORT
    """TCP port to listen on."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Folder that holds the database, uploads, runs, exports and logs; routes never leave it."""
    password: str | None = field(default=None, repr=False)
    """Plain password from the CLI or environment; hashed at start-up and never logged (repr=False)."""
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    """Largest dataset upload accepted, in MiB; bigger uploads get HTTP 413."""
    train_command: list[str] = field(default_factory=_default_train_command)
    """argv prefix of the training worker; the run's flags are appended."""
    export_command: list[str] = field(default_factory=_default_export_command)
    """argv prefix of the export worker: ``RUN_DIR FORMAT OUT_DIR`` are appended."""
    chat_command: list[str] = field(default_factory=_default_chat_command)
    """argv of the long-lived chat worker that speaks JSON lines on stdin/stdout."""
    tiny_command: list[str] = field(default_factory=_default_tiny_command)
    """argv prefix that writes the embedded tiny model; the output folder is appended."""
    stop_grace_s: float = 10.0
    """Seconds a worker gets after SIGTERM before SIGKILL."""
    session_ttl_s: int = 12 * 3600
    """How long a login session stays valid."""
    login_attempts_per_minute: int = 5
    """Login attempts one client may make per minute before getting HTTP 429."""

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        problems = []
        if not 0 < self.port < 65536:
            problems.append(f"port must be between 1 and 65535, got {self.port}")
        if self.max_upload_mb <= 0:
            problems.append(f"max_upload_mb must be positive, got {self.max_upload_mb}")
        if self.password is not None and len(self.password) == 0:
            problems.append("password must not be empty; leave it unset to run without one on 127.0.0.1")
        if problems:
            raise ConfigError("Invalid Studio settings: " + "; ".join(problems))

    @property
    def max_upload_bytes(self) -> int:
        """Upload cap in bytes."""
        return self.max_upload_mb * 1024 * 1024

    @property
    def auth_required(self) -> bool:
        """True when a password was given, so every route but login needs a session."""
        return self.password is not None


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A host name other than localhost may resolve to anything: treat it as public.
        return False


def check_bind(settings: StudioSettings) -> None:
    """Refuse to listen on a non-loopback address without a password.

    Raises:
        ConfigError: the host is reachable from other machines and no password was set.
    """
    if not is_loopback(settings.host) and not settings.auth_required:
        raise ConfigError(
            f"Refusing to listen on {settings.host}:{settings.port} without a password: anyone on the network "
            f"could start jobs and read your data. Pass --password (or set {PASSWORD_ENV}), "
            f"or listen on 127.0.0.1 (the default)."
        )
