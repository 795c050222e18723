"""Expert LoRA (finetune_experts) on the tiny 26B-A4B: PEFT parity both ways, gradients, training, files."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import slimtune
from slimtune.adapt.adapter_io import adapter_parameters, adapter_state_dict
from slimtune.adapt.experts import LoraExperts, experts_modules
from slimtune.adapt.lora import lora_modules
from slimtune.errors import ConfigError


def _reference(path):
    import transformers

    return transformers.Gemma4ForCausalLM.from_pretrained(path, dtype=torch.float32)


def _ids(model, n=2, t=40, seed=1):
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(5, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _randomize_b(named_params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in named_params:
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def moe_path(tiny_dir):
    return tiny_dir("26b-a4b", text_only=True)


def _saved_with_logits(ours, folder):
    """Randomize our adapter's B, save it to `folder`; returns (ids, our logits on them, adapter_config.json)."""
    _randomize_b(ours.named_parameters())
    ids = _ids(ours)
    with torch.no_grad():
        expect = ours(input_ids=ids).logits
    slimtune.save_adapter(ours, folder)
    return ids, expect, json.loads((folder / "adapter_config.json").read_text())


def _peft_logits(base, folder, ids):
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return peft_model, peft_model(input_ids=ids).logits


def _ours(path, load_in_4bit=False, **kw):
    model, _ = slimtune.load_model(path, dtype="float32", device="cpu", load_in_4bit=load_in_4bit)
    slimtune.add_lora(model, r=4, alpha=8, finetune_experts=True, **kw)
    return model


def test_add_lora_puts_peft_shaped_factors_on_every_expert_block(moe_path):
    model = _ours(moe_path)
    blocks = experts_modules(model)
    n_layers = model.config.num_hidden_layers
    assert len(blocks) == n_layers and model.slimtune_lora.expert_targets == list(blocks)
    block = next(iter(blocks.values()))
    e, two_i, h = block.base_layer.gate_up_proj.shape
    i = block.base_layer.down_proj.shape[2]
    gu, dn = block.adapters["gate_up_proj"], block.adapters["down_proj"]
    # PEFT ParamWrapper: A (r·E, in), B (out, r·E); gate_up (E, 2I, H) has in=H, out=2I
    assert gu.lora_A.shape == (4 * e, h) and gu.lora_B.shape == (two_i, 4 * e)
    assert dn.lora_A.shape == (4 * e, i) and dn.lora_B.shape == (h, 4 * e)
    assert gu.lora_A.dtype == torch.float32 and not gu.lora_B.any()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert any(".adapters.down_proj.lora_B" in n for n in trainable)
    # default stays off: only linears
    plain, _ = slimtune.load_model(moe_path, dtype="float32", device="cpu")
    slimtune.add_lora(plain, r=4)
    assert not experts_modules(plain) and lora_modules(plain)


def test_our_expert_adapter_loads_in_peft(moe_path, tmp_path):
    ours = _ours(moe_path)
    ids, expect, cfg = _saved_with_logits(ours, tmp_path / "ad")
    assert cfg["target_parameters"][:2] == ["model.layers.0.experts.gate_up_proj", "model.layers.0.experts.down_proj"]
    base = _reference(moe_path).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
    peft_model, got = _peft_logits(base, tmp_path / "ad", ids)
    assert (expect - before).abs().max() > 0.1  # the expert deltas matter
    assert (expect - got).abs().max() <= 1e-5
    wrappers = [m for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrappers) == 2 * len(experts_modules(ours))


