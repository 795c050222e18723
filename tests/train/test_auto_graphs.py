"""cuda_graphs: auto (slimtune.train.auto_graphs): graphs only where a captured step is safe and has headroom, and
the trainer follows the decision. The GPU itself is faked (a CUDA device object and its size); the decision logic
and the loop's wiring are what is tested."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import slimtune
from slimtune.errors import ConfigError
from slimtune.train import auto_graphs, loop
from slimtune.train.config import TrainConfig

CUDA = torch.device("cuda")
GIB = 2**30


def _cfg(tmp_path, **kw):
    return TrainConfig(**{"model": "m", "data": "d", "output": str(tmp_path), "packing": True, **kw})


@pytest.fixture
def card_of(monkeypatch):
    """card_of(gib, free=, ours=, fraction=): pretend the CUDA device has `gib` GiB, `free` of them free (default:
    all), this process holds `ours` in its allocator, which is capped to `fraction` of the card."""
    def set_size(gib: float, free: float | None = None, ours: float = 0.0, fraction: float = 1.0):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(total_memory=gib * GIB))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _d=None: ((gib if free is None else free) * GIB,
                                                                          gib * GIB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda _d=None: ours * GIB)
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda _d=None: fraction, raising=False)
    return set_size


@pytest.fixture(scope="module")
def text_model(tiny_dir):
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), dtype=torch.float32, device="cpu")
    slimtune.add_lora(model, r=2, alpha=4)
    return model


def test_default_is_auto_and_the_values_are_checked(tmp_path):
    assert TrainConfig.__dataclass_fields__["cuda_graphs"].default == "auto"
    with pytest.raises(ConfigError, match="cuda_graphs must be true, false or auto"):
        _cfg(tmp_path, cuda_graphs="yes")


@pytest.mark.parametrize("setting, reason", [
    ({"lora_dropout": 0.05}, "lora_dropout"),
    ({"activation_offload": True}, "activation_offload"),
    ({"dtype": "float16"}, "dtype float16"),
])
def test_each_blocking_setting_is_named(tmp_path, setting, reason):
    assert auto_graphs.config_blockers(_cfg(tmp_path), cuda=True, sharded=False) == []
    blockers = auto_graphs.config_blockers(_cfg(tmp_path, **setting), cuda=True, sharded=False)
    assert len(blockers) == 1 and reason in blockers[0]


def test_8bit_adamw_is_no_blocker(tmp_path):
    # its graphed step (replayed forward and backward, eager 8-bit update) passed its GPU check in session 11
    assert auto_graphs.config_blockers(_cfg(tmp_path, optimizer="adamw8bit"), cuda=True, sharded=False) == []


def test_no_gpu_or_sharded_runs_stay_eager(tmp_path):
    assert "no CUDA device" in auto_graphs.config_blockers(_cfg(tmp_path), cuda=False, sharded=False)[0]
    assert "FSDP2" in auto_graphs.config_blockers(_cfg(tmp_path), cuda=True, sharded=True)[0]


def test_the_planner_counts_graphs_for_ddp_but_not_for_fsdp(tmp_path):
    """Data-parallel steps are captured (their gradient sum is in the graph), FSDP2's sharded ones are not."""
    from slimtune.memory.train_plan import _graphs_likely

    assert _graphs_likely(_cfg(tmp_path, distributed="ddp"), cuda=True, world_size=2)
    assert _graphs_likely(_cfg(tmp_path, distributed="auto"), cuda=True, world_size=2)
    assert not _graphs_likely(_cfg(tmp_path, distributed="fsdp"), cuda=True, world_size=2)
    assert _graphs_likely(_cfg(tmp_path, distributed="fsdp"), cuda=True, world_size=1)


