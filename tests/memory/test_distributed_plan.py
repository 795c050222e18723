"""Per-GPU predictions for torchrun runs: FSDP2 saves the sharded share, DDP adds its gradient buckets, one process
is unchanged, the per-GPU budget planner uses the shards, and the trainer prints which prediction it is.

The expected bytes are counted here from the meta model's own module tree (parameters by module, LoRA targets
and NF4 linears as slimtune's adapter and quantizer pick them), not through slimtune.memory.distributed_plan.
"""

from pathlib import Path

import pytest
import torch
import transformers

import slimtune
from slimtune.adapt.inject import select_lora_targets
from slimtune.adapt.quantize import nf4_module_names
from slimtune.errors import ConfigError
from slimtune.memory.estimate import NF4_BYTES_PER_PARAM
from slimtune.memory.planner import MemoryBudgetError, plan_memory, predict
from slimtune.memory.train_plan import apply_memory_plan
from slimtune.models.geometry import build_config
from slimtune.models.registry import family_of
from slimtune.train.config import TrainConfig
from slimtune.train.distributed import DistInfo

GIB = 2**30
BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
# Single-GPU predictions (bytes) before per-GPU planning existed (commit 4e9d94a): world_size 1 must keep them.
BEFORE = {("e4b", 8192, True): 8276093242.88, ("31b", 8192, True): 30371500154.88,
          ("26b-a4b", 2048, False): 52064339066.88}


def _count(geometry: str, load_in_4bit: bool, r: int = 16) -> dict:
    """Bytes by where FSDP2 puts them (default LoRA targets, PLE offloaded, bf16, AdamW), counted from the tree."""
    config = build_config(geometry, tiny=False, text_only=True)
    with torch.device("meta"):
        model = transformers.Gemma4ForCausalLM(config)
    nf4 = set(nf4_module_names(model, family_of(model))) if load_in_4bit else set()
    targets = set(select_lora_targets(model))
    layers = list(model.model.layers)
    in_layer = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    sharded = whole = root = 0.0
    per_layer = [0.0] * len(layers)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or "embed_tokens_per_layer" in name:  # tied lm_head; the PLE table lives on the host
            continue
        seen.add(id(p))
        owner = name.rsplit(".", 1)[0]
        if owner in nf4 and owner not in targets:  # NF4 linears without LoRA, NF4 experts: whole on each GPU
            whole += p.numel() * NF4_BYTES_PER_PARAM
            continue
        size = 0.5 if owner in nf4 else 2  # adapted NF4: only the packed codes are sharded
        whole += p.numel() * (NF4_BYTES_PER_PARAM - 0.5) if owner in nf4 else 0
        sharded += p.numel() * size
        if id(p) in in_layer:
            per_layer[in_layer[id(p)]] += p.numel() * size
        else:
            root += p.numel() * size
    lora = 0
    for name in targets:
        linear = model.get_submodule(name)
        lora += r * (linear.in_features + linear.out_features)
        per_layer[in_layer[id(linear.weight)]] += r * (linear.in_features + linear.out_features) * 4
    return {"sharded": sharded, "whole": whole, "root": root, "largest_layer": max(per_layer), "lora": lora}


@pytest.mark.parametrize("geometry,seq,qlora", list(BEFORE))
def test_one_process_gives_exactly_the_single_gpu_numbers(geometry, seq, qlora, monkeypatch):
    from slimtune.kernels import flash_attention_stored_bwd

    # BEFORE predates the stored attention backward (session 13), whose chunk buffers the plan now adds
    monkeypatch.setattr(flash_attention_stored_bwd, "BUFFER_BUDGET_BYTES", 0)
    plain = predict(geometry, seq, load_in_4bit=qlora, recompute_norms=False)  # BEFORE's (the old default) norms
    assert plain.predicted_bytes == BEFORE[(geometry, seq, qlora)]
    for kind in ("auto", "ddp", "fsdp"):
        one = predict(geometry, seq, load_in_4bit=qlora, world_size=1, distributed=kind, recompute_norms=False)
        assert one.predicted_bytes == plain.predicted_bytes and one.breakdown == plain.breakdown
    assert plain.summary().startswith("memory: predicted peak GPU memory ")


