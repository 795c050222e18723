"""The memory and multimodal settings of the Train form: validated by TrainConfig, passed to `slimtune train` as
the CLI's own flags, and estimated with the planner exactly as the trainer prints it before it starts.

The estimate tests use the real planner on E2B's released geometry (a config.json only, no weights), so they
need torch and transformers, which the planner reads the model's shape with.
"""

from __future__ import annotations

import argparse
import time

import pytest

from slimtune.cli import train_cmd
from slimtune.studio import library
from slimtune.studio.schemas import TrainConfig
from slimtune.studio.services.runs import TRAIN_FIELDS, build_train_argv, train_values

REAL_MEMORY_PLAN = library.memory_plan  # captured before the fake_lib fixture swaps it for the fake
SEQ = 8192


def cli_values(argv: list[str]) -> dict:
    """What `slimtune train` makes of a worker's argv (minus the program): the settings train_cmd.run passes on."""
    parser = argparse.ArgumentParser()
    train_cmd.register(parser.add_subparsers(dest="command"))
    args = vars(parser.parse_args(argv))
    return {k: v for k, v in args.items() if k not in ("func", "command", "config", "argv", "nproc")}


def full_config(**kw) -> TrainConfig:
    values = {"model_id": "embeddedtiny", "dataset_id": "abcdef123456", "max_steps": 5, "max_memory": "8GiB",
              "activation_offload": True, "mlp_chunk_size": 0, "loss_chunk_size": 128, "optimizer": "adamw8bit",
              "text_only": True, "load_in_4bit": True, **kw}
    return TrainConfig(**values)


def test_every_setting_is_a_cli_flag_with_the_same_value(tmp_path):
    # The worker's argv, read back by the real `slimtune train` parser, gives exactly the Studio's values.
    cfg = full_config()
    argv = build_train_argv(["slimtune", "train"], cfg, model_ref="M", data_path=tmp_path / "d.jsonl",
                            run_dir=tmp_path / "r", resume=False)
    parsed = cli_values(argv[1:])
    assert parsed == {"model": "M", "data": str(tmp_path / "d.jsonl"), "output": str(tmp_path / "r"),
                      **train_values(cfg)}
    assert parsed["mlp_chunk_size"] == 0  # 0 ("off") is given, not dropped like None
    for name in TRAIN_FIELDS:
        assert name in TrainConfig.model_fields, name
    assert "distributed" not in TrainConfig.model_fields  # torchrun-only: the Studio starts one process per run


def test_a_switch_that_is_on_by_default_is_passed_only_when_turned_off(tmp_path):
    # recompute_norms is on in the trainer (and ticked in the Studio form): unticking it must reach the worker.
    def parsed(**kw):
        argv = build_train_argv(["slimtune", "train"], full_config(**kw), model_ref="M",
                                data_path=tmp_path / "d.jsonl", run_dir=tmp_path / "r", resume=False)
        return argv, cli_values(argv[1:])

    argv, values = parsed(recompute_norms=False)
    assert "--no-recompute-norms" in argv and values["recompute_norms"] is False
    argv, values = parsed(recompute_norms=True)
    assert "recompute-norms" not in " ".join(argv) and "recompute_norms" not in values  # the trainer's default


@pytest.mark.parametrize("graphs, flag", [(None, None), (True, "--cuda-graphs"), (False, "--no-cuda-graphs")])
def test_cuda_graphs_auto_on_off_and_packing_reach_the_trainer(tmp_path, graphs, flag):
    # The form's select: auto (None) is left to the trainer, whose default is auto; on and off are passed.
    cfg = full_config(cuda_graphs=graphs, packing=True, activation_offload=False, optimizer="adamw")
    argv = build_train_argv(["slimtune", "train"], cfg, model_ref="M", data_path=tmp_path / "d.jsonl",
                            run_dir=tmp_path / "r", resume=False)
    values = cli_values(argv[1:])
    assert values["packing"] is True
    assert values.get("cuda_graphs", "auto") == ("auto" if graphs is None else graphs)
    assert [a for a in argv if "cuda-graphs" in a] == ([flag] if flag else [])


