"""Auth, sessions, rate limits, Host/Origin checks, and the refusal to listen publicly without a password."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from studio_testkit import BASE_URL, PASSWORD, REPO, fake_settings

from slimtune.errors import ConfigError
from slimtune.studio.app import create_app
from slimtune.studio.security import SESSION_COOKIE, PasswordHash, RateLimiter
from slimtune.studio.settings import StudioSettings, check_bind, is_loopback


def login(c: TestClient, password: str = PASSWORD):
    return c.post("/api/auth/login", json={"password": password})


def test_every_route_needs_a_session(auth_client):
    for method, path in [("GET", "/api/runs"), ("GET", "/api/models"), ("POST", "/api/datasets/sample"),
                         ("GET", "/api/info"), ("GET", "/openapi.json"), ("GET", "/docs"),
                         ("GET", "/static/js/main.js"), ("POST", "/api/chat/unload"),
                         ("GET", "/api/runs/abcdef123456/events")]:
        r = auth_client.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code)
    r = auth_client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"


def test_login_page_and_its_assets_are_public(auth_client):
    for path in ["/login", "/static/login.js", "/static/css/studio.css", "/api/auth/status"]:
        assert auth_client.get(path).status_code == 200, path
    assert auth_client.get("/api/auth/status").json() == {"auth_required": True, "authenticated": False}


def test_login_sets_a_strict_httponly_cookie_and_unlocks_the_api(auth_client):
    r = login(auth_client)
    assert r.status_code == 200
    cookie = r.headers["set-cookie"].lower()
    assert f"{SESSION_COOKIE}=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    assert auth_client.get("/api/runs").status_code == 200
    assert auth_client.get("/").status_code == 200
    assert auth_client.post("/api/auth/logout").status_code == 200
    assert auth_client.get("/api/runs").status_code == 401


def test_wrong_password_and_forged_cookie_are_refused(auth_client):
    assert login(auth_client, "nope").status_code == 401
    auth_client.cookies.set(SESSION_COOKIE, "forged-token")
    assert auth_client.get("/api/runs").status_code == 401


def test_login_attempts_are_rate_limited(auth_client):
    codes = [login(auth_client, "wrong").status_code for _ in range(5)]
    assert codes == [401] * 5
    r = login(auth_client)  # even the right password waits once the limit is reached
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_rate_limiter_window():
    rl = RateLimiter(2, window_s=60)
    assert rl.allow("a")[0] and rl.allow("a")[0]
    assert not rl.allow("a")[0]
    assert rl.allow("b")[0]  # per client


def test_password_is_hashed_with_salt_and_never_kept_in_clear(tmp_path, fake_lib, capsys):
    app = create_app(fake_settings(tmp_path, password=PASSWORD))
    studio = studio_of_app(app)
    assert studio.settings.password is None
    ph = studio.auth.password_hash
    assert ph.verify(PASSWORD) and not ph.verify(PASSWORD + "x")
    assert PasswordHash.create(PASSWORD).salt != ph.salt
    assert PASSWORD not in repr(studio.settings) and PASSWORD not in repr(ph)
    with TestClient(app, base_url=BASE_URL) as c:
        token = login(c).cookies.get(SESSION_COOKIE)
        c.get("/api/runs")
    out = capsys.readouterr()
    assert PASSWORD not in out.out + out.err and token not in out.out + out.err


def studio_of_app(app):
    return app.state.studio


def test_settings_repr_hides_password():
    s = StudioSettings(password="hunter2", data_dir="/tmp/x")
    assert "hunter2" not in repr(s)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_public_bind_without_password_is_refused(host):
    with pytest.raises(ConfigError, match="without a password"):
        check_bind(StudioSettings(host=host, data_dir="/tmp/x"))
    check_bind(StudioSettings(host=host, data_dir="/tmp/x", password="pw"))  # allowed with one


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_bind_needs_no_password(host):
    assert is_loopback(host)
    check_bind(StudioSettings(host=host, data_dir="/tmp/x"))


def test_cli_refuses_public_bind_with_a_clear_message(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "slimtune.studio", "--host", "0.0.0.0", "--port", "8899",
                        "--data-dir", str(tmp_path)], check=False, capture_output=True, text=True, timeout=60,
                       env=env)
    assert p.returncode == 2
    assert "Refusing to listen on 0.0.0.0:8899 without a password" in p.stderr
    assert "--password" in p.stderr


def test_host_header_must_be_loopback_on_a_loopback_bind(client):
    assert client.get("/api/runs", headers={"host": "evil.example:8888"}).status_code == 400
    assert client.get("/api/runs", headers={"host": "localhost:8888"}).status_code == 200


def test_cross_origin_writes_are_refused(client):
    r = client.post("/api/datasets/sample", headers={"origin": "http://evil.example"})
    assert r.status_code == 403
    r = client.post("/api/datasets/sample", headers={"origin": BASE_URL})
    assert r.status_code == 201


def test_no_cors_headers(client):
    r = client.options("/api/runs", headers={"origin": "http://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    r = client.get("/api/runs", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


def test_oversized_json_body_is_413(client):
    r = client.post("/api/runs", content=b"{" + b" " * (3 * 1024 * 1024) + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_security_headers(client):
    r = client.get("/")
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "content-security-policy" not in client.get("/docs").headers
