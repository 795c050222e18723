"""GGUF exports read back with gguf.GGUFReader: tensors (names, shapes, types, values) and gemma4/clip metadata.

Value bounds: BF16 and F16 tensors must equal the merged weights rounded to that type exactly; F32 tensors exactly.
Q8_0 stores each block of 32 as int8 codes q = round(x / d) with d = max|x| / 127, and d itself as fp16, so
|x - q·d16| <= d/2 + 127·|d - d16| <= d·(0.5 + 127·2^-11) = 0.562·d; the tests allow 0.57·d.
"""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from slimtune.export import export
from slimtune.export.checkpoint import Checkpoint
from slimtune.export.gguf_names import mmproj_transform

from .conftest import make_run

Q = gguf.GGMLQuantizationType
Q8_BOUND = 0.57 / 127  # times the block's max |x|


def _files(out):
    files = sorted(p.name for p in out.iterdir())
    assert all(f.endswith(".gguf") for f in files), files
    return files


def _field(reader: gguf.GGUFReader, key: str):
    assert key in reader.fields, f"missing metadata key {key}"
    return reader.fields[key].contents()


def _tensors(reader: gguf.GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def _check_values(t, expected: torch.Tensor, name: str) -> None:
    """Dequantize GGUF tensor `t` and compare with the HF tensor `expected` (already transformed)."""
    expected = expected.float()
    # GGUF records dimensions fastest-first; numpy (and torch) order is the reverse.
    assert list(t.shape)[::-1] == list(expected.shape), name
    got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).float().reshape(expected.shape)
    if t.tensor_type == Q.F32:
        assert torch.equal(got, expected), name
    elif t.tensor_type == Q.BF16:
        assert torch.equal(got, expected.to(torch.bfloat16).float()), name
    elif t.tensor_type == Q.F16:
        assert torch.equal(got, expected.half().float()), name
    elif t.tensor_type == Q.Q8_0:
        blocks = expected.reshape(-1, 32)
        bound = Q8_BOUND * blocks.abs().max(dim=1, keepdim=True).values + 1e-12
        assert bool(((got.reshape(-1, 32) - blocks).abs() <= bound).all()), name
    else:  # pragma: no cover
        raise AssertionError(f"unexpected type {t.tensor_type.name} for {name}")


def _expected_type(name: str, t, big) -> None:
    if len(t.shape) == 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        assert t.tensor_type == Q.F32, (name, t.tensor_type.name)
    elif big == Q.Q8_0 and t.shape[0] % 32:
        assert t.tensor_type == Q.F16, (name, t.tensor_type.name)  # rows not made of whole Q8_0 blocks
    else:
        assert t.tensor_type == big, (name, t.tensor_type.name)


