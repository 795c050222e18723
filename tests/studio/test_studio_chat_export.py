"""Chat streaming (fake worker), exports (fake worker), models, memory estimate."""

from __future__ import annotations

import io
import json
import sys
import zipfile

import pytest
from fastapi.testclient import TestClient
from studio_testkit import BASE_URL, fake_settings, studio_of

from slimtune.studio.app import create_app


def trained_run(client, **cfg):
    ds = client.post("/api/datasets/sample").json()
    run = client.post("/api/runs", json={"model_id": "embeddedtiny", "dataset_id": ds["id"], "max_steps": 3,
                                         **cfg}).json()
    assert studio_of(client).jobs.wait_idle(30)
    return client.get(f"/api/runs/{run['id']}").json()


def chat(client, run_id, side, text="hello"):
    body = {"run_id": run_id, "side": side, "messages": [{"role": "user", "content": text}],
            "params": {"max_new_tokens": 16, "temperature": 0}}
    events = []
    with client.stream("POST", "/api/chat/stream", json=body) as r:
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_chat_streams_both_sides(client):
    run = trained_run(client)
    for side in ("base", "adapter"):
        events = chat(client, run["id"], side)
        kinds = [k for k, _ in events]
        assert kinds[0] == "status" and kinds[-1] == "done" and kinds.count("token") > 3
        text = "".join(d["text"] for k, d in events if k == "token")
        assert text.startswith(f"[{side}] You said: hello")
    status = client.get("/api/chat/status").json()
    assert status["loaded"]["side"] == "adapter" and status["loaded"]["adapter"].endswith("/adapter")
    assert status["busy"] is False
    assert client.post("/api/chat/unload").json()["loaded"] is None