def test_unset_settings_are_left_to_the_trainer(tmp_path):
    cfg = TrainConfig(model_id="embeddedtiny", dataset_id="abcdef123456", max_steps=5)
    argv = build_train_argv(["t"], cfg, model_ref="M", data_path=tmp_path / "d", run_dir=tmp_path / "r",
                            resume=False)
    for flag in ("--max-memory", "--activation-offload", "--mlp-chunk-size", "--loss-chunk-size", "--optimizer",
                 "--text-only", "--finetune-multimodal-embedders", "--distributed"):
        assert flag not in argv


def _start(client, **cfg):
    ds = client.post("/api/datasets/sample").json()
    return client.post("/api/runs", json={"model_id": "embeddedtiny", "dataset_id": ds["id"], "max_steps": 3, **cfg})


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_memory": "8 gigs"}, "cannot read the memory size '8 gigs'"),
    ({"max_memory": "8"}, "(add a unit)"),
    ({"mlp_chunk_size": -1}, "mlp_chunk_size must be an integer >= 0"),
    ({"loss_chunk_size": -5}, "loss_chunk_size must be an integer >= 0"),
    ({"optimizer": "sgd"}, "optimizer must be adamw or adamw8bit"),
    ({"text_only": True, "finetune_multimodal_embedders": True}, "finetune_multimodal_embedders=true needs the towers"),
])
def test_run_with_settings_the_trainer_refuses_is_422_with_its_message(client, settings, message):
    r = _start(client, **settings)
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert client.get("/api/runs").json() == []  # nothing recorded, nothing queued


def test_a_switch_is_not_a_chunk_size(client):
    # JSON true would otherwise be read as 1 (a one-token chunk): refused before it reaches TrainConfig.
    r = _start(client, mlp_chunk_size=True)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "mlp_chunk_size"


def test_run_launches_with_the_new_flags(client):
    r = _start(client, max_memory="6GiB", activation_offload=True, mlp_chunk_size=2048, optimizer="adamw8bit",
               loss_chunk_size=0, text_only=True)
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["config"]["max_memory"] == "6GiB" and run["config"]["mlp_chunk_size"] == 2048
    deadline = time.monotonic() + 20
    while client.get(f"/api/runs/{run['id']}").json()["status"] != "completed":
        assert time.monotonic() < deadline, client.get(f"/api/runs/{run['id']}/logs").json()
        time.sleep(0.05)
    started = next(x for x in client.get(f"/api/runs/{run['id']}/logs").json()["lines"] if "starting:" in x)
    for part in ("--max-memory 6GiB", "--mlp-chunk-size 2048", "--optimizer adamw8bit", "--loss-chunk-size 0",
                 "--activation-offload", "--text-only"):
        assert part in started, started
    assert "--finetune-multimodal-embedders" not in started


