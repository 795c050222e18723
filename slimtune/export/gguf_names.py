"""HF Gemma 4 tensor names -> the GGUF names llama.cpp's ``gemma4`` and ``clip`` (mmproj) loaders expect.

The bulk of the table is the ``gguf`` package's own `TensorNameMap` (``gguf.get_tensor_name_map``), which already
lists the Gemma 4 HF names. What it does not cover are renames and reshapes llama.cpp's converter applies before
looking names up; those were read (as facts, not code) from llama.cpp's ``conversion/gemma.py`` and
``conversion/base.py`` (2026) and are listed here as data:

Text model (``gemma4``):
  * ``language_model.`` is dropped, so ``model.language_model.layers.N.*`` is looked up as ``model.layers.N.*``.
  * ``layer_scalar`` gets a ``.weight`` suffix -> ``blk.N.layer_output_scale.weight``.
  * ``router.scale`` -> ``blk.N.ffn_gate_inp.scale``; ``router.per_expert_scale`` -> ``blk.N.ffn_down_exps.scale``.
  * ``experts.gate_up_proj`` / ``experts.down_proj`` get ``.weight`` -> ``blk.N.ffn_gate_up_exps.weight`` /
    ``blk.N.ffn_down_exps.weight`` (HF layout ``[E, 2I, H]`` / ``[E, H, I]`` kept as is).
  * ``lm_head.weight`` is skipped (tied to ``token_embd``).
  * Norm weights are written unchanged: Gemma 4's RMSNorm multiplies by ``weight``, not ``1 + weight`` as Gemma 3.

Projector file (``clip``, ``mmproj-*.gguf``):
  * vision: ``model.vision_tower.encoder.`` -> ``vision_model.model.``; ``.linear.weight`` -> ``.weight``
    (Gemma4ClippableLinear); ``layer_scalar`` / ``position_embedding_table`` get ``.weight``;
    ``patch_embedder.input_proj.weight`` ``[H, p·p·3]`` is reshaped to ``[H, p, p, 3]`` and permuted to
    ``[H, 3, p, p]`` (a conv kernel).
  * audio: ``model.audio_tower.`` -> ``conformer.``; ``.linear.`` -> ``.``; ``per_dim_scale`` is stored as
    ``softplus(per_dim_scale)`` with a ``.weight`` suffix; ``lconv1d.depthwise_conv1d.weight`` ``[C, 1, K]`` ->
    ``[C, K]``.
  * scalar clip bounds (``input_min`` ...) become 1-element tensors.

NOT CONFIRMED against a running llama.cpp (no llama.cpp binary is available here): whether llama.cpp still
accepts the consumer-layer ``k_proj``/``v_proj``/``k_norm`` weights that the original E2B/E4B hub checkpoints
carry (we pass them through, as llama.cpp's converter does); and the large-vision-tower ``std_bias``/``std_scale``
names (taken from the gguf package's map: ``v.std_bias`` / ``v.std_scale``).
"""

from __future__ import annotations

import gguf
import torch

__all__ = [
    "MMPROJ_SUFFIXES",
    "SKIP_TENSORS",
    "is_mmproj_tensor",
    "is_text_tensor",
    "mmproj_gguf_name",
    "mmproj_transform",
    "text_gguf_name",
]

MMPROJ_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
MMPROJ_SUFFIXES = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
SKIP_TENSORS = ("lm_head.weight",)


def is_mmproj_tensor(name: str) -> bool:
    """True for tensors of the vision/audio towers and their projections into the text model."""
    return name.startswith(MMPROJ_PREFIXES)


def is_text_tensor(name: str) -> bool:
    """True for tensors that belong in the text GGUF."""
    return not is_mmproj_tensor(name) and name not in SKIP_TENSORS


def _block(name: str) -> int | None:
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None


