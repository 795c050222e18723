"""The real worker modules, with the heavy slimtune calls replaced by stand-ins (no model is loaded)."""

from __future__ import annotations

import io
import json

import pytest

from slimtune.errors import ExportError
from slimtune.studio.workers import chat as chat_worker
from slimtune.studio.workers import export as export_worker


class FakeModel:
    def __init__(self, name):
        self.name, self.adapter = name, None


@pytest.fixture
def fake_slimtune(monkeypatch):
    import importlib

    import slimtune

    # slimtune.infer re-exports the function under the module's name, so fetch the module itself.
    gen_mod = importlib.import_module("slimtune.infer.generate")

    loads = []

    def load_model(ref, dtype=None, load_in_4bit=False):
        loads.append((ref, load_in_4bit))
        return FakeModel(f"{ref}#{len(loads)}"), "tok"

    def load_adapter(model, adapter_dir):
        model.adapter = adapter_dir
        return model

    def generate(model, tok, messages, *, stream, **params):
        assert stream is True and params["max_new_tokens"] == 4
        unknown = set(params) - {"max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                 "stop"}
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
        yield from [f"{model.name}|", f"adapter={model.adapter}|", messages[-1]["content"]]

    monkeypatch.setattr(slimtune, "load_model", load_model, raising=False)
    monkeypatch.setattr(slimtune, "load_adapter", load_adapter, raising=False)
    monkeypatch.setattr(gen_mod, "generate", generate)
    return loads


def run_requests(requests):
    out = io.StringIO()
    worker = chat_worker.Worker(out)
    for r in requests:
        worker.requests.put(r)
    worker.requests.put(None)
    worker.serve()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def req(rid, side, model="m", adapter="/a"):
    return {"op": "generate", "id": rid, "side": side, "load": {"model": model, "adapter": adapter, "load_in_4bit": False},
            "messages": [{"role": "user", "content": "hi"}], "params": {"max_new_tokens": 4}}


def text_of(msgs, rid):
    return "".join(m["text"] for m in msgs if m["id"] == rid and m["type"] == "token")


def test_base_and_adapter_use_separate_weights(fake_slimtune):
    msgs = run_requests([req("r1", "base"), req("r2", "adapter"), req("r3", "base"), req("r4", "adapter")])
    assert text_of(msgs, "r1") == "m#1|adapter=None|hi"
    assert text_of(msgs, "r2") == "m#1|adapter=/a|hi"        # the adapter is added to the loaded base
    assert text_of(msgs, "r3") == "m#2|adapter=None|hi"       # so the base side needs a clean copy
    assert text_of(msgs, "r4") == "m#1|adapter=/a|hi"
    assert len(fake_slimtune) == 2                             # and nothing is loaded more than once
    assert [m["type"] for m in msgs if m["id"] == "r1"][-1] == "done"


def test_new_adapter_or_model_reloads(fake_slimtune):
    msgs = run_requests([req("r1", "adapter"), req("r2", "adapter", adapter="/b"), req("r3", "base", model="n")])
    assert text_of(msgs, "r2") == "m#2|adapter=/b|hi"
    assert text_of(msgs, "r3") == "n#3|adapter=None|hi"


def test_cancelled_request_is_skipped_and_errors_are_reported(fake_slimtune, monkeypatch):
    out = io.StringIO()
    worker = chat_worker.Worker(out)
    worker.cancelled.add("r1")
    bad = req("r2", "base")
    bad["params"] = {"max_new_tokens": 4, "bogus": 1}
    for r in (req("r1", "base"), bad, None):
        worker.requests.put(r)
    worker.serve()
    msgs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert msgs[0] == {"id": "r1", "type": "done", "cancelled": True}
    assert msgs[-1]["id"] == "r2" and msgs[-1]["type"] == "error" and "bogus" in msgs[-1]["text"]


def test_export_worker_calls_the_library(monkeypatch, tmp_path, capsys):
    import slimtune.export as export_mod

    calls = []
    monkeypatch.setattr(export_mod, "export", lambda src, fmt, out, overwrite: calls.append((src, fmt, out)) or out)
    assert export_worker.main([str(tmp_path / "run"), "lora", str(tmp_path / "out")]) == 0
    assert calls == [(tmp_path / "run", "lora", tmp_path / "out")]

    def fail(*a, **k):
        raise ExportError("no adapter in run")

    monkeypatch.setattr(export_mod, "export", fail)
    assert export_worker.main([str(tmp_path / "run"), "lora", str(tmp_path / "out")]) == 1
    assert "Export failed: no adapter in run" in capsys.readouterr().err
