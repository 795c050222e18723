"""Fixtures for Studio tests: settings wired to fake workers, and in-process clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the Studio needs fastapi (scripts/ci_studio_deps.sh installs it)")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient
from studio_testkit import BASE_URL, PASSWORD, fake_settings, load_fake_library

from slimtune.studio.app import create_app


@pytest.fixture
def fake_lib(monkeypatch):
    """The in-process library calls (summary, memory estimate, export formats) replaced by fakes."""
    fake = load_fake_library()
    fake.install(monkeypatch)
    return fake


@pytest.fixture
def client(tmp_path, fake_lib) -> Iterator[TestClient]:
    """A Studio without a password, on fake workers."""
    app = create_app(fake_settings(tmp_path / "data"))
    with TestClient(app, base_url=BASE_URL) as c:
        yield c


@pytest.fixture
def auth_client(tmp_path, fake_lib) -> Iterator[TestClient]:
    """A password-protected Studio (not logged in yet)."""
    app = create_app(fake_settings(tmp_path / "data", password=PASSWORD))
    with TestClient(app, base_url=BASE_URL) as c:
        yield c
