"""Tiny Gemma 4 checkpoints, the variant geometry table and the tiny tokenizer.

Real geometries are checked against the parameter counts in the architecture notes (§2) on the meta device;
tiny folders are written, reloaded with plain transformers and must keep each variant's structure.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Gemma4AudioFeatureExtractor,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessorPil,
)

from slimtune.errors import ConfigError
from slimtune.models import tokenizer_build
from slimtune.models.geometry import VARIANTS, build_config, real_audio_config_kwargs, real_text_config_kwargs
from slimtune.models.tiny import build_tiny_model, write_tiny_model
from slimtune.models.tokenizer_build import (
    SPECIAL_TOKENS,
    ProcessorUnavailableError,
    build_processor,
    build_tokenizer,
    processor_config_dict,
)

# ---------------------------------------------------------------- released geometry (meta device)

# (total, text) parameters from the architecture notes §2 (tied lm_head and buffers not counted).
REAL_COUNTS = {
    "e2b": (5_104_297_504, 4_628_569_344),
    "e4b": (7_941_100_832, 7_463_013_376),
    "26b-a4b": (25_805_933_872, 25_233_141_760),
    "31b": (31_273_086_512, 30_697_345_280),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_real_geometry_parameter_counts_match_the_release(variant):
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(build_config(variant, tiny=False, text_only=False))
    total, text = REAL_COUNTS[variant]
    assert _count(model.model.language_model) == text
    assert _count(model) == total


def test_real_e2b_kv_sharing_and_double_wide_layout():
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(build_config("e2b", tiny=False, text_only=False))
    layers = model.model.language_model.layers
    full = [i for i, t in enumerate(model.config.text_config.layer_types) if t == "full_attention"]
    assert full == list(range(4, 35, 5))
    consumers = [i for i, layer in enumerate(layers) if layer.self_attn.is_kv_shared_layer]
    assert consumers == list(range(15, 35))
    assert [i for i, layer in enumerate(layers) if layer.self_attn.store_full_length_kv] == [13, 14]
    assert layers[14].mlp.gate_proj.out_features == 6144 and layers[15].mlp.gate_proj.out_features == 12288
    assert layers[4].self_attn.q_proj.out_features == 8 * 512  # full layers use global_head_dim


def test_real_kwargs_are_fresh_copies_and_audio_only_on_small_variants():
    a = real_text_config_kwargs("e2b")
    a["rope_parameters"]["full_attention"]["rope_theta"] = 1.0
    assert real_text_config_kwargs("e2b")["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert real_audio_config_kwargs("e2b") is not None and real_audio_config_kwargs("31b") is None
    with pytest.raises(ConfigError, match="e3b"):
        build_config("e3b", tiny=True, text_only=True)


# ---------------------------------------------------------------- tiny folders keep each variant's structure


def _text_model(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def _assert_structure(variant: str, model) -> None:
    cfg = model.config.get_text_config()
    layers = _text_model(model).layers
    kinds = cfg.layer_types
    assert cfg.sliding_window <= 32 and "full_attention" in kinds and "sliding_attention" in kinds
    assert cfg.final_logit_softcapping == 30.0
    full = kinds.index("full_attention")
    sliding = kinds.index("sliding_attention")
    assert layers[full].self_attn.head_dim == 2 * layers[sliding].self_attn.head_dim  # global_head_dim
    assert cfg.rope_parameters["full_attention"]["rope_type"] == "proportional"

    consumers = [i for i, layer in enumerate(layers) if layer.self_attn.is_kv_shared_layer]
    has_ple = variant in ("e2b", "e4b")
    assert (cfg.hidden_size_per_layer_input > 0) == has_ple
    assert hasattr(_text_model(model), "embed_tokens_per_layer") == has_ple
    if variant in ("e2b", "e4b"):
        first_consumer = len(kinds) - cfg.num_kv_shared_layers
        assert cfg.num_kv_shared_layers > 0 and consumers == list(range(first_consumer, len(kinds)))
        assert not hasattr(layers[consumers[0]].self_attn, "k_proj")  # consumers own no K/V weights
        producers = {kinds[i] for i in range(consumers[0])}
        assert {kinds[i] for i in consumers} <= producers  # each consumed layer type has a producer
    else:
        assert cfg.num_kv_shared_layers == 0 and consumers == []
    width = cfg.intermediate_size
    if variant == "e2b":
        assert layers[consumers[0]].mlp.gate_proj.out_features == 2 * width  # double-wide in shared layers
        assert layers[0].mlp.gate_proj.out_features == width
    else:
        assert {layer.mlp.gate_proj.out_features for layer in layers} == {width}
    k_eq_v = variant in ("26b-a4b", "31b")
    assert cfg.attention_k_eq_v == k_eq_v
    assert (layers[full].self_attn.v_proj is None) == k_eq_v and layers[sliding].self_attn.v_proj is not None
    moe = variant == "26b-a4b"
    assert cfg.enable_moe_block == moe and hasattr(layers[0], "experts") == moe
    if moe:
        assert layers[0].experts.gate_up_proj.shape[0] == cfg.num_experts >= 4 and cfg.top_k_experts == 2


@pytest.mark.parametrize("text_only", [True, False], ids=["text", "mm"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_folder_reloads_with_plain_transformers_and_keeps_structure(tiny_dir, variant, text_only):
    path = tiny_dir(variant, text_only=text_only)
    auto = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
    model = auto.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == ("Gemma4ForCausalLM" if text_only else "Gemma4ForConditionalGeneration")
    _assert_structure(variant, model)

    # Weights on disk are exactly the seeded in-memory model (and layer_scalar stayed at its default of 1).
    fresh = build_tiny_model(variant=variant, text_only=text_only, seed=0)
    reloaded = model.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(reloaded[name], tensor), name
    assert all(torch.all(layer.layer_scalar == 1) for layer in _text_model(model).layers)

    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == model.config.get_text_config().vocab_size
    assert set(model.generation_config.eos_token_id) == {SPECIAL_TOKENS["<eos>"], SPECIAL_TOKENS["<turn|>"]}
    if not text_only:
        for field, token in [("image_token_id", "<|image|>"), ("boi_token_id", "<|image>"),
                             ("eoi_token_id", "<image|>"), ("audio_token_id", "<|audio|>"),
                             ("boa_token_id", "<|audio>"), ("eoa_token_index", "<audio|>"),
                             ("video_token_id", "<|video|>")]:
            assert getattr(model.config, field) == tok.convert_tokens_to_ids(token), field
        vision = model.config.vision_config
        small = variant in ("e2b", "e4b")
        assert vision.use_clipped_linears == small and vision.standardize == (not small)
        assert (model.config.audio_config is not None) == small

    ids = torch.tensor([tok("The capital of France is Paris. " * 12).input_ids[:96]])
    assert ids.shape[1] > model.config.get_text_config().sliding_window * 2  # crosses the window
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_seed_changes_weights_and_caller_rng_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(variant="31b", text_only=True, seed=0)
    after = torch.rand(3)
    b = build_tiny_model(variant="31b", text_only=True, seed=1)
    assert torch.equal(expected, after)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_tiny_sizes():
    def count(variant, text_only, size):
        with torch.device("meta"):
            return _count(build_tiny_model(variant=variant, text_only=text_only, size=size))

    assert 1_000_000 <= count("e2b", False, "test") <= 3_000_000
    assert all(count(v, False, "demo") < 10_000_000 for v in VARIANTS)
    assert count("e2b", True, "demo") > 2 * count("e2b", True, "test")


def test_write_refuses_non_empty_folder_and_replaces_atomically(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="overwrite=True"):
        write_tiny_model(out, variant="31b", text_only=True)
    assert (out / "keep.txt").exists()
    write_tiny_model(out, variant="31b", text_only=True, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or backup folders left
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        write_tiny_model(tmp_path / "file", text_only=True)
    with pytest.raises(ConfigError, match="size"):
        write_tiny_model(tmp_path / "other", size="huge")
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------- multimodal inputs match the towers


def _front_end(path):
    spec = json.loads((path / "processor_config.json").read_text())
    assert spec["processor_class"] == "Gemma4Processor"
    return (Gemma4ImageProcessorPil.from_dict(spec["image_processor"]),
            Gemma4AudioFeatureExtractor.from_dict(spec["feature_extractor"]))


def _audio_soft_tokens(frame_mask: np.ndarray) -> int:
    """Valid frames after the tower's two stride-2 convolutions (as Gemma4Processor.replace_audio_token)."""
    for _ in range(2):
        frame_mask = frame_mask[::2][: (len(frame_mask) - 1) // 2 + 1]
    return int(frame_mask.sum())


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b"])
def test_saved_front_end_produces_exactly_the_soft_tokens_the_towers_emit(tiny_dir, variant):
    """Torchvision-free: the saved image processor / feature extractor, placeholders expanded by hand."""
    from PIL import Image

    path = tiny_dir(variant, text_only=False)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    image_processor, feature_extractor = _front_end(path)
    image = Image.fromarray((np.random.RandomState(0).rand(30, 50, 3) * 255).astype("uint8"))
    pixels = image_processor(images=[image], return_tensors="pt")
    n_image = int(pixels["num_soft_tokens_per_image"][0])
    parts = ["<|turn>user\nLook: ", "<|image>" + "<|image|>" * n_image + "<image|>"]
    inputs = {"pixel_values": pixels["pixel_values"], "image_position_ids": pixels["image_position_ids"]}
    n_audio = 0
    if model.config.audio_config is not None:
        clip = np.sin(np.linspace(0, 400, 7200)).astype(np.float32)  # 0.45 s at 16 kHz
        feats = feature_extractor([clip], sampling_rate=16_000, return_tensors="pt")
        n_audio = _audio_soft_tokens(feats["input_features_mask"][0].numpy())
        parts.append(" and listen: <|audio>" + "<|audio|>" * n_audio + "<audio|>")
        inputs.update(input_features=feats["input_features"], input_features_mask=feats["input_features_mask"])
    ids = torch.tensor([tok("".join(parts) + "<turn|>\n<|turn>model\nA red square.<turn|>\n").input_ids])
    types = (ids == model.config.image_token_id).long()  # marks the vision block for bidirectional masking

    with torch.no_grad():
        image_out = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
    assert sum(len(x) for x in image_out.pooler_output) == n_image == int((ids == model.config.image_token_id).sum())
    assert n_audio == int((ids == model.config.audio_token_id).sum()) and (n_audio > 0) == (variant == "e2b")
    loss = model(input_ids=ids, mm_token_type_ids=types, labels=ids, **inputs).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.embed_vision.embedding_projection.weight.grad.abs().sum() > 0


def test_auto_processor_chat_with_image_and_audio_runs_the_model(tiny_dir):
    """The full transformers path; Gemma4Processor needs torchvision (for its video processor)."""
    pytest.importorskip("torchvision", exc_type=ImportError)
    from PIL import Image
    from transformers import AutoProcessor

    path = tiny_dir("e2b", text_only=False)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    image = Image.fromarray((np.random.RandomState(1).rand(48, 32, 3) * 255).astype("uint8"))
    clip = np.sin(np.linspace(0, 300, 12_000)).astype(np.float32)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "and"},
                                     {"type": "audio", "audio": clip}]},
        {"role": "assistant", "content": "A picture and a sound."},
    ]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    ids = inputs["input_ids"]
    with torch.no_grad():
        n_image = sum(len(x) for x in model.model.get_image_features(
            inputs["pixel_values"], inputs["image_position_ids"]).pooler_output)
        audio = model.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    assert int((ids == model.config.image_token_id).sum()) == n_image > 0
    assert int((ids == model.config.audio_token_id).sum()) == int(audio.attention_mask.sum()) > 0
    loss = model(**inputs, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_build_processor_agrees_with_the_written_processor_config():
    config = build_config("e2b", tiny=True, text_only=False)
    tok = build_tokenizer()
    expected = processor_config_dict(config)
    assert expected["feature_extractor"]["feature_size"] == config.audio_config.subsampling_conv_channels[0]
    assert expected["image_processor"]["patch_size"] == config.vision_config.patch_size
    try:
        processor = build_processor(tok, config)
    except ProcessorUnavailableError as exc:  # no usable torchvision here: a clear, catchable error
        assert isinstance(exc, ImportError) and "torchvision" in str(exc)
        return
    written = json.loads(processor.to_json_string())
    for key in ("image_processor", "feature_extractor", "image_seq_length", "audio_seq_length"):
        assert written[key] == expected[key], key
    assert expected["video_processor"].items() <= written["video_processor"].items()
    assert "<|turn>" in tok.extra_special_tokens  # the processor's re-registration of <|video|> was undone


# ---------------------------------------------------------------- tokenizer


def test_special_tokens_have_fixed_ids_and_bos_only():
    tok = build_tokenizer()
    assert [SPECIAL_TOKENS[t] for t in ("<pad>", "<eos>", "<bos>", "<unk>")] == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    for token, idx in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == idx
        assert tok("a" + token + "b", add_special_tokens=False).input_ids.count(idx) == 1  # atomic
    ids = tok("hello").input_ids
    assert ids[0] == 2 and ids[-1] != 1
    assert 1000 <= len(tok) <= 2048


def test_tokenizer_round_trips_unicode_and_reloads(tmp_path):
    tok = build_tokenizer()
    rng = random.Random(0)
    alphabet = [chr(c) for c in (*range(32, 127), *range(0xA0, 0x2000), *range(0x3040, 0x30FF), *range(0x4E00, 0x4F00))]
    samples = ["", " leading and  double  spaces ", "tabs\tand\nnewlines\r\n", "émoji 🙂👍🏽 and 𝔘𝔫𝔦",
               "中文 日本語 한국어 العربية", "\x00\x07 control", "What is the capital of France?"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.image_token == "<|image|>" and again.boa_token_id == SPECIAL_TOKENS["<|audio>"]
    assert again.chat_template == tok.chat_template
    for text in samples:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        assert again(text, add_special_tokens=False).input_ids == ids
    # Gemma writes spaces as "▁" (U+2581), so a literal "▁" decodes to a space, as in the released tokenizer.
    assert tok.decode(tok("a\u2581b", add_special_tokens=False).input_ids) == "a b"


def test_tokenizer_training_is_deterministic_and_compresses_the_dataset():
    first = build_tokenizer().get_vocab()
    tokenizer_build._trained_vocab_and_merges.cache_clear()
    assert build_tokenizer().get_vocab() == first
    tok = build_tokenizer()
    text = "The capital of Germany is Berlin. The opposite of hot is cold."
    assert len(tok(text, add_special_tokens=False).input_ids) < len(text) / 3
