"""Training jobs end to end through the API, on a fake worker: success, failure, OOM kill, stop, queue, resume,
metrics (JSON and SSE), delete, and recovery after a server restart."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from studio_testkit import BASE_URL, fake_settings, studio_of

from slimtune.studio.app import create_app
from slimtune.studio.schemas import TrainConfig
from slimtune.studio.services.runs import build_train_argv


def start(client, **cfg):
    ds = client.post("/api/datasets/sample").json()
    body = {"model_id": "embeddedtiny", "dataset_id": ds["id"], "max_steps": 6, **cfg}
    r = client.post("/api/runs", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def wait_status(client, run_id, statuses, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} stayed {run['status']}")


def test_build_train_argv_maps_every_setting(tmp_path):
    cfg = TrainConfig(model_id="embeddedtiny", dataset_id="abcdef123456", max_steps=5, epochs=None, lr=1e-3,
                      lora_r=8, lora_alpha=16, batch_size=2, grad_accum=3, max_seq_length=512, load_in_4bit=True,
                      seed=1, save_steps=2)
    argv = build_train_argv(["slimtune", "train"], cfg, model_ref="M", data_path=tmp_path / "d.jsonl",
                            run_dir=tmp_path / "r", resume=True)
    assert argv[:8] == ["slimtune", "train", "--model", "M", "--data", str(tmp_path / "d.jsonl"), "--output",
                        str(tmp_path / "r")]
    flags = dict(zip(argv[8::2], argv[9::2]))
    assert flags["--max-steps"] == "5" and flags["--lr"] == "0.001" and flags["--lora-r"] == "8"
    assert flags["--grad-accum"] == "3" and flags["--save-steps"] == "2"
    assert "--epochs" not in argv and argv[-2:] == ["--load-in-4bit", "--resume"]


def test_run_completes_with_metrics_logs_and_adapter(client):
    run = start(client, name="first")
    assert run["status"] in ("queued", "running", "completed") and run["name"] == "first"
    done = wait_status(client, run["id"], {"completed"})
    assert done["exit_code"] == 0 and done["has_adapter"] and done["last_step"] == 6
    m = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert [x["step"] for x in m["metrics"]] == [1, 2, 3, 4, 5, 6]
    assert m["events"][0]["event"] == "started" and m["metrics"][4]["eval_loss"] > 0
    again = client.get(f"/api/runs/{run['id']}/metrics", params={"offset": m["offset"]}).json()
    assert again["metrics"] == [] and again["offset"] == m["offset"]
    logs = client.get(f"/api/runs/{run['id']}/logs").json()["lines"]
    assert any("step 6 loss" in line for line in logs) and "some warning on stderr" in logs
    files = {f["path"] for f in client.get(f"/api/runs/{run['id']}/artifacts").json()}
    assert {"config.yaml", "metrics.jsonl", "adapter/adapter_config.json"} <= files
    z = client.get(f"/api/runs/{run['id']}/adapter.zip")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    assert b"first-adapter/adapter_config.json" in z.content


def test_sse_stream_sends_metrics_logs_status_and_end(client, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_STEP_S", "0.05")
    run = start(client, max_steps=8)
    events: dict[str, list] = {}
    with client.stream("GET", f"/api/runs/{run['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.setdefault(name, []).append(json.loads(line[6:]))
                if name == "end":
                    break
    steps = [m["step"] for batch in events["metrics"] for m in batch]
    assert steps == list(range(1, 9))
    assert events["status"][-1]["status"] == "completed"
    assert events["end"] == [{"reason": "completed"}]
    assert any("training done" in line for batch in events["log"] for line in batch)


def test_failed_run_reports_stderr_and_server_keeps_serving(client, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_MODE", "fail")
    run = wait_status(client, start(client)["id"], {"failed"})
    assert run["exit_code"] == 1
    assert "exited with code 1" in run["error"] and "RuntimeError: fake failure at step 2" in run["error"]
    assert client.get("/api/runs").status_code == 200


def test_oom_kill_is_a_failure_with_a_hint(client, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_MODE", "oom")
    run = wait_status(client, start(client)["id"], {"failed"})
    assert run["exit_code"] == -9 and "SIGKILL" in run["error"] and "out of memory" in run["error"]


def test_stop_terminates_the_worker_and_queue_is_fifo(client, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_MODE", "hang")
    monkeypatch.setenv("FAKE_TRAIN_STEP_S", "0.05")
    first = start(client, name="one")
    second = start(client, name="two")
    third = start(client, name="three")
    first = wait_status(client, first["id"], {"running"})
    assert client.get(f"/api/runs/{second['id']}").json()["status"] == "queued"
    assert client.get(f"/api/runs/{second['id']}").json()["queue_position"] == 1
    assert client.get(f"/api/runs/{third['id']}").json()["queue_position"] == 2
    # Stopping a queued run takes it out of the queue without running it.
    assert client.post(f"/api/runs/{third['id']}/stop").json()["status"] == "stopped"
    assert client.post(f"/api/runs/{first['id']}/stop").status_code == 200
    assert wait_status(client, first["id"], {"stopped"})["error"] is None
    wait_status(client, second["id"], {"running"})  # next in line starts on its own
    client.post(f"/api/runs/{second['id']}/stop")
    wait_status(client, second["id"], {"stopped"})
    assert client.post(f"/api/runs/{second['id']}/stop").status_code == 409
    info = client.get("/api/info").json()
    assert info["running"] is None


def test_resume_passes_resume_and_continues(client, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_MODE", "fail")
    run = wait_status(client, start(client, max_steps=5)["id"], {"failed"})
    monkeypatch.setenv("FAKE_TRAIN_MODE", "ok")
    r = client.post(f"/api/runs/{run['id']}/resume")
    assert r.status_code == 200 and r.json()["resume_count"] == 1
    done = wait_status(client, run["id"], {"completed"})
    assert done["error"] is None and done["last_step"] == 5
    m = client.get(f"/api/runs/{run['id']}/metrics").json()
    assert [e["event"] for e in m["events"]] == ["started", "resumed"]
    assert [x["step"] for x in m["metrics"]] == [1, 2, 3, 4, 5]
    assert client.post(f"/api/runs/{run['id']}/resume").status_code == 409  # completed runs are not resumable
    assert "--resume" in "\n".join(client.get(f"/api/runs/{run['id']}/logs").json()["lines"])


def test_delete_run_removes_its_files(client):
    run = wait_status(client, start(client)["id"], {"completed"})
    studio = studio_of(client)
    folder = studio.dirs.runs / run["id"]
    assert folder.is_dir()
    client.get(f"/api/runs/{run['id']}/adapter.zip")
    assert client.delete(f"/api/runs/{run['id']}").status_code == 204
    assert not folder.exists() and not list(studio.dirs.cache.iterdir())
    assert client.get(f"/api/runs/{run['id']}").status_code == 404


def test_delete_active_run_is_refused(client, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_MODE", "hang")
    run = wait_status(client, start(client)["id"], {"running"})
    assert client.delete(f"/api/runs/{run['id']}").status_code == 409
    client.post(f"/api/runs/{run['id']}/stop")
    wait_status(client, run["id"], {"stopped"})


def test_invalid_configs_are_422(client):
    ds = client.post("/api/datasets/sample").json()
    for bad in [{"max_steps": 0}, {"lr": -1}, {"lora_r": 0}, {"max_steps": None, "epochs": None},
                {"model_id": "../x"}, {"unknown_dataset": True, "dataset_id": "abcdef123456"}]:
        body = {"model_id": "embeddedtiny", "dataset_id": ds["id"], "max_steps": 3, **bad}
        r = client.post("/api/runs", json=body)
        assert r.status_code in (400, 404, 422), (bad, r.status_code)


def test_restart_marks_running_interrupted_and_requeues_queued(tmp_path, fake_lib, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_MODE", "hang")
    monkeypatch.setenv("FAKE_TRAIN_STEP_S", "0.05")
    settings = fake_settings(tmp_path / "data")
    with TestClient(create_app(settings), base_url=BASE_URL) as c:
        a = start(c)
        b = start(c)
        wait_status(c, a["id"], {"running"})
    # The server stopped: the running job was stopped with it.
    monkeypatch.setenv("FAKE_TRAIN_MODE", "ok")
    with TestClient(create_app(settings), base_url=BASE_URL) as c:
        ra = c.get(f"/api/runs/{a['id']}").json()
        assert ra["status"] == "interrupted" and "server stopped" in ra["error"]
        assert wait_status(c, b["id"], {"completed"})["last_step"] == 6
        assert c.post(f"/api/runs/{a['id']}/resume").status_code == 200
        wait_status(c, a["id"], {"completed"})


@pytest.mark.parametrize("missing", ["model", "dataset"])
def test_unknown_model_or_dataset_is_404(client, missing):
    ds = client.post("/api/datasets/sample").json()
    body = {"model_id": "embeddedtiny", "dataset_id": ds["id"], "max_steps": 3}
    body[f"{missing}_id"] = "abcdef123456"
    assert client.post("/api/runs", json=body).status_code == 404