@pytest.mark.parametrize("params", [("experts.gate_up_proj", "experts.down_proj"), ("experts.down_proj",)])
def test_peft_expert_adapter_loads_in_ours(moe_path, tmp_path, params):
    ref = _reference(moe_path)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=list(params),
                     rank_pattern={"experts.down_proj": 2}, alpha_pattern={"experts.down_proj": 3})
    peft_model = get_peft_model(ref, cfg)
    _randomize_b(peft_model.named_parameters())
    peft_model.save_pretrained(str(tmp_path / "peft"))
    peft_model.eval()
    ours, _ = slimtune.load_model(moe_path, dtype="float32", device="cpu")
    ids = _ids(ours)
    with torch.no_grad():
        expect = peft_model(input_ids=ids).logits
        slimtune.load_adapter(ours, tmp_path / "peft")
        got = ours(input_ids=ids).logits
    assert (expect - got).abs().max() <= 1e-5
    block = next(iter(experts_modules(ours).values()))
    assert list(block.adapters) == [p.split(".")[-1] for p in params]
    assert block.adapters["down_proj"].r == 2 and block.adapters["down_proj"].alpha == 3
    assert len(lora_modules(ours)) == sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A")
                                          for m in peft_model.modules()) > 0


def test_expert_gradients_match_peft(moe_path, tmp_path):
    ours = _ours(moe_path)
    _randomize_b(ours.named_parameters())
    slimtune.save_adapter(ours, tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(_reference(moe_path), str(tmp_path / "ad"), is_trainable=True)
    ids = _ids(ours, t=24)
    ours.train(), peft_model.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    peft_grads = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    checked = 0
    for key, param in adapter_parameters(ours).items():
        if ".experts." not in key:
            continue
        g, ref = param.grad, peft_grads[key]
        assert g is not None and g.abs().max() > 0, key
        assert (g - ref).norm() <= 1e-4 * ref.norm(), (key, ((g - ref).norm() / ref.norm()).item())
        checked += 1
    assert checked == 4 * len(experts_modules(ours))
    assert all(p.grad is None for n, p in ours.named_parameters() if not p.requires_grad)


def test_bf16_autocast_with_checkpointing(moe_path):
    from slimtune.train.run import enable_checkpointing

    ids = _ids(_ours(moe_path), t=24)
    runs = {}
    for autocast, checkpointing in ((False, False), (True, False), (True, True)):
        model = _ours(moe_path)
        _randomize_b(model.named_parameters())
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        block = next(iter(experts_modules(model).values()))
        grad = torch.cat([block.adapters[p].lora_A.grad.flatten() for p in block.adapters])
        assert block.adapters["gate_up_proj"].lora_A.grad.dtype == torch.float32 and grad.abs().max() > 0
        assert block.base_layer.gate_up_proj.grad is None and block.base_layer.gate_up_proj.dtype == torch.float32
        runs[(autocast, checkpointing)] = loss.item(), grad
    # bf16 may route some tokens to other experts than fp32 does, so only the loss is compared with fp32;
    # non-reentrant checkpointing recomputes the same routing and must give the same gradients
    assert abs(runs[(True, False)][0] - runs[(False, False)][0]) <= 0.02 * runs[(False, False)][0]
    assert torch.allclose(runs[(True, True)][1], runs[(True, False)][1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["16bit-experts", "nf4-experts"])
def test_training_steps_lower_the_loss(moe_path, load_in_4bit):
    model = _ours(moe_path, load_in_4bit=load_in_4bit)
    ids = _ids(model, n=4, t=32, seed=3)
    experts = [p for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in experts]
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".packed")}  # NF4 expert codes
    assert bool(frozen) == load_in_4bit
    losses = []
    model.train()
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(not torch.equal(b, p) for b, p in zip(before, experts))  # expert factors train too
    buffers = dict(model.named_buffers())
    assert all(torch.equal(buffers[n], b) for n, b in frozen.items())  # the NF4 base stays frozen


def test_save_load_round_trip(moe_path, tmp_path):
    ours = _ours(moe_path)
    _randomize_b(ours.named_parameters(), seed=5)
    ids = _ids(ours)
    with torch.no_grad():
        expect = ours(input_ids=ids).logits
    slimtune.save_adapter(ours, tmp_path / "ad")
    again, _ = slimtune.load_model(moe_path, dtype="float32", device="cpu")
    slimtune.load_adapter(again, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expect)
    a, b = adapter_state_dict(ours), adapter_state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("experts.base_layer.lora_A.weight") for k in a)
    # checkpoint resume copies expert factors back too
    from slimtune.train.checkpoint import restore_adapter

    fresh = _ours(moe_path)
    restore_adapter(fresh, tmp_path / "ad")
    assert all(torch.equal(a[k], v) for k, v in adapter_state_dict(fresh).items())