def test_chat_adapter_side_needs_an_adapter(client, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_MODE", "fail")
    run = trained_run(client)
    assert run["status"] == "failed"
    r = client.post("/api/chat/stream", json={"run_id": run["id"], "side": "adapter",
                                              "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 409


def test_chat_worker_crash_becomes_an_error_event(client):
    run = trained_run(client)
    studio = studio_of(client)
    studio.store.update("runs", run["id"], model_ref="/models/crash")
    events = chat(client, run["id"], "base")
    assert events[-1][0] == "error" and "exited with code 3" in events[-1][1]["text"]
    assert "fake chat worker crashing" in events[-1][1]["text"]
    # The next request starts a fresh worker.
    studio.store.update("runs", run["id"], model_ref=run["model_ref"])
    assert chat(client, run["id"], "base")[-1][0] == "done"


def test_export_lifecycle_and_download(client):
    run = trained_run(client, name="my run")
    formats = client.get("/api/exports/formats").json()
    assert [f["name"] for f in formats] == ["lora", "merged_16bit"]
    r = client.post("/api/exports", json={"run_id": run["id"], "format": "lora"})
    assert r.status_code == 201, r.text
    exp = r.json()
    assert studio_of(client).jobs.wait_idle(30)
    exp = client.get(f"/api/exports/{exp['id']}").json()
    assert exp["status"] == "completed" and exp["download_ready"]
    z = client.get(f"/api/exports/{exp['id']}/download")
    assert z.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    assert f"{run['id']}-lora/FORMAT.txt" in names and f"{run['id']}-lora/adapter/adapter_config.json" in names
    assert any("exporting" in x for x in client.get(f"/api/exports/{exp['id']}/logs").json()["lines"])
    assert [e["id"] for e in client.get("/api/exports", params={"run_id": run["id"]}).json()] == [exp["id"]]
    # Deleting the run deletes its exports.
    assert client.delete(f"/api/runs/{run['id']}").status_code == 204
    assert client.get(f"/api/exports/{exp['id']}").status_code == 404


def test_failed_and_invalid_exports(client, fake_lib, monkeypatch):
    run = trained_run(client)
    assert client.post("/api/exports", json={"run_id": run["id"], "format": "nope"}).status_code == 400
    monkeypatch.setattr("slimtune.studio.library.export_formats",
                        lambda: [{"name": "broken", "description": ""}])
    exp = client.post("/api/exports", json={"run_id": run["id"], "format": "broken"}).json()
    studio_of(client).jobs.wait_idle(30)
    exp = client.get(f"/api/exports/{exp['id']}").json()
    assert exp["status"] == "failed" and "broken on purpose" in exp["error"] and not exp["download_ready"]
    assert client.get(f"/api/exports/{exp['id']}/download").status_code == 409


def test_export_needs_an_adapter(client, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_MODE", "fail")
    run = trained_run(client)
    assert client.post("/api/exports", json={"run_id": run["id"], "format": "lora"}).status_code == 409


def test_export_formats_unavailable_is_503(client, monkeypatch):
    from slimtune.studio import library

    def missing():
        raise library.LibraryUnavailable("slimtune.export is not available in this installation.")

    monkeypatch.setattr(library, "export_formats", missing)
    r = client.get("/api/exports/formats")
    assert r.status_code == 503 and "not available" in r.json()["detail"]


def test_models_register_list_delete(client, tmp_path):
    models = client.get("/api/models").json()
    assert models[0]["id"] == "embeddedtiny" and models[0]["ready"] is False
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert client.post("/api/models", json={"kind": "local", "ref": str(folder)}).status_code == 400
    (folder / "config.json").write_text("{}")
    assert client.post("/api/models", json={"kind": "local", "ref": "relative/path"}).status_code == 400
    local = client.post("/api/models", json={"kind": "local", "ref": str(folder), "name": "Mine"}).json()
    hub = client.post("/api/models", json={"kind": "hub", "ref": "google/gemma-4-e2b-it"}).json()
    assert client.post("/api/models", json={"kind": "hub", "ref": "../etc"}).status_code == 400
    ids = [m["id"] for m in client.get("/api/models").json()]
    assert ids == ["embeddedtiny", hub["id"], local["id"]]
    assert client.delete(f"/api/models/{local['id']}").status_code == 204
    assert client.delete("/api/models/embeddedtiny").status_code == 400
    r = client.post("/api/models/embeddedtiny/prepare")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert r.json()["ref"].startswith(str(studio_of(client).dirs.models))


def test_tiny_build_failure_is_reported(tmp_path, fake_lib):
    failing = [sys.executable, "-c", "import sys; sys.exit('no torch here')"]
    settings = fake_settings(tmp_path / "d", tiny_command=failing)
    with TestClient(create_app(settings), base_url=BASE_URL) as c:
        r = c.post("/api/models/embeddedtiny/prepare")
        assert r.status_code == 500 and "no torch here" in r.json()["detail"]


def test_memory_estimate(client):
    r = client.post("/api/memory/estimate", json={"model_id": "embeddedtiny", "max_seq_length": 4096,
                                                  "batch_size": 2, "load_in_4bit": True, "lora_r": 16})
    assert r.status_code == 200
    body = r.json()
    assert body["total_gib"] == pytest.approx(sum(body["breakdown"].values()), abs=1e-3)
    assert body["main_terms"][0] == {"name": "activations", "gib": 2.0}
    assert body["fits"] is True and body["budget_gib"] is None and body["planned"] == {}
    assert client.post("/api/memory/estimate", json={"model_id": "embeddedtiny", "batch_size": 0}).status_code == 422


def test_library_errors_map_to_422(client, monkeypatch):
    from slimtune.errors import ConfigError
    from slimtune.studio import library

    def boom(*a, **k):
        raise ConfigError("model 'x' has no known geometry; pass e2b, e4b, 26b-a4b or 31b")

    monkeypatch.setattr(library, "memory_plan", boom)
    r = client.post("/api/memory/estimate", json={"model_id": "embeddedtiny"})
    assert r.status_code == 422 and "no known geometry" in r.json()["detail"]


def test_openapi_documents_typed_routes(client):
    spec = client.get("/openapi.json").json()
    assert "/api/runs" in spec["paths"] and "TrainConfig" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200