@pytest.mark.parametrize("geometry,seq,qlora", [("31b", 8192, True), ("26b-a4b", 2048, False), ("e4b", 8192, True)])
def test_fsdp_on_two_gpus_saves_half_the_sharded_bytes(geometry, seq, qlora):
    tree = _count(geometry, qlora)
    one = predict(geometry, seq, load_in_4bit=qlora)
    two = predict(geometry, seq, load_in_4bit=qlora, world_size=2, distributed="fsdp")
    b1, b2 = one.breakdown, two.breakdown
    # parameters and optimizer state: half of what FSDP2 shards moves off each GPU (AdamW: 4 + 8 B per LoRA value)
    shardable = tree["sharded"] + tree["lora"] * 12
    held_one = b1["weights"] + b1["ple_table"] + b1["lora_and_optimizer"]
    held_two = b2["weights_sharded"] + b2["weights_whole"] + b2["lora_and_optimizer"]
    assert held_one - held_two == pytest.approx(shardable / 2 / GIB, rel=0.01, abs=0.01)
    assert b2["weights_whole"] == pytest.approx(tree["whole"] / GIB, rel=0.01, abs=0.01)
    # what FSDP2 gathers back: the whole root (not resharded until the backward ends) and two decoder layers
    assert b2["fsdp_root_gathered"] == pytest.approx(tree["root"] / GIB, rel=0.01, abs=0.01)
    assert b2["fsdp_layers_gathered"] == pytest.approx(2 * tree["largest_layer"] / GIB, rel=0.01, abs=0.01)
    # the total: the sharded half (and half the LoRA gradients) saved, the gathered units added, nothing else
    saved = (shardable / 2 + tree["lora"] * 4 / 2 - tree["root"] - 2 * tree["largest_layer"]) / GIB
    if two.phase == "backward" and one.phase == "backward":
        assert one.predicted_gib - two.predicted_gib == pytest.approx(saved, rel=0.02, abs=0.02)
    assert two.predicted_bytes < one.predicted_bytes