@pytest.fixture(scope="module")
def text_gguf(text_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-text")
    return {q: export(text_run.run_dir, f"gguf-{q}", root / q, progress=False) for q in ("bf16", "q8_0")}


@pytest.mark.parametrize("qtype", ["bf16", "q8_0"])
def test_text_gguf(text_gguf, merged_text, qtype):
    out = text_gguf[qtype]
    big = Q.BF16 if qtype == "bf16" else Q.Q8_0
    assert _files(out) == [f"gemma4-tiny-text-{qtype.upper()}.gguf"]
    reader = gguf.GGUFReader(out / _files(out)[0])
    tensors = _tensors(reader)
    merged = Checkpoint.open(merged_text)
    cfg = merged.config
    n_layers = cfg["num_hidden_layers"]
    first_shared = n_layers - cfg["num_kv_shared_layers"]

    # Names llama.cpp's gemma4 loader looks up (spelled out here, not derived from slimtune's table).
    expected = {"token_embd.weight", "output_norm.weight", "rope_freqs.weight", "per_layer_token_embd.weight",
                "per_layer_model_proj.weight", "per_layer_proj_norm.weight"}
    for i in range(n_layers):
        expected |= {f"blk.{i}.{n}.weight" for n in (
            "attn_norm", "attn_q", "attn_q_norm", "attn_output", "post_attention_norm", "ffn_norm", "ffn_gate",
            "ffn_up", "ffn_down", "post_ffw_norm", "inp_gate", "proj", "post_norm", "layer_output_scale")}
        if i < first_shared:  # KV-shared layers have no K/V weights
            expected |= {f"blk.{i}.attn_k.weight", f"blk.{i}.attn_v.weight", f"blk.{i}.attn_k_norm.weight"}
    assert set(tensors) == expected
    assert len(tensors) == len(merged.tensor_names()) + 1  # every HF tensor (lm_head is tied, not stored) + rope_freqs

    # Values: the merged weights, at the file's precision.
    by_hf = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight",
        "model.layers.9.mlp.gate_proj.weight": f"blk.{n_layers - 1}.ffn_gate.weight",
        "model.layers.0.layer_scalar": "blk.0.layer_output_scale.weight",
        "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
        "model.layers.3.post_per_layer_input_norm.weight": "blk.3.post_norm.weight",
    }
    for hf, name in by_hf.items():
        _check_values(tensors[name], merged.get_tensor(hf), name)
    for name, t in tensors.items():
        _expected_type(name, t, big)
    rope = np.array(tensors["rope_freqs.weight"].data)
    n_rot = int(64 * 0.25 / 2)  # full-attention head 64 in the tiny model, 25% rotated
    assert rope.shape == (32,) and (rope[:n_rot] == 1).all() and (rope[n_rot:] == np.float32(1e30)).all()

    # Metadata llama.cpp needs for gemma4.
    types = cfg["layer_types"]
    assert _field(reader, "general.architecture") == "gemma4"
    assert _field(reader, "general.file_type") == (32 if qtype == "bf16" else 7)
    assert _field(reader, "gemma4.block_count") == n_layers
    assert _field(reader, "gemma4.context_length") == cfg["max_position_embeddings"]
    assert _field(reader, "gemma4.embedding_length") == cfg["hidden_size"]
    ff = cfg["intermediate_size"]
    assert _field(reader, "gemma4.feed_forward_length") == [ff if i < first_shared else 2 * ff for i in range(n_layers)]
    assert _field(reader, "gemma4.attention.head_count") == cfg["num_attention_heads"]
    assert _field(reader, "gemma4.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert _field(reader, "gemma4.attention.key_length") == 64
    assert _field(reader, "gemma4.attention.value_length") == 64
    assert _field(reader, "gemma4.attention.key_length_swa") == cfg["head_dim"]
    assert _field(reader, "gemma4.attention.value_length_swa") == cfg["head_dim"]
    assert _field(reader, "gemma4.attention.sliding_window") == cfg["sliding_window"]
    assert _field(reader, "gemma4.attention.sliding_window_pattern") == [t == "sliding_attention" for t in types]
    assert _field(reader, "gemma4.attention.shared_kv_layers") == cfg["num_kv_shared_layers"]
    assert _field(reader, "gemma4.embedding_length_per_layer_input") == cfg["hidden_size_per_layer_input"]
    assert _field(reader, "gemma4.final_logit_softcapping") == pytest.approx(30.0)
    assert _field(reader, "gemma4.rope.freq_base") == pytest.approx(1e6)
    assert _field(reader, "gemma4.rope.freq_base_swa") == pytest.approx(1e4)
    assert _field(reader, "gemma4.rope.dimension_count") == 64
    assert _field(reader, "gemma4.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    # Tokenizer.
    assert _field(reader, "tokenizer.ggml.model") == "gemma4"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"] == len(_field(reader, "tokenizer.ggml.scores"))
    assert len(_field(reader, "tokenizer.ggml.token_type")) == len(tokens)
    assert tokens[:3] == ["<pad>", "<eos>", "<bos>"] and "<|turn>" in tokens
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")) == (2, 1)
    assert _field(reader, "tokenizer.ggml.padding_token_id") == 0
    assert _field(reader, "tokenizer.chat_template") == (merged_text / "chat_template.jinja").read_text()


def test_multimodal_gguf(mm_run, merged_mm, tmp_path):
    out = export(mm_run.run_dir, "gguf-q8_0", tmp_path / "gguf", progress=False)
    files = _files(out)
    assert len(files) == 2 and files[0].startswith("mmproj-")
    text = gguf.GGUFReader(out / files[1])
    proj = gguf.GGUFReader(out / files[0])
    assert not any(t.name.startswith(("v.", "a.", "mm.")) for t in text.tensors)
    tensors = _tensors(proj)
    merged = Checkpoint.open(merged_mm)
    cfg = merged.config
    tower_keys = [k for k in merged.tensor_names() if k.startswith(("model.vision_tower.", "model.audio_tower.", "model.embed_"))]
    assert len(tensors) == len(tower_keys)

    by_hf = {
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": "v.blk.0.attn_q.weight",  # LoRA-merged
        "model.vision_tower.encoder.layers.1.mlp.down_proj.linear.weight": "v.blk.1.ffn_down.weight",
        "model.vision_tower.patch_embedder.input_proj.weight": "v.patch_embd.weight",
        "model.vision_tower.patch_embedder.position_embedding_table": "v.position_embd.weight",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.input_max": "v.blk.0.attn_q.input_max",
        "model.embed_vision.embedding_projection.weight": "mm.input_projection.weight",
        "model.audio_tower.layers.0.self_attn.q_proj.linear.weight": "a.blk.0.attn_q.weight",
        "model.audio_tower.layers.0.self_attn.per_dim_scale": "a.blk.0.per_dim_scale.weight",
        "model.audio_tower.layers.0.lconv1d.depthwise_conv1d.weight": "a.blk.0.conv_dw.weight",
        "model.audio_tower.layers.1.feed_forward2.ffw_layer_1.linear.weight": "a.blk.1.ffn_up_1.weight",
        "model.audio_tower.subsample_conv_projection.layer0.conv.weight": "a.conv1d.0.weight",
        "model.audio_tower.output_proj.bias": "a.pre_encode.out.bias",
        "model.embed_audio.embedding_projection.weight": "mm.a.input_projection.weight",
    }
    for hf, name in by_hf.items():
        _check_values(tensors[name], mmproj_transform(hf, merged.get_tensor(hf)), name)
    patch = cfg["vision_config"]["patch_size"]
    assert list(tensors["v.patch_embd.weight"].shape)[::-1] == [cfg["vision_config"]["hidden_size"], 3, patch, patch]
    for name in ("v.patch_embd.weight", "v.position_embd.weight", "a.conv1d.0.weight", "a.blk.0.conv_dw.weight"):
        assert tensors[name].tensor_type == Q.F32, name
    scale = merged.get_tensor("model.audio_tower.layers.0.self_attn.per_dim_scale")
    got = np.array(tensors["a.blk.0.per_dim_scale.weight"].data)
    np.testing.assert_allclose(got, torch.nn.functional.softplus(scale).numpy(), rtol=1e-6)

    assert _field(proj, "general.architecture") == "clip"
    assert _field(proj, "clip.has_vision_encoder") is True and _field(proj, "clip.has_audio_encoder") is True
    assert _field(proj, "clip.vision.projector_type") == "gemma4v"
    assert _field(proj, "clip.audio.projector_type") == "gemma4a"
    assert _field(proj, "clip.vision.projection_dim") == cfg["text_config"]["hidden_size"]
    assert _field(proj, "clip.audio.projection_dim") == cfg["text_config"]["hidden_size"]
    assert _field(proj, "clip.vision.embedding_length") == cfg["vision_config"]["hidden_size"]
    assert _field(proj, "clip.vision.block_count") == cfg["vision_config"]["num_hidden_layers"]
    assert _field(proj, "clip.vision.attention.head_count") == cfg["vision_config"]["num_attention_heads"]
    assert _field(proj, "clip.vision.patch_size") == patch
    assert _field(proj, "clip.vision.image_mean") == [0.0, 0.0, 0.0]
    assert _field(proj, "clip.audio.block_count") == cfg["audio_config"]["num_hidden_layers"]
    assert _field(proj, "clip.audio.embedding_length") == cfg["audio_config"]["hidden_size"]
    assert _field(proj, "clip.audio.num_mel_bins") == cfg["audio_config"]["subsampling_conv_channels"][0]


def test_moe_gguf(tiny_dir, tmp_path):
    """26B-A4B layout: experts, router scales, K=V full layers (no attn_v), per-layer KV heads."""
    base = tiny_dir("26b-a4b", text_only=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"], init_lora_weights=False)
    run = make_run(model, base, tmp_path / "run", lora, None)
    out = export(run.run_dir, "gguf-bf16", tmp_path / "gguf", progress=False)
    reader = gguf.GGUFReader(out / _files(out)[0])
    tensors = _tensors(reader)
    cfg = Checkpoint.open(base).config
    n_exp, top_k, moe_ff = cfg["num_experts"], cfg["top_k_experts"], cfg["moe_intermediate_size"]
    full = [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]
    hidden = cfg["hidden_size"]
    assert list(tensors["blk.0.ffn_gate_up_exps.weight"].shape)[::-1] == [n_exp, 2 * moe_ff, hidden]
    assert list(tensors["blk.0.ffn_down_exps.weight"].shape)[::-1] == [n_exp, hidden, moe_ff]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32
    assert list(tensors["blk.0.ffn_down_exps.scale"].shape) == [n_exp]
    assert list(tensors["blk.0.ffn_gate_inp.scale"].shape) == [hidden]
    assert f"blk.{full[0]}.attn_v.weight" not in tensors and "blk.0.attn_v.weight" in tensors
    kv = _field(reader, "gemma4.attention.head_count_kv")
    base_ckpt = Checkpoint.open(base)
    shape = lambda key: base_ckpt.shape_and_dtype(key)[0]
    expected_kv = [
        shape(f"model.layers.{i}.self_attn.k_proj.weight")[0] // shape(f"model.layers.{i}.self_attn.q_norm.weight")[0]
        for i in range(cfg["num_hidden_layers"])
    ]
    assert kv == expected_kv and len(set(kv)) == 2  # K=V full layers use fewer KV heads
    assert _field(reader, "gemma4.expert_count") == n_exp
    assert _field(reader, "gemma4.expert_used_count") == top_k
    assert _field(reader, "gemma4.expert_feed_forward_length") == moe_ff
    for hf, name in {
        "model.layers.0.experts.gate_up_proj": "blk.0.ffn_gate_up_exps.weight",
        "model.layers.0.router.per_expert_scale": "blk.0.ffn_down_exps.scale",
        "model.layers.0.router.scale": "blk.0.ffn_gate_inp.scale",
    }.items():
        _check_values(tensors[name], base_ckpt.get_tensor(hf), name)  # not LoRA-adapted: equal to the base
    shutil.rmtree(out)
