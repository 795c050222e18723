"""Shared helpers for the Studio tests (a plain module: tests/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from slimtune.studio.settings import StudioSettings

HERE = Path(__file__).resolve().parent
FAKES = HERE / "fakes"
REPO = HERE.parents[1]
PASSWORD = "correct horse battery staple"
BASE_URL = "http://127.0.0.1:8888"


def fake_settings(data_dir: Path, **overrides) -> StudioSettings:
    """Settings whose workers are the fast fake scripts in tests/studio/fakes."""
    kw = {
        "data_dir": data_dir,
        "train_command": [sys.executable, str(FAKES / "fake_train.py")],
        "export_command": [sys.executable, str(FAKES / "fake_export.py")],
        "chat_command": [sys.executable, str(FAKES / "fake_chat.py")],
        "tiny_command": [sys.executable, str(FAKES / "fake_tiny.py")],
        "stop_grace_s": 2.0,
    }
    kw.update(overrides)
    return StudioSettings(**kw)


def load_fake_library():
    """Import fakes/fake_library.py under a unique module name."""
    spec = importlib.util.spec_from_file_location("studio_fake_library", FAKES / "fake_library.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def studio_of(client):
    """The Studio object behind a TestClient's app."""
    return client.app.state.studio


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have(module: str, attr: str | None = None) -> bool:
    """True when a slimtune piece is importable (e2e tests use the real one then, a fake otherwise)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return False
    return attr is None or hasattr(mod, attr)


class LiveServer:
    """The real Studio server (uvicorn over real HTTP) in a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, *, password: str | None = None, fake: tuple[str, ...] = (),
                 fake_library: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(HERE / "serve_for_tests.py"), "--port", str(self.port), "--data-dir", str(data_dir)]
        if password:
            cmd += ["--password", password]
        if fake:
            cmd += ["--fake", ",".join(fake)]
        if fake_library:
            cmd += ["--fake-library", ",".join(fake_library)]
        self.log_path = log_path or (data_dir.parent / "server.log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        import subprocess

        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/auth/status", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> LiveServer:  # noqa: PYI034 - a plain class, no subclasses
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