def test_headroom_decides_on_a_fitting_model(tmp_path, text_model, card_of):
    card_of(8)
    cfg = _cfg(tmp_path)
    on, why = auto_graphs.decide(cfg, text_model, dtype=torch.bfloat16, device=CUDA, sharded=False,
                                 peak_gib=lambda _c: 5.9)
    assert on and "5.9 of 8.0 GiB usable" in why and "packed" in why
    # unpacked runs capture too, one step per length bucket (their blocker went after the H200 measured them)
    assert auto_graphs.config_blockers(_cfg(tmp_path, packing=False), cuda=True, sharded=False) == []
    on, why = auto_graphs.decide(_cfg(tmp_path, packing=False), text_model, dtype=torch.bfloat16, device=CUDA,
                                 sharded=False, peak_gib=lambda _c: 5.9)
    assert on and "length bucket" in why
    off, why = auto_graphs.decide(cfg, text_model, dtype=torch.bfloat16, device=CUDA, sharded=False,
                                  peak_gib=lambda _c: 6.6)  # 6.6 + the 1.5 GiB margin > 8: a pool could not shrink
    assert not off and "6.6 GiB plus a 1.5 GiB margin is over the 8.0 GiB" in why
    unknown, why = auto_graphs.decide(cfg, text_model, dtype=torch.bfloat16, device=CUDA, sharded=False,
                                      peak_gib=lambda _c: None)
    assert not unknown and "no memory prediction" in why


def test_usable_memory_is_what_is_free_plus_ours_within_the_fraction(card_of):
    card_of(24, free=10, ours=12)  # 2 GiB held by the CUDA context, a display or another process
    assert auto_graphs.usable_gib(CUDA) == pytest.approx(22)
    card_of(139.8, free=120, ours=2, fraction=22.5 / 139.8)  # `slimtune bench --card-gib 22.5` on an H200
    assert auto_graphs.usable_gib(CUDA) == pytest.approx(22.5)
    assert auto_graphs.margin_gib(10) == 1.5 and auto_graphs.margin_gib(100) == pytest.approx(7)


@pytest.mark.parametrize("peak, fits", [
    (19.94, True),   # 26B-A4B, graphs + 8-bit AdamW: captured, reserved 20.92 GiB (session 11, call Y)
    (20.61, True),   # 31B, graphs + 8-bit AdamW: captured with expandable segments, reserved 21.52 (call Y2)
    (22.70, False),  # 26B-A4B, graphs + torch AdamW: out of memory at capture (sessions 10 and 11)
])
def test_the_margin_matches_the_capped_h200_runs(tmp_path, text_model, card_of, peak, fits):
    card_of(139.8, free=139.0, ours=0.0, fraction=22.5 / 139.8)
    on, why = auto_graphs.decide(_cfg(tmp_path), text_model, dtype=torch.bfloat16, device=CUDA,
                                 sharded=False, peak_gib=lambda _c: peak)
    assert on == fits, why


def test_models_a_graph_cannot_capture_stay_eager(tmp_path, tiny_dir, text_model, card_of, monkeypatch):
    card_of(80)
    cfg = _cfg(tmp_path)
    roomy = dict(device=CUDA, sharded=False, peak_gib=lambda _c: 1.0)
    off, why = auto_graphs.decide(cfg, text_model, dtype=torch.float32, **roomy)
    assert not off and "bfloat16" in why
    moe, _ = slimtune.load_model(tiny_dir("26b-a4b", text_only=True), dtype=torch.float32, device="cpu")
    off, why = auto_graphs.decide(cfg, moe, dtype=torch.bfloat16, **roomy)
    assert not off and "MoE" in why  # transformers' experts block, which finds the experts hit on the host
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (9, 0))
    slimtune.add_lora(moe, r=2, alpha=4, finetune_experts=True)  # slimtune's grouped blocks: no host reads
    on, why = auto_graphs.decide(cfg, moe, dtype=torch.bfloat16, **roomy)
    assert on, why
    media, _ = slimtune.load_model(tiny_dir("e2b"), dtype=torch.float32, device="cpu")
    off, why = auto_graphs.decide(cfg, media, dtype=torch.bfloat16, **roomy)
    assert not off and "multimodal" in why


def test_the_planner_predicts_with_graphs_for_auto(tiny_dir, tmp_path):
    model = str(tiny_dir("e2b", text_only=True))
    peak = auto_graphs.predicted_peak_gib(_cfg(tmp_path, model=model, max_seq_length=256))
    from slimtune.memory.train_plan import plan_for_config

    eager = plan_for_config(_cfg(tmp_path, model=model, max_seq_length=256, cuda_graphs=False), world_size=1)
    assert peak is not None and peak > eager.predicted_gib  # the graph's pool is counted
    assert auto_graphs.predicted_peak_gib(_cfg(tmp_path, model=str(tmp_path / "missing"))) is None
    # the random-weights loader's spec is the geometry it builds (a GPU run of random:e2b once stayed eager here)
    geometry = auto_graphs.predicted_peak_gib(_cfg(tmp_path, model="e2b", max_seq_length=256))
    assert geometry is not None
    assert auto_graphs.predicted_peak_gib(_cfg(tmp_path, model="random:e2b", max_seq_length=256)) == geometry


