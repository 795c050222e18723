"""GGUF key/value metadata for Gemma 4: the text model (``gemma4``), its tokenizer, and the ``clip`` projector.

Keys and values follow what llama.cpp's converter writes for ``Gemma4ForConditionalGeneration`` (read as facts from
``conversion/gemma.py`` / ``conversion/base.py``, 2026); the key strings themselves come from ``gguf.Keys`` via
``GGUFWriter.add_*``. Per-layer geometry is measured from the checkpoint's tensor shapes (see `TextGeometry`)
instead of read from config.json, because transformers 5.24 stores the full-attention head size in
``per_layer_config`` while older configs use ``global_head_dim`` / ``num_global_key_value_heads``.

NOT CONFIRMED against a running llama.cpp: ``rope.dimension_count`` = full head size for the full-attention layers
(llama.cpp expresses the 25% "proportional" rotation through the ``rope_freqs`` tensor, see
`rope_freqs_full`); the audio layer-norm epsilon 1e-5 and ``image_size`` 224 (llama.cpp writes these constants);
audio ``feed_forward_length`` = 4 × hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from slimtune.errors import ExportError

__all__ = ["TextGeometry", "add_mmproj_metadata", "add_text_metadata", "add_tokenizer_metadata", "text_geometry"]

# Gemma 4 chat-control tokens llama.cpp marks USER_DEFINED so they are rendered in the output text (its chat parser
# reads them); everything else keeps the type the HF tokenizer gives it.
VISIBLE_TOKENS = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}


@dataclass
class TextGeometry:
    """Per-layer attention/MLP sizes of the text decoder, measured from tensor shapes.

    Attributes:
        head_dim_swa: head size of sliding-window layers (256 on released models).
        head_dim_full: head size of full-attention layers (512).
        kv_heads: KV heads per layer (consumer layers inherit their producer's).
        ff: MLP width per layer (doubled in KV-shared layers with use_double_wide_mlp).
        sliding: per layer, True for sliding-window attention.
    """

    head_dim_swa: int
    head_dim_full: int
    kv_heads: list[int]
    ff: list[int]
    sliding: list[bool]


def text_geometry(text_cfg: dict[str, Any], shapes: dict[str, list[int]]) -> TextGeometry:
    """Measure per-layer sizes from ``model.layers.N.*`` tensor shapes (``language_model.`` already dropped).

    Raises:
        ExportError: a layer lacks its q_norm or MLP weights, or no layer of some type has a k_proj.
    """
    n = int(text_cfg["num_hidden_layers"])
    types = text_cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    sliding = [t == "sliding_attention" for t in types]
    head_dim, kv, ff = [], [], []
    try:
        for i in range(n):
            p = f"model.layers.{i}."
            head_dim.append(shapes[p + "self_attn.q_norm.weight"][0])
            k = shapes.get(p + "self_attn.k_proj.weight")
            kv.append(k[0] // head_dim[-1] if k else -1)
            ff.append(shapes[p + "mlp.gate_proj.weight"][0])
    except KeyError as exc:
        raise ExportError(f"checkpoint is missing the text tensor {exc.args[0]!r}; is this a Gemma 4 model?") from exc
    # KV-shared consumer layers have no k_proj: they read K/V of the last producer of their own layer type.
    for i in range(n):
        if kv[i] < 0:
            producers = [kv[j] for j in range(i) if sliding[j] == sliding[i] and kv[j] > 0]
            if not producers:
                raise ExportError(f"text layer {i} has no k_proj and no earlier layer of its type to share K/V with")
            kv[i] = producers[-1]
    swa = {h for h, s in zip(head_dim, sliding) if s} or {int(text_cfg.get("head_dim", 256))}
    full = {h for h, s in zip(head_dim, sliding) if not s} or swa
    if len(swa) != 1 or len(full) != 1:
        raise ExportError(f"head sizes vary within one layer type (sliding {swa}, full {full}); not a Gemma 4 layout")
    return TextGeometry(swa.pop(), full.pop(), kv, ff, sliding)


def rope_freqs_full(text_cfg: dict[str, Any], head_dim_full: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp uses for Gemma 4's full-attention layers.

    Full layers rotate only the first ``partial_rotary_factor`` (0.25) of each head ("proportional" RoPE). ggml's
    NeoX RoPE rotates a prefix of the head, so llama.cpp divides the frequencies of the unrotated pairs by a huge
    factor (1e30), which makes their angle 0: factors are 1.0 for the rotated pairs and 1e30 for the rest.
    """
    rope = (text_cfg.get("rope_parameters") or {}).get("full_attention") or {}
    factor = float(rope.get("partial_rotary_factor", 0.25))
    n_rot = int(head_dim_full * factor / 2)
    return np.array([1.0] * n_rot + [1e30] * (head_dim_full // 2 - n_rot), dtype=np.float32)


def _scalar_or_list(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def add_text_metadata(w: gguf.GGUFWriter, text_cfg: dict[str, Any], geo: TextGeometry) -> None:
    """Write the ``gemma4.*`` hyper-parameters."""
    n = int(text_cfg["num_hidden_layers"])
    rope = text_cfg.get("rope_parameters") or {}
    w.add_block_count(n)
    w.add_context_length(int(text_cfg.get("max_position_embeddings", 131072)))
    w.add_embedding_length(int(text_cfg["hidden_size"]))
    w.add_feed_forward_length(_scalar_or_list(geo.ff))
    w.add_head_count(int(text_cfg["num_attention_heads"]))
    w.add_head_count_kv(_scalar_or_list(geo.kv_heads))
    w.add_layer_norm_rms_eps(float(text_cfg.get("rms_norm_eps", 1e-6)))
    # key/value length = full-attention head size; the *_swa keys carry the sliding-window head size.
    w.add_key_length(geo.head_dim_full)
    w.add_value_length(geo.head_dim_full)
    w.add_key_length_swa(geo.head_dim_swa)
    w.add_value_length_swa(geo.head_dim_swa)
    w.add_rope_dimension_count(geo.head_dim_full)
    swa_factor = float((rope.get("sliding_attention") or {}).get("partial_rotary_factor", 1.0))
    w.add_rope_dimension_count_swa(int(geo.head_dim_swa * swa_factor))
    w.add_rope_freq_base(float((rope.get("full_attention") or {}).get("rope_theta", 1_000_000.0)))
    w.add_rope_freq_base_swa(float((rope.get("sliding_attention") or {}).get("rope_theta", 10_000.0)))
    w.add_sliding_window(int(text_cfg.get("sliding_window", 512)))
    w.add_sliding_window_pattern(geo.sliding)
    w.add_shared_kv_layers(int(text_cfg.get("num_kv_shared_layers") or 0))
    w.add_embedding_length_per_layer_input(int(text_cfg.get("hidden_size_per_layer_input") or 0))
    if text_cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(text_cfg["final_logit_softcapping"]))
    if text_cfg.get("enable_moe_block") and text_cfg.get("num_experts"):
        w.add_expert_count(int(text_cfg["num_experts"]))
        w.add_expert_used_count(int(text_cfg["top_k_experts"]))
        w.add_expert_feed_forward_length(int(text_cfg["moe_intermediate_size"]))


def add_tokenizer_metadata(w: gguf.GGUFWriter, model_dir: Path, n_vocab: int) -> None:
    """Write the tokenizer (``tokenizer.ggml.*``, chat template) from the folder's tokenizer.json.

    Gemma 4's tokenizer is a byte-fallback BPE; llama.cpp reads it as model ``gemma4`` with the HF token list,
    scores and types. If the tokenizer has fewer tokens than the embedding has rows, the list is padded with
    ``[PADn]`` UNUSED tokens so that ``len(tokens) == token_embd rows`` as llama.cpp requires, without touching
    the weights.

    Raises:
        ExportError: no usable tokenizer.json, or more tokens than embedding rows.
    """
    try:
        vocab = gguf.LlamaHfVocab(model_dir)
    except (FileNotFoundError, OSError, TypeError, ValueError) as exc:
        raise ExportError(
            f"cannot read a Gemma-style BPE tokenizer.json in {str(model_dir)!r} ({exc}); GGUF export needs the "
            "base model's tokenizer files next to its weights"
        ) from exc
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode("utf-8", "replace") in VISIBLE_TOKENS else toktype)
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)
    if gguf.Keys.Tokenizer.ADD_BOS not in w.kv_data[0]:  # SpecialVocab sets it when tokenizer_config does
        w.add_add_bos_token(True)


def add_mmproj_metadata(w: gguf.GGUFWriter, cfg: dict[str, Any], model_dir: Path) -> None:
    """Write the ``clip.*`` keys for the vision and/or audio encoder."""
    text_hidden = int(cfg["text_config"]["hidden_size"])
    vision, audio = cfg.get("vision_config"), cfg.get("audio_config")
    if vision:
        w.add_clip_has_vision_encoder(True)
        w.add_clip_vision_projector_type(gguf.VisionProjectorType.GEMMA4V)
        w.add_vision_projection_dim(text_hidden)
        w.add_vision_image_size(224)  # unused by the gemma4v preprocessor; llama.cpp writes this placeholder
        w.add_vision_patch_size(int(vision.get("patch_size", 16)))
        w.add_vision_embedding_length(int(vision["hidden_size"]))
        w.add_vision_feed_forward_length(int(vision["intermediate_size"]))
        w.add_vision_block_count(int(vision["num_hidden_layers"]))
        w.add_vision_head_count(int(vision["num_attention_heads"]))
        w.add_vision_attention_layernorm_eps(float(vision.get("rms_norm_eps", 1e-6)))
        mean, std = _image_norm(model_dir)
        w.add_vision_image_mean(mean)
        w.add_vision_image_std(std)
    if audio:
        w.add_clip_has_audio_encoder(True)
        w.add_clip_audio_projector_type(gguf.VisionProjectorType.GEMMA4A)
        w.add_audio_projection_dim(text_hidden)
        w.add_audio_embedding_length(int(audio["hidden_size"]))
        w.add_audio_feed_forward_length(int(audio["hidden_size"]) * 4)
        w.add_audio_block_count(int(audio["num_hidden_layers"]))
        w.add_audio_head_count(int(audio["num_attention_heads"]))
        w.add_audio_num_mel_bins(_mel_bins(audio, model_dir))
        w.add_audio_attention_layernorm_eps(1e-5)


def _processor_section(model_dir: Path, section: str) -> dict[str, Any]:
    import json

    for name in ("preprocessor_config.json", "processor_config.json"):
        path = model_dir / name
        if path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
            return {**cfg, **(cfg.get(section) or {})}
    return {}


def _mel_bins(audio_cfg: dict[str, Any], model_dir: Path) -> int:
    # Gemma 4's audio config has no mel-bin field (llama.cpp assumes 128); the feature extractor's feature_size is
    # the real value, so prefer it when the processor config is there.
    if audio_cfg.get("input_feat_size"):
        return int(audio_cfg["input_feat_size"])
    return int(_processor_section(model_dir, "feature_extractor").get("feature_size", 128))


def _image_norm(model_dir: Path) -> tuple[list[float], list[float]]:
    # Gemma 4's image processor only rescales to [0, 1] (do_normalize=False): mean 0, std 1 unless a
    # processor config says otherwise.
    cfg = _processor_section(model_dir, "image_processor")
    if "image_mean" in cfg and "image_std" in cfg and cfg.get("do_normalize", True):
        return [float(x) for x in cfg["image_mean"]], [float(x) for x in cfg["image_std"]]
    return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
