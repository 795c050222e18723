"""Uploads (size cap, sanitised names), the bundled sample, previews and library errors."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from studio_testkit import BASE_URL, fake_settings, studio_of

from slimtune.studio.app import create_app

ROWS = "\n".join([json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
                  "this is not json", json.dumps({"messages": []})]) + "\n"


def test_upload_preview_and_delete(client):
    r = client.post("/api/datasets/upload", params={"filename": "../../My Chats.jsonl"}, content=ROWS.encode())
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["name"] == "My_Chats.jsonl" and ds["size_bytes"] == len(ROWS.encode())
    studio = studio_of(client)
    stored = studio.dirs.datasets / ds["filename"]
    assert stored.is_file() and stored.parent == studio.dirs.datasets
    assert list(studio.dirs.incoming.iterdir()) == []
    p = client.get(f"/api/datasets/{ds['id']}/preview", params={"n": 1}).json()
    assert p["format"] == "chatml" and p["n_rows"] == 2 and p["n_skipped"] == 1
    assert p["skipped"][0] == {"location": "line 2", "reason": "not valid JSON"}
    assert len(p["preview"]) == 1
    assert [d["id"] for d in client.get("/api/datasets").json()] == [ds["id"]]
    assert client.delete(f"/api/datasets/{ds['id']}").status_code == 204
    assert not stored.exists()


def test_unusable_dataset_shows_the_library_message(client):
    ds = client.post("/api/datasets/upload", params={"filename": "bad.jsonl"}, content=b"nope\n").json()
    r = client.get(f"/api/datasets/{ds['id']}/preview")
    assert r.status_code == 422 and "no usable rows" in r.json()["detail"]


def test_sample_dataset(client):
    r = client.post("/api/datasets/sample")
    assert r.status_code == 201
    assert r.json()["name"] == "default_data.jsonl (sample)"
    assert client.get(f"/api/datasets/{r.json()['id']}/preview").status_code == 200


@pytest.mark.parametrize("name", ["script.sh", "..", "noext"])
def test_bad_file_names_are_400(client, name):
    assert client.post("/api/datasets/upload", params={"filename": name}, content=b"x").status_code == 400


def test_empty_upload_is_400(client):
    assert client.post("/api/datasets/upload", params={"filename": "a.jsonl"}, content=b"").status_code == 400


@pytest.fixture
def small_cap_client(tmp_path, fake_lib):
    with TestClient(create_app(fake_settings(tmp_path / "d", max_upload_mb=1)), base_url=BASE_URL) as c:
        yield c


def test_oversized_upload_is_413_by_content_length(small_cap_client):
    r = small_cap_client.post("/api/datasets/upload", params={"filename": "big.jsonl"}, content=b"x" * (2 << 20))
    assert r.status_code == 413
    assert "limit is 1 MiB" in r.json()["detail"] and "--max-upload-mb" in r.json()["detail"]
    assert small_cap_client.get("/api/datasets").json() == []


def test_oversized_streamed_upload_is_413_and_leaves_nothing(small_cap_client):
    def chunks():  # no Content-Length: the cap must hold while streaming
        for _ in range(40):
            yield b"y" * 65536

    r = small_cap_client.post("/api/datasets/upload", params={"filename": "big.jsonl"}, content=chunks())
    assert r.status_code == 413
    studio = studio_of(small_cap_client)
    assert list(studio.dirs.incoming.iterdir()) == []
    assert [p.name for p in studio.dirs.datasets.iterdir() if p.is_file()] == []


def test_upload_just_under_the_cap_is_accepted(small_cap_client):
    r = small_cap_client.post("/api/datasets/upload", params={"filename": "ok.jsonl"}, content=b"z" * (1 << 20))
    assert r.status_code == 201