@pytest.mark.parametrize("decision", [True, False])
def test_the_trainer_follows_the_decision(tiny_dir, tmp_path, monkeypatch, one_thread, decision):
    built = []

    class Counting(loop.GraphSteps):
        def __init__(self, *a, **kw):
            built.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(loop, "GraphSteps", Counting)
    monkeypatch.setattr(auto_graphs, "decide", lambda *_a, **_kw: (decision, "test"))
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    train(TrainConfig(model=str(tiny_dir("e2b", text_only=True)), data=str(data), output=str(tmp_path / "r"),
                      max_steps=2, batch_size=2, max_seq_length=96, lora_r=4, device="cpu", packing=True),
          log=lambda *_: None)
    assert bool(built) is decision


def test_the_loops_lines_reach_the_callers_log(tiny_dir, tmp_path, one_thread):
    # The loop's messages (the graphs decision among them) once went to stdout instead of train()'s log callback,
    # so API users and the GPU test below never saw them.
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    lines: list[str] = []
    train(TrainConfig(model=str(tiny_dir("e2b", text_only=True)), data=str(data), output=str(tmp_path / "r"),
                      max_steps=2, batch_size=2, max_seq_length=96, lora_r=4, device="cpu", packing=True,
                      cuda_graphs=True), log=lambda m, *_: lines.append(str(m)))
    assert any(line.startswith("cuda_graphs: no CUDA device") for line in lines), lines
    assert any(line.startswith("step     2/2") for line in lines), lines


@pytest.mark.parametrize("flags, want", [([], "auto"), (["--cuda-graphs"], True), (["--no-cuda-graphs"], False)])
def test_flags_and_yaml_set_the_three_values(tmp_path, flags, want):
    from slimtune.cli.main import build_parser
    from slimtune.train.config_io import resolve_config

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", str(tmp_path), *flags])
    assert getattr(args, "cuda_graphs", "auto") == want  # unset flags leave the dataclass default
    (tmp_path / "run.yaml").write_text(f"model: m\ndata: d\noutput: {tmp_path}\ncuda_graphs: {str(want).lower()}\n")
    assert resolve_config(tmp_path / "run.yaml").cuda_graphs == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packing", [True, False])
def test_default_run_captures_on_a_gpu_and_trains_like_eager(tiny_dir, tmp_path, packing):
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    base = dict(model=str(tiny_dir("e2b", text_only=True)), data=str(data), max_steps=8, lr=1e-3, batch_size=2,
                max_seq_length=128, lora_r=4, seed=0, packing=packing)
    lines: list[str] = []
    auto = train(TrainConfig(output=str(tmp_path / "auto"), **base), log=lambda m, *_: lines.append(str(m)))
    eager = train(TrainConfig(output=str(tmp_path / "eager"), cuda_graphs=False, **base), log=lambda *_: None)
    assert any(line.startswith("cuda_graphs auto: on") for line in lines), lines
    # bf16, and the captured step drops the all-ones mask and scores every row: close, not bit-identical
    assert [r["loss"] for r in auto.history] == pytest.approx([r["loss"] for r in eager.history], rel=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU (torch's grouped GEMM is sync-free there)")
def test_a_moe_qlora_run_with_expert_lora_captures_and_trains_like_eager(tiny_dir, tmp_path):
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    base = dict(model=str(tiny_dir("26b-a4b", text_only=True)), data=str(data), max_steps=6, lr=1e-3, batch_size=2,
                max_seq_length=128, lora_r=4, seed=0, packing=True, load_in_4bit=True, finetune_experts=True)
    lines: list[str] = []
    auto = train(TrainConfig(output=str(tmp_path / "auto"), **base), log=lambda m, *_: lines.append(str(m)))
    eager = train(TrainConfig(output=str(tmp_path / "eager"), cuda_graphs=False, **base), log=lambda *_: None)
    assert any(line.startswith("cuda_graphs auto: on") for line in lines), lines
    assert [r["loss"] for r in auto.history] == pytest.approx([r["loss"] for r in eager.history], rel=2e-2)
