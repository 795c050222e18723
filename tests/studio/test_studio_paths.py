"""Nothing the API serves or writes may come from outside the data directory."""

from __future__ import annotations

import os

import pytest
from fastapi import HTTPException
from studio_testkit import studio_of

from slimtune.studio.paths import resolve_inside, sanitize_filename, slug


@pytest.mark.parametrize("name,expected", [
    ("data.jsonl", "data.jsonl"),
    ("../../etc/passwd.jsonl", "passwd.jsonl"),
    ("..\\..\\windows\\x.csv", "x.csv"),
    ("/abs/path/train.parquet", "train.parquet"),
    ("my data (v2).jsonl", "my_data_v2_.jsonl"),
    (".hidden.jsonl", "hidden.jsonl"),
    ("résumé.json", "resume.json"),
    ("a" * 300 + ".jsonl", "a" * 94 + ".jsonl"),
])
def test_sanitize_filename(name, expected):
    assert sanitize_filename(name) == expected


@pytest.mark.parametrize("name", ["..", "...", "/", "noext", "evil.sh", "x.jsonl.exe", ""])
def test_sanitize_filename_rejects(name):
    with pytest.raises(HTTPException) as e:
        sanitize_filename(name)
    assert e.value.status_code == 400


def test_slug():
    assert slug("../../x y", "fallback") == "x_y"
    assert slug("///", "fallback") == "fallback"


def test_resolve_inside(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.txt").write_text("x")
    assert resolve_inside(tmp_path, "a", "f.txt") == (tmp_path / "a" / "f.txt").resolve()
    for bad in ["../x", "a/../../x", "/etc/passwd", "\\etc", "a/\x00"]:
        with pytest.raises(HTTPException) as e:
            resolve_inside(tmp_path / "a", bad)
        assert e.value.status_code == 400, bad
    os.symlink("/etc", tmp_path / "a" / "out")
    with pytest.raises(HTTPException) as e:
        resolve_inside(tmp_path / "a", "out", "passwd")
    assert e.value.status_code == 400


def _finished_run(client):
    ds = client.post("/api/datasets/sample").json()
    run = client.post("/api/runs", json={"model_id": "embeddedtiny", "dataset_id": ds["id"], "max_steps": 3}).json()
    assert studio_of(client).jobs.wait_idle(30)
    return run["id"], ds["id"]


def test_run_file_route_blocks_traversal(client):
    run_id, _ = _finished_run(client)
    assert client.get(f"/api/runs/{run_id}/files/config.yaml").status_code == 200
    assert client.get(f"/api/runs/{run_id}/files/adapter/adapter_config.json").status_code == 200
    attempts = [
        "../../studio.sqlite3", "..%2f..%2fstudio.sqlite3", "%2e%2e/%2e%2e/studio.sqlite3",
        "%2e%2e%2f%2e%2e%2fstudio.sqlite3", "adapter/../../../studio.sqlite3", "%2fetc%2fpasswd",
        "..%5c..%5cstudio.sqlite3", "....//....//etc/passwd",
    ]
    for a in attempts:
        r = client.get(f"/api/runs/{run_id}/files/{a}")
        assert r.status_code in (400, 404), (a, r.status_code)
        assert b"CREATE TABLE" not in r.content and b"root:" not in r.content
    # An absolute path in the URL (double slash) must not escape either.
    r = client.get(f"/api/runs/{run_id}/files//etc/passwd")
    assert r.status_code in (400, 404) and b"root:" not in r.content


def test_symlink_out_of_the_data_dir_is_not_served(client, tmp_path):
    run_id, ds_id = _finished_run(client)
    studio = studio_of(client)
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    os.symlink(secret, studio.dirs.runs / run_id / "leak.txt")
    r = client.get(f"/api/runs/{run_id}/files/leak.txt")
    assert r.status_code == 400 and b"top secret" not in r.content
    assert "leak.txt" not in [f["path"] for f in client.get(f"/api/runs/{run_id}/artifacts").json()]
    # A symlink inside the adapter folder is left out of the zip.
    os.symlink(secret, studio.dirs.runs / run_id / "adapter" / "leak.bin")
    z = client.get(f"/api/runs/{run_id}/adapter.zip")
    assert z.status_code == 200 and b"top secret" not in z.content
    # A dataset file swapped for a symlink out of the data dir is refused by preview.
    row = studio.store.get("datasets", ds_id)
    target = studio.dirs.datasets / row["filename"]
    target.unlink()
    os.symlink(secret, target)
    r = client.get(f"/api/datasets/{ds_id}/preview")
    assert r.status_code == 400 and b"top secret" not in r.content


@pytest.mark.parametrize("bad_id", ["..", "..%2f..%2fetc", "%2e%2e", "ABCDEF123456", "a" * 40, "abc"])
def test_ids_that_are_not_ids_are_rejected(client, bad_id):
    for url in (f"/api/runs/{bad_id}", f"/api/datasets/{bad_id}/preview", f"/api/exports/{bad_id}",
                f"/api/runs/{bad_id}/adapter.zip", f"/api/models/{bad_id}"):
        method = "DELETE" if url.startswith("/api/models/") else "GET"
        r = client.request(method, url)
        assert r.status_code in (400, 404, 405), (url, r.status_code)


def test_static_files_cannot_escape(client):
    for a in ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2fsettings.py",
              "/static//etc/passwd"]:
        r = client.get(a)
        assert r.status_code in (400, 404), (a, r.status_code)
        assert b"import" not in r.content and b"root:" not in r.content