def text_gguf_name(name: str, name_map: gguf.TensorNameMap) -> str:
    """GGUF name of a text-model tensor.

    Args:
        name: HF checkpoint name (``model.language_model.*`` or ``model.*``).
        name_map: ``gguf.get_tensor_name_map(MODEL_ARCH.GEMMA4, n_layers)``.

    Raises:
        KeyError: the tensor has no known GGUF name.
    """
    hf = name.replace("language_model.", "", 1)
    bid = _block(hf)
    names = gguf.TENSOR_NAMES
    if hf.endswith("router.scale"):
        return names[gguf.MODEL_TENSOR.FFN_GATE_INP].format(bid=bid) + ".scale"
    if hf.endswith("router.per_expert_scale"):
        return names[gguf.MODEL_TENSOR.FFN_DOWN_EXP].format(bid=bid) + ".scale"
    if hf.endswith(("layer_scalar", "experts.gate_up_proj", "experts.down_proj")):
        hf += ".weight"
    out = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
    if out is None:
        raise KeyError(f"no GGUF name known for text tensor {name!r}")
    return out


def mmproj_gguf_name(name: str, name_map: gguf.TensorNameMap) -> str:
    """GGUF name of a vision/audio tensor in the mmproj file.

    Args:
        name: HF checkpoint name under ``model.vision_tower.``, ``model.audio_tower.``, ``model.embed_*``.
        name_map: ``gguf.get_tensor_name_map(MODEL_ARCH.MMPROJ, n_blocks)``.

    Raises:
        KeyError: the tensor has no known GGUF name.
    """
    if name.startswith(("model.audio_tower.", "model.embed_audio.")):
        hf = name.replace("model.audio_tower.", "conformer.").replace(".linear.", ".")
        if hf.endswith(("per_dim_scale", "per_dim_key_scale")):
            hf += ".weight"
    else:
        hf = name.replace("model.vision_tower.encoder.", "vision_model.model.").replace(".linear.weight", ".weight")
        if hf.endswith(("layer_scalar", "position_embedding_table")):
            hf += ".weight"
    out = name_map.get_name(hf, try_suffixes=MMPROJ_SUFFIXES)
    if out is None:
        raise KeyError(f"no GGUF name known for projector tensor {name!r}")
    return out


def mmproj_transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Reshape/rescale a projector tensor the way llama.cpp's clip loader expects.

    Works on real and on ``meta`` tensors, so the same function gives the output shape before any data is read.

    Args:
        name: HF checkpoint name.
        tensor: its value (any float dtype).

    Returns:
        The tensor to store (same dtype).
    """
    if tensor.dim() == 0:
        tensor = tensor.unsqueeze(0)  # scalar clip bounds: GGUF tensors need at least one dimension
    if name.startswith("model.audio_tower."):
        if name.endswith(("per_dim_scale", "per_dim_key_scale")):
            tensor = torch.nn.functional.softplus(tensor.float()).to(tensor.dtype)
        if "lconv1d.depthwise_conv1d" in name and name.endswith(".weight"):
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[2])
    elif name.endswith("patch_embedder.input_proj.weight"):
        n_embd, k = tensor.shape
        patch = round((k // 3) ** 0.5)
        tensor = tensor.reshape(n_embd, patch, patch, 3).permute(0, 3, 1, 2).contiguous()
    return tensor


def force_f32(gguf_name: str, hf_name: str, ndim: int, mmproj: bool) -> bool:
    """Tensors llama.cpp keeps in F32 whatever the file type.

    Rules (from llama.cpp's converter): every 1-D tensor and every ``*_norm.weight``; the MoE router input
    (``ffn_gate_inp``); tensors whose name does not end in ``.weight`` (scales, clip bounds, biases); in the
    projector, the patch embedding, the position-embedding table and the audio convolution kernels.
    """
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return True
    if ".ffn_gate_inp." in gguf_name:
        return True
    if mmproj:
        if gguf_name.endswith(".patch_embd.weight") or "position_embedding_table" in hf_name:
            return True
        if hf_name.startswith("model.audio_tower.") and (".conv" in hf_name or "_conv" in hf_name):
            return True
    return False
