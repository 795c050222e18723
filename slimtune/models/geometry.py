"""Gemma 4 variant geometries as data: the released sizes and their tiny look-alikes.

``real_*_config_kwargs`` give the released geometry of each variant (architecture notes §2); ``build_config``
turns them into transformers config objects, either real-sized (build those on the meta device) or tiny.
A tiny config shrinks every width and depth but keeps what makes each variant different: E2B keeps PLE,
KV sharing and the double-wide MLP; E4B PLE and KV sharing; 26B-A4B MoE and ``attention_k_eq_v``; 31B
``attention_k_eq_v``; all keep the sliding/full pattern (with a window short enough that test sequences
cross it), ``global_head_dim = 2 * head_dim``, proportional RoPE on full layers and the logit softcap.

Only config fields that transformers 5.17 already accepts are used, so the tiny folders load on 5.17 too.
"""

from __future__ import annotations

from typing import Any

from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

from slimtune.errors import ConfigError

VARIANTS: tuple[str, ...] = ("e2b", "e4b", "26b-a4b", "31b")
RANDOM_PREFIX = "random:"
"""``random:<variant>`` names random weights of that geometry (slimtune.models.loader.load_random_model)."""
TINY_SIZES: tuple[str, ...] = ("test", "demo")

_SLIDING, _FULL = "sliding_attention", "full_attention"

# Per variant: layer-type period (sliding layers then one full layer), whether it has PLE / KV sharing /
# double-wide MLP / k_eq_v / MoE, and its vision tower. Real and tiny configs both read this table.
_STRUCTURE: dict[str, dict[str, Any]] = {
    "e2b": {"period": 5, "ple": True, "kv_shared": True, "double_wide": True, "k_eq_v": False, "moe": False,
            "tower": "small", "audio": True, "bidirectional": None},
    "e4b": {"period": 6, "ple": True, "kv_shared": True, "double_wide": False, "k_eq_v": False, "moe": False,
            "tower": "small", "audio": True, "bidirectional": None},
    "26b-a4b": {"period": 6, "ple": False, "kv_shared": False, "double_wide": False, "k_eq_v": True, "moe": True,
                "tower": "large", "audio": False, "bidirectional": "vision"},
    "31b": {"period": 6, "ple": False, "kv_shared": False, "double_wide": False, "k_eq_v": True, "moe": False,
            "tower": "large", "audio": False, "bidirectional": "vision"},
}  # fmt: skip