def test_fsdp_pads_each_shard_to_whole_rows():
    """Three ranks: a rank-16 LoRA A (16, in) gets ceil(16 / 3) = 6 rows on every rank, not 16 / 3."""
    tree = _count("e2b", True)
    three = predict("e2b", 2048, load_in_4bit=True, world_size=3, distributed="fsdp").breakdown
    config = build_config("e2b", tiny=False, text_only=True)
    with torch.device("meta"):
        model = transformers.Gemma4ForCausalLM(config)
    padded = sum(6 * m.in_features + -(-m.out_features // 3) * 16
                 for m in (model.get_submodule(n) for n in select_lora_targets(model)))
    assert padded > tree["lora"] / 3 * 1.05  # the padding is large enough to see
    assert three["lora_and_optimizer"] == pytest.approx(padded * 12 / GIB, abs=0.0006)


@pytest.mark.parametrize("geometry,seq,qlora", list(BEFORE))
def test_ddp_holds_the_whole_model_plus_a_bucket_copy_of_the_lora_gradients(geometry, seq, qlora):
    one = predict(geometry, seq, load_in_4bit=qlora)
    for kind in ("ddp", "auto"):
        two = predict(geometry, seq, load_in_4bit=qlora, world_size=2, distributed=kind)
        assert two.predicted_bytes >= one.predicted_bytes
        assert two.predicted_gib - one.predicted_gib == pytest.approx(_count(geometry, qlora)["lora"] * 4 / GIB,
                                                                      rel=0.01)
        assert two.breakdown["weights"] == one.breakdown["weights"]


def test_a_per_gpu_budget_fits_under_fsdp_what_one_gpu_cannot():
    with pytest.raises(MemoryBudgetError):
        plan_memory("31b", 8192, 18 * GIB)
    with pytest.raises(MemoryBudgetError):  # DDP keeps the whole model on every GPU
        plan_memory("31b", 8192, 18 * GIB, world_size=2, distributed="ddp")
    plan = plan_memory("31b", 8192, 18 * GIB, world_size=2, distributed="fsdp")
    assert plan.fits and plan.predicted_bytes <= 18 * GIB and plan.settings["load_in_4bit"] is True
    assert "of a 18.00 GiB budget per GPU" in plan.summary()


def test_the_trainer_prints_the_per_gpu_prediction_and_plans_a_per_gpu_budget(monkeypatch):
    """train() under a (faked) 2-process group: the printed line names the GPUs; max_memory is per GPU."""
    import slimtune.train.run as run

    monkeypatch.setattr(run, "init_distributed", lambda device: (DistInfo(rank=0, world_size=2), "cpu"))
    seen = {}
    monkeypatch.setattr(run, "_train", lambda cfg, log, info, device: seen.update(cfg=cfg))
    base = dict(model="31b", data=str(BUNDLED), output="o", max_seq_length=8192, load_in_4bit=True)
    lines = []
    run.train(TrainConfig(**base, distributed="fsdp"), log=lines.append)
    two = predict("31b", 8192, load_in_4bit=True, world_size=2, distributed="fsdp", attention="sdpa")
    assert lines[0].startswith(f"memory: predicted peak per GPU (FSDP2, 2 GPUs): {two.predicted_gib:.2f} GiB")
    lines.clear()
    run.train(TrainConfig(**base, distributed="auto"), log=lines.append)
    assert lines[0].startswith("memory: predicted peak per GPU (DDP, 2 GPUs): ")
    run.train(TrainConfig(**base, distributed="fsdp", max_memory="18GiB"), log=lines.append)
    # planned, not refused: 18 GiB per GPU fits under FSDP2 (one GPU's smallest plan is 20.7 GiB)
    assert seen["cfg"].max_memory == "18GiB" and seen["cfg"].gradient_checkpointing
    assert any("of a 18.00 GiB budget per GPU" in line for line in lines)
    with pytest.raises(ConfigError, match="no settings fit 18.00 GiB"):
        apply_memory_plan(TrainConfig(**base, distributed="fsdp", max_memory="18GiB"), log=lines.append,
                          world_size=1)


def test_world_size_comes_from_torchrun_when_not_given(monkeypatch):
    lines = []
    cfg = TrainConfig(model="e4b", data=str(BUNDLED), output="o", max_seq_length=8192, distributed="fsdp")
    monkeypatch.setenv("WORLD_SIZE", "4")
    apply_memory_plan(cfg, log=lines.append)
    monkeypatch.delenv("WORLD_SIZE")
    apply_memory_plan(cfg, log=lines.append)
    assert lines[0].startswith("memory: predicted peak per GPU (FSDP2, 4 GPUs): ")
    assert lines[-1].startswith("memory: predicted peak GPU memory ")


@pytest.mark.parametrize("settings,message", [
    ({"world_size": 0}, "world_size must be an integer >= 1"),
    ({"world_size": 2.0}, "world_size must be an integer >= 1"),
    ({"world_size": 2, "distributed": "zero3"}, "distributed must be one of"),
    ({"world_size": 2, "cuda_graphs": True, "distributed": "fsdp"}, "cannot capture FSDP2's sharded steps"),
])
def test_bad_distributed_settings_are_refused_clearly(settings, message):
    with pytest.raises(ValueError, match=message):
        predict("e2b", 2048, **settings)


def test_captured_ddp_counts_its_flat_gradient_buffer():
    """Captured DDP steps keep the whole one-GPU footprint plus the flat fp32 buffer they all-reduce (4 B per
    LoRA parameter), like the eager DDP reducer's buckets."""
    one = predict("e4b", 8192, cuda_graphs=True)
    two = predict("e4b", 8192, cuda_graphs=True, world_size=2, distributed="ddp")
    buffer = two.breakdown["ddp_grad_buckets"]
    assert "ddp_grad_buckets" not in one.breakdown
    assert buffer == pytest.approx(one.breakdown["lora_and_optimizer"] * 4 / (4 + 8), rel=1e-3)  # fp32 + AdamW
    assert two.predicted_gib - one.predicted_gib == pytest.approx(buffer, abs=2e-3)


def test_fsdp_plans_keep_room_for_the_measured_under_prediction():
    """26B-A4B LoRA 16-bit under FSDP2 on two H200s peaked 3 % over its estimate: an FSDP2 plan may use only
    FSDP_MARGIN of the budget, so a prediction that just fits the whole budget does not fit."""
    from slimtune.memory.planner import FSDP_MARGIN

    fsdp = predict("26b-a4b", 2048, world_size=2, distributed="fsdp", load_in_4bit=False)
    ddp = predict("e4b", 2048, world_size=2, distributed="ddp")
    assert fsdp.margin == FSDP_MARGIN < 1 and ddp.margin == 1.0
    fsdp.budget_bytes = int(fsdp.predicted_bytes / 0.99)  # 1 % of room: enough without the margin
    assert not fsdp.fits