def test_invalid_settings_are_refused(tiny_dir, moe_path):
    model, _ = slimtune.load_model(moe_path, dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="dropout=0"):
        slimtune.add_lora(model, dropout=0.1, finetune_experts=True)
    dense, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="no MoE expert blocks"):
        slimtune.add_lora(dense, finetune_experts=True)
    slimtune.add_lora(model, finetune_experts=True, layers_to_transform=[0])
    assert list(experts_modules(model)) == ["model.layers.0.experts"]
    with pytest.raises(ConfigError, match="already has LoRA"):
        slimtune.add_lora(model, finetune_experts=True)
    assert isinstance(model.model.layers[0].experts, LoraExperts)
    assert not isinstance(model.model.layers[1].experts, LoraExperts)


def test_cli_train_resume_and_chat_with_finetune_experts(moe_path, tmp_path, capsys):
    from pathlib import Path

    import yaml

    from slimtune.cli.main import main

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    run = tmp_path / "run"
    args = ["train", "--model", str(moe_path), "--data", str(data), "--output", str(run), "--lora-r", "4",
            "--batch-size", "2", "--max-seq-length", "48", "--save-steps", "1", "--finetune-experts"]
    assert main(args + ["--max-steps", "2"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["finetune_experts"] is True
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] and cfg["target_modules"]
    # resumes from the step-1 checkpoint: restores expert factors and their AdamW state, redoes step 2
    assert main(args + ["--max-steps", "2", "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][-1] == 2
    capsys.readouterr()
    assert main(["chat", "--model", str(moe_path), "--adapter", str(run / "adapter"), "--prompt", "Hi",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_text_only_load_saves_multimodal_names_peft_applies(tiny_dir, tmp_path):
    """26B-A4B ships as a multimodal checkpoint: a text_only run's expert adapter must fit the full model."""
    import transformers

    path = tiny_dir("26b-a4b", text_only=False)
    ours, _ = slimtune.load_model(path, dtype="float32", device="cpu", text_only=True)
    slimtune.add_lora(ours, r=4, alpha=8, finetune_experts=True)
    ids, expect, cfg = _saved_with_logits(ours, tmp_path / "ad")
    assert cfg["target_parameters"][0] == "model.language_model.layers.0.experts.gate_up_proj"
    full = transformers.Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    _, got = _peft_logits(full, tmp_path / "ad", ids)
    assert (expect - got).abs().max() <= 1e-5
    again, _ = slimtune.load_model(path, dtype="float32", device="cpu", text_only=True)
    slimtune.load_adapter(again, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expect)


def test_memory_planner_counts_expert_lora(moe_path, tmp_path):
    from pathlib import Path

    from slimtune.memory.model_shape import read_model_shape
    from slimtune.memory.planner import predict
    from slimtune.memory.train_plan import plan_for_config
    from slimtune.train.config import TrainConfig

    plain, experts = read_model_shape("26b-a4b"), read_model_shape("26b-a4b", finetune_experts=True)
    extra = sum(16 * (i + o) for i, o in experts.lora_in_out) - sum(16 * (i + o) for i, o in plain.lora_in_out)
    # 30 layers × 128 experts × r16 × ((2816 + 1408) + (704 + 2816)): what add_lora creates on the real model
    assert extra == 30 * 128 * 16 * ((2816 + 1408) + (704 + 2816))
    grow = predict("26b-a4b", 1024, finetune_experts=True).predicted_bytes - predict("26b-a4b", 1024).predicted_bytes
    assert grow >= extra * (4 + 8)  # fp32 factors + AdamW states at least
    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    cfg = TrainConfig(model=str(moe_path), data=str(data), output=str(tmp_path / "run"), finetune_experts=True,
                      device="cpu")
    assert plan_for_config(cfg).settings["finetune_experts"] is True