# Released text geometry (notes §2). Fields not listed here come from _STRUCTURE or _COMMON_TEXT.
_REAL_TEXT: dict[str, dict[str, Any]] = {
    "e2b": {"hidden_size": 1536, "num_hidden_layers": 35, "num_attention_heads": 8, "num_key_value_heads": 1,
            "num_global_key_value_heads": 1, "intermediate_size": 6144, "hidden_size_per_layer_input": 256,
            "num_kv_shared_layers": 20, "sliding_window": 512, "max_position_embeddings": 131_072},
    "e4b": {"hidden_size": 2560, "num_hidden_layers": 42, "num_attention_heads": 8, "num_key_value_heads": 2,
            "num_global_key_value_heads": 2, "intermediate_size": 10240, "hidden_size_per_layer_input": 256,
            "num_kv_shared_layers": 18, "sliding_window": 512, "max_position_embeddings": 131_072},
    "26b-a4b": {"hidden_size": 2816, "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8,
                "num_global_key_value_heads": 2, "intermediate_size": 2112, "hidden_size_per_layer_input": 0,
                "num_kv_shared_layers": 0, "sliding_window": 1024, "max_position_embeddings": 262_144,
                "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704},
    "31b": {"hidden_size": 5376, "num_hidden_layers": 60, "num_attention_heads": 32, "num_key_value_heads": 16,
            "num_global_key_value_heads": 4, "intermediate_size": 21504, "hidden_size_per_layer_input": 0,
            "num_kv_shared_layers": 0, "sliding_window": 1024, "max_position_embeddings": 262_144},
}  # fmt: skip

_COMMON_TEXT: dict[str, Any] = {
    "vocab_size": 262_144,
    "vocab_size_per_layer_input": 262_144,
    "head_dim": 256,
    "global_head_dim": 512,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "rope_parameters": {
        _SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        _FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    },
}

_REAL_VISION: dict[str, dict[str, Any]] = {
    "small": {"hidden_size": 768, "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 12,
              "head_dim": 64, "intermediate_size": 3072, "use_clipped_linears": True, "standardize": False},
    "large": {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
              "head_dim": 72, "intermediate_size": 4304, "use_clipped_linears": False, "standardize": True},
}  # fmt: skip
_COMMON_VISION: dict[str, Any] = {"patch_size": 16, "pooling_kernel_size": 3, "position_embedding_size": 10_240}

_REAL_AUDIO: dict[str, Any] = {
    "hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 8, "subsampling_conv_channels": [128, 32],
    "conv_kernel_size": 5, "attention_chunk_size": 12, "attention_context_left": 13, "attention_context_right": 0,
    "attention_logit_cap": 50.0, "residual_weight": 0.5, "output_proj_dims": 1536, "hidden_act": "silu",
    "use_clipped_linears": True,
}  # fmt: skip

# Released special-token ids of the 262 K vocabulary (notes §3.3).
_REAL_MM_TOKEN_IDS: dict[str, int] = {
    "image_token_id": 258_880, "audio_token_id": 258_881, "video_token_id": 258_884, "boi_token_id": 255_999,
    "eoi_token_id": 258_882, "boa_token_id": 256_000, "eoa_token_index": 258_883,
}  # fmt: skip

# Tiny sizes. "test" is the smallest that keeps every structural feature; "demo" is bigger for the README
# run but stays under 10 M parameters. Depth is two periods of the variant's layer pattern; the last
# `kv_shared` layers are KV consumers, chosen so both layer types still have a producer before them.
_TINY: dict[str, dict[str, Any]] = {
    "test": {"hidden": 128, "heads": 4, "head_dim": 32, "ffn": 256, "moe_ffn": 64, "experts": 4, "ple": 16,
             "window": 16, "kv_shared": 4, "v_hidden": 32, "v_layers": 2, "v_heads": 2, "v_ffn": 64,
             "a_hidden": 32, "a_layers": 2, "a_heads": 2, "a_channels": [32, 8], "a_out": 64},
    "demo": {"hidden": 192, "heads": 4, "head_dim": 64, "ffn": 384, "moe_ffn": 96, "experts": 4, "ple": 32,
             "window": 32, "kv_shared": 4, "v_hidden": 64, "v_layers": 2, "v_heads": 2, "v_ffn": 128,
             "a_hidden": 64, "a_layers": 2, "a_heads": 2, "a_channels": [32, 8], "a_out": 128},
}  # fmt: skip
_TINY_PATCH_SIZE = 4  # 4x4 patches keep the vision tower's input small (48 values per patch)
_TINY_POSITION_EMBEDDINGS = 256  # >= longest patch row/column the processor can produce at 70 soft tokens
_TINY_MAX_POSITIONS = 4096


def _check_variant(variant: str) -> dict[str, Any]:
    if variant not in _STRUCTURE:
        raise ConfigError(f"variant={variant!r} is not a Gemma 4 variant; use one of {', '.join(VARIANTS)}.")
    return _STRUCTURE[variant]


def _layer_types(period: int, num_layers: int) -> list[str]:
    """Sliding layers with every `period`-th layer full, the last layer always full (as released)."""
    return [_FULL if (i + 1) % period == 0 else _SLIDING for i in range(num_layers)]


def real_text_config_kwargs(variant: str) -> dict[str, Any]:
    """Keyword arguments for ``Gemma4TextConfig`` with the released geometry of ``variant``.

    Args:
        variant: One of ``VARIANTS``.

    Returns:
        A fresh dict (safe to modify), including ``layer_types`` and both RoPE settings.

    Raises:
        ConfigError: Unknown variant.
    """
    structure = _check_variant(variant)
    real = _REAL_TEXT[variant]
    kwargs: dict[str, Any] = {**_COMMON_TEXT, **real}
    kwargs["rope_parameters"] = {k: dict(v) for k, v in _COMMON_TEXT["rope_parameters"].items()}
    kwargs["layer_types"] = _layer_types(structure["period"], real["num_hidden_layers"])
    kwargs["attention_k_eq_v"] = structure["k_eq_v"]
    kwargs["use_double_wide_mlp"] = structure["double_wide"]
    kwargs["enable_moe_block"] = structure["moe"]
    kwargs["use_bidirectional_attention"] = structure["bidirectional"]
    return kwargs


def real_vision_config_kwargs(variant: str) -> dict[str, Any]:
    """Keyword arguments for ``Gemma4VisionConfig``: the small tower (E2B/E4B) or the large one (26B/31B)."""
    structure = _check_variant(variant)
    return {**_COMMON_VISION, **_REAL_VISION[structure["tower"]]}


def real_audio_config_kwargs(variant: str = "e2b") -> dict[str, Any] | None:
    """Keyword arguments for ``Gemma4AudioConfig`` (E2B and E4B); ``None`` for variants without audio."""
    if not _check_variant(variant)["audio"]:
        return None
    return {**_REAL_AUDIO, "subsampling_conv_channels": list(_REAL_AUDIO["subsampling_conv_channels"])}


def _tiny_text_kwargs(variant: str, size: str, vocab_size: int) -> dict[str, Any]:
    structure, t = _STRUCTURE[variant], _TINY[size]
    num_layers = 2 * structure["period"]
    kwargs = real_text_config_kwargs(variant)
    kwargs.update(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        hidden_size=t["hidden"],
        num_hidden_layers=num_layers,
        layer_types=_layer_types(structure["period"], num_layers),
        num_attention_heads=t["heads"],
        head_dim=t["head_dim"],
        global_head_dim=2 * t["head_dim"],
        # Keep each variant's GQA flavour: E2B one KV head, the others two; k_eq_v variants one on full layers.
        num_key_value_heads=1 if variant == "e2b" else 2,
        num_global_key_value_heads=1 if structure["k_eq_v"] or variant == "e2b" else 2,
        intermediate_size=t["ffn"] // 2 if structure["moe"] else t["ffn"],
        hidden_size_per_layer_input=t["ple"] if structure["ple"] else 0,
        num_kv_shared_layers=t["kv_shared"] if structure["kv_shared"] else 0,
        sliding_window=t["window"],
        max_position_embeddings=_TINY_MAX_POSITIONS,
    )
    if structure["moe"]:
        kwargs.update(num_experts=t["experts"], top_k_experts=2, moe_intermediate_size=t["moe_ffn"])
    return kwargs


def _tiny_vision_kwargs(variant: str, size: str) -> dict[str, Any]:
    t = _TINY[size]
    kwargs = real_vision_config_kwargs(variant)
    kwargs.update(
        hidden_size=t["v_hidden"],
        num_hidden_layers=t["v_layers"],
        num_attention_heads=t["v_heads"],
        num_key_value_heads=t["v_heads"],
        head_dim=t["v_hidden"] // t["v_heads"],
        intermediate_size=t["v_ffn"],
        patch_size=_TINY_PATCH_SIZE,
        position_embedding_size=_TINY_POSITION_EMBEDDINGS,
    )
    return kwargs


def _tiny_audio_kwargs(variant: str, size: str) -> dict[str, Any] | None:
    kwargs = real_audio_config_kwargs(variant)
    if kwargs is None:
        return None
    t = _TINY[size]
    # The tower flattens (mel_bins / 4) x channels[1] features and sizes that layer as (channels[0] // 4) x
    # channels[1], so the feature extractor must use channels[0] mel bins (128 in the released model).
    kwargs.update(
        hidden_size=t["a_hidden"],
        num_hidden_layers=t["a_layers"],
        num_attention_heads=t["a_heads"],
        subsampling_conv_channels=list(t["a_channels"]),
        output_proj_dims=t["a_out"],
    )
    return kwargs


def build_config(
    variant: str,
    *,
    tiny: bool,
    text_only: bool,
    size: str = "test",
    vocab_size: int | None = None,
) -> Gemma4Config | Gemma4TextConfig:
    """Build a Gemma 4 config for ``variant``, released-size or tiny.

    Args:
        variant: One of ``VARIANTS``.
        tiny: Shrink every size (keeping the variant's structure); ``False`` gives the released geometry,
            which should only be instantiated under ``torch.device("meta")``.
        text_only: Return a ``Gemma4TextConfig`` (model class ``Gemma4ForCausalLM``) instead of a
            ``Gemma4Config`` with vision (and, for E2B/E4B, audio) sub-configs
            (model class ``Gemma4ForConditionalGeneration``).
        size: Tiny size, ``"test"`` (smallest) or ``"demo"``; ignored when ``tiny`` is false.
        vocab_size: Tiny vocabulary size; defaults to the size of ``build_tokenizer()``'s vocabulary.

    Returns:
        The config. Tiny multimodal configs carry the tiny tokenizer's multimodal token ids.

    Raises:
        ConfigError: Unknown variant or size.

    Example:
        >>> cfg = build_config("e2b", tiny=True, text_only=True)
        >>> cfg.num_kv_shared_layers > 0 and cfg.hidden_size_per_layer_input > 0
        True
    """
    _check_variant(variant)
    if tiny:
        if size not in _TINY:
            raise ConfigError(f"size={size!r} is not a tiny size; use one of {', '.join(TINY_SIZES)}.")
        from slimtune.models.tokenizer_build import build_tokenizer, multimodal_token_ids

        vocab = vocab_size if vocab_size is not None else len(build_tokenizer())
        text_kwargs = _tiny_text_kwargs(variant, size, vocab)
        vision_kwargs = _tiny_vision_kwargs(variant, size)
        audio_kwargs = _tiny_audio_kwargs(variant, size)
        token_ids = multimodal_token_ids()
    else:
        text_kwargs = real_text_config_kwargs(variant)
        vision_kwargs = real_vision_config_kwargs(variant)
        audio_kwargs = real_audio_config_kwargs(variant)
        token_ids = dict(_REAL_MM_TOKEN_IDS)

    text_config = Gemma4TextConfig(**text_kwargs)
    if text_only:
        return text_config
    return Gemma4Config(
        text_config=text_config,
        vision_config=Gemma4VisionConfig(**vision_kwargs),
        audio_config=Gemma4AudioConfig(**audio_kwargs) if audio_kwargs is not None else None,
        **token_ids,
    )


__all__ = [
    "TINY_SIZES",
    "VARIANTS",
    "build_config",
    "real_audio_config_kwargs",
    "real_text_config_kwargs",
    "real_vision_config_kwargs",
]
