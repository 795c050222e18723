"""`slimtune bench`: predicted_gib beside the measured peak, and --max-memory planning (checked on CPU)."""

import json

import slimtune.bench.run as bench
from slimtune.cli.main import main
from slimtune.memory.estimate import estimate_training_memory

GIB = 2**30


def test_predicted_gib_is_the_estimate_of_the_benchmarked_options():
    opts = bench.BenchOptions(attention="slimtune", loss_chunk_size=256)
    expected = estimate_training_memory("e2b", seq_len=2048, load_in_4bit=True, attention="slimtune",
                                        loss_chunk_size=256)["total_gib"]
    assert bench.predicted_gib("e2b", "qlora", 2048, opts) == expected
    assert bench.predicted_gib("no-such-geometry", "qlora", 2048, opts) is None  # never breaks a measurement


def test_max_memory_plans_per_configuration_and_records_what_does_not_fit(monkeypatch, tmp_path):
    ran = []

    def fake_bench_one(variant, mode, seq, *, steps, multimodal, options, profile_steps):
        ran.append((mode, seq, options))
        return {"probe": "slimtune", "mode": mode, "seq": seq}

    monkeypatch.setattr(bench, "bench_one", fake_bench_one)
    monkeypatch.setattr(bench, "environment", lambda: {})
    out = tmp_path / "r.jsonl"
    bench.run_bench("e2b", ["qlora", "lora16"], [2048], options=bench.BenchOptions(gradient_checkpointing=False),
                    json_path=str(out), log=lambda *_: None, max_memory=int(2.9 * GIB))
    (mode, _, opts), = ran  # lora16 cannot fit 2.9 GiB: its weights alone are over 4 GiB
    assert mode == "qlora" and opts.gradient_checkpointing is True and opts.loss_chunk_size > 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert "no plan fits" in records[1]["error"]
    ran.clear()
    bench.run_bench("e2b", ["qlora"], [2048], options=bench.BenchOptions(gradient_checkpointing=False),
                    log=lambda *_: None, max_memory=80 * GIB, explicit=frozenset({"gradient_checkpointing"}))
    assert ran[0][2].gradient_checkpointing is False  # given on the command line: kept


def test_bench_refuses_a_bad_budget_before_looking_for_a_gpu(capsys):
    assert main(["bench", "--max-memory", "lots"]) == 2
    assert "cannot read the memory size 'lots'" in capsys.readouterr().err


def test_budget_with_cuda_graphs_plans_only_what_a_captured_step_can_run():
    """Under a tight budget the planner reaches for activation offload and 8-bit AdamW; with cuda_graphs it must
    find another way (tiled MLP here) or say nothing fits, and the graph pool is part of the prediction."""
    plain, _ = bench.planned_options("e2b", "qlora", 8192, bench.BenchOptions(attention="slimtune"), 4 * 2**30)
    assert plain.activation_offload or plain.optimizer == "adamw8bit"
    graphs, summary = bench.planned_options("e2b", "qlora", 8192,
                                            bench.BenchOptions(attention="slimtune", cuda_graphs=True), 5 * 2**30)
    assert graphs.cuda_graphs and not graphs.activation_offload and graphs.optimizer == "adamw"
    assert "cuda_graph_pool" in summary
    with_pool = bench.predicted_gib("e2b", "qlora", 8192, graphs)
    without = bench.predicted_gib("e2b", "qlora", 8192, bench.BenchOptions(
        attention="slimtune", mlp_chunk_size=graphs.mlp_chunk_size))
    assert with_pool > without


def test_experts_impl_switch_is_set_for_the_run_and_restored(monkeypatch):
    """--experts-impl reaches the experts' process-wide switch while one configuration runs, and only then."""
    import pytest

    from slimtune.adapt import experts_grouped
    from slimtune.errors import ConfigError

    seen = []
    monkeypatch.setattr(bench, "_bench_one", lambda *a, **k: seen.append(experts_grouped.IMPL) or {})
    before = experts_grouped.IMPL
    for impl in ("loop", "grouped"):
        bench.bench_one("26b-a4b", "qlora", 2048, options=bench.BenchOptions(experts_impl=impl))
    assert seen == ["loop", "grouped"] and experts_grouped.IMPL == before
    with pytest.raises(ConfigError, match="experts_impl"):
        bench.BenchOptions(experts_impl="fast")


def test_cli_experts_impl_list_runs_each_in_turn(monkeypatch):
    import torch

    runs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run_bench", lambda *a, options, **k: runs.append(options.experts_impl))
    assert main(["bench", "--geometry", "26b-a4b", "--experts-impl", "loop,grouped"]) == 0
    assert runs == ["loop", "grouped"]
    runs.clear()
    assert main(["bench", "--geometry", "26b-a4b", "--experts-impl", "loop,fast"]) == 2  # refused before any run
    assert runs == []


def test_card_gib_caps_the_allocator_at_a_smaller_cards_share(monkeypatch):
    import pytest
    import torch

    from slimtune.cli.bench_cmd import card_fraction
    from slimtune.errors import ConfigError

    assert card_fraction(24, 140 * GIB) == pytest.approx(24 / 140)
    for bad in (0, -1, 141, float("nan")):
        with pytest.raises(ConfigError, match="--card-gib must be above 0 and at most this GPU's 140.0 GiB"):
            card_fraction(bad, 140 * GIB)
    # the whole command on a pretend 140 GiB GPU: the fraction is set and the records carry the card size
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: type("P", (), {"total_memory": 140 * GIB}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, *_: seen.setdefault("fraction", f))
    monkeypatch.setattr(bench, "run_bench", lambda *a, options, **kw: seen.setdefault("extra", options.extra))
    assert main(["bench", "--card-gib", "24", "--seq", "2048", "--mode", "qlora"]) == 0
    assert seen == {"fraction": pytest.approx(24 / 140), "extra": {"card_gib": 24.0}}