# ---- the memory estimate, with the real planner --------------------------------------------------------------
@pytest.fixture(scope="module")
def e2b_folder(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from slimtune.models.geometry import build_config

    folder = tmp_path_factory.mktemp("e2b")
    build_config("e2b", tiny=False, text_only=True).to_json_file(str(folder / "config.json"))
    return folder


@pytest.fixture
def estimate(client, monkeypatch, e2b_folder):
    """POST /api/memory/estimate for E2B at 8K tokens with the real planner; returns the response."""
    monkeypatch.setattr(library, "memory_plan", REAL_MEMORY_PLAN)
    model = client.post("/api/models", json={"kind": "local", "ref": str(e2b_folder)}).json()

    def call(**kw):
        return client.post("/api/memory/estimate", json={"model_id": model["id"], "max_seq_length": SEQ, **kw})

    call.model_id, call.ref = model["id"], model["ref"]
    return call


def test_estimate_changes_with_each_memory_switch(estimate):
    base = estimate().json()
    assert base["fits"] and base["budget_gib"] is None and base["planned"] == {} and base["message"] is None
    terms = [t["gib"] for t in base["main_terms"]]
    assert terms == sorted(terms, reverse=True) and base["main_terms"][0]["name"] == "weights"
    assert base["total_gib"] == pytest.approx(sum(base["breakdown"].values()), abs=0.01)
    assert base["summary"].startswith("memory: predicted peak GPU memory")
    for switch in ({"activation_offload": True}, {"mlp_chunk_size": 1024}, {"optimizer": "adamw8bit"}):
        r = estimate(**switch)
        assert r.status_code == 200, r.text
        assert r.json()["total_gib"] < base["total_gib"], switch
        name, value = next(iter(switch.items()))
        assert r.json()["settings"][name] == value


def test_estimate_with_a_budget_is_the_plan_the_cli_would_apply(estimate, tmp_path):
    # The same settings through the CLI's path: the worker's argv -> the real parser -> resolve_config ->
    # apply_memory_plan (what the trainer runs before it starts) give the settings the panel says it will use.
    from slimtune.memory.train_plan import apply_memory_plan, plan_for_config
    from slimtune.train.config_io import resolve_config

    settings = {"max_memory": "8GiB", "batch_size": 1, "grad_accum": 4, "lora_r": 16, "max_seq_length": SEQ}
    body = estimate(**settings).json()
    studio_cfg = TrainConfig(model_id=estimate.model_id, dataset_id="abcdef123456", max_steps=1, **settings)
    argv = build_train_argv(["slimtune", "train"], studio_cfg, model_ref=estimate.ref,
                            data_path=tmp_path / "d.jsonl", run_dir=tmp_path / "r", resume=False)
    cli_cfg = resolve_config(None, **cli_values(argv[1:]))
    printed: list[str] = []
    applied = apply_memory_plan(cli_cfg, printed.append)
    changed = {k: getattr(applied, k) for k in body["settings"] if getattr(applied, k) != getattr(cli_cfg, k)}
    assert body["fits"] and body["budget_gib"] == 8.0 and body["message"] is None
    assert body["planned"] == changed != {}
    assert body["settings"] == {k: getattr(applied, k) for k in body["settings"]}
    assert body["total_gib"] == pytest.approx(plan_for_config(cli_cfg).predicted_gib, abs=1e-3)
    assert body["total_gib"] <= 8.0
    assert body["summary"].splitlines() == printed


def test_estimate_keeps_the_settings_you_fixed(estimate):
    free = estimate(max_memory="8GiB").json()
    fixed = estimate(max_memory="8GiB", activation_offload=True, mlp_chunk_size=0).json()
    assert fixed["settings"]["activation_offload"] is True and fixed["settings"]["mlp_chunk_size"] == 0
    assert "activation_offload" not in fixed["planned"] and "mlp_chunk_size" not in fixed["planned"]
    assert fixed["total_gib"] != free["total_gib"]


@pytest.mark.parametrize(("budget", "message"), [
    ("8 gigs", "cannot read the memory size '8 gigs'"),
    ("8", "(add a unit)"),
    ("0GiB", "must be more than zero"),
])
def test_estimate_with_an_unreadable_budget_is_422(estimate, budget, message):
    r = estimate(max_memory=budget)
    assert r.status_code == 422 and message in r.json()["detail"], r.text


def test_estimate_with_an_impossible_budget_says_what_fits(estimate):
    r = estimate(max_memory="3GiB")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fits"] is False and body["budget_gib"] == 3.0
    assert body["message"].startswith("no settings fit 3.00 GiB") and body["summary"] == body["message"]
    assert 0 < body["longest_seq_length"] < SEQ and f"is {body['longest_seq_length']}." in body["message"]
    assert body["total_gib"] > 3.0  # the smallest plan's peak, shown next to the message
    hopeless = estimate(max_memory="1GiB").json()
    assert hopeless["fits"] is False and hopeless["longest_seq_length"] == 0
    assert "Not even the shortest sequence fits" in hopeless["message"]


def test_estimate_for_a_model_it_cannot_read_is_422(client, monkeypatch, tmp_path):
    monkeypatch.setattr(library, "memory_plan", REAL_MEMORY_PLAN)
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    model = client.post("/api/models", json={"kind": "local", "ref": str(folder)}).json()
    r = client.post("/api/memory/estimate", json={"model_id": model["id"]})
    assert r.status_code == 422 and r.json()["detail"].startswith(f"No memory estimate for {folder}")
    assert client.post("/api/memory/estimate", json={"model_id": "zzzzzzzzzzzz"}).status_code == 404


def test_estimate_counts_compiled_layers_with_cuda_graphs(estimate):
    """Compiled layers shrink a captured step's graph pool (measured on the H200); the panel must show the memory
    the run will plan with, so compile_layers is one of the settings it reads."""
    graphs = estimate(cuda_graphs=True).json()
    compiled = estimate(cuda_graphs=True, compile_layers=True).json()
    assert compiled["breakdown"]["cuda_graph_pool"] < graphs["breakdown"]["cuda_graph_pool"]
    assert compiled["total_gib"] < graphs["total_gib"]
