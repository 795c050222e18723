"""Plug slimtune's flash attention into transformers' Gemma 4 text decoder through the public attention registry.

``register_slimtune_attention()`` adds an attention function and a mask function, both named ``"slimtune"``, to
``transformers.AttentionInterface`` and ``transformers.masking_utils.AttentionMaskInterface``;
``enable_slimtune_attention(model)`` switches only the text decoder of a loaded Gemma 4 model to it (the vision and
audio towers keep their own implementation).

What reaches the attention function, and what it does with it:

* ``attention_mask``: the mask function hands over what flash-attention-2 would get: ``None`` (no padding) or the
  (batch, kv_len) boolean padding mask, never an O(T²) tensor. Causality and the sliding window come from the module
  (``is_causal``, ``sliding_window``). When transformers builds a custom overlay (``use_vmap``: e.g. the
  bidirectional vision blocks of 26B/31B sliding layers) or the caller passes a 4D mask, the dense mask is built and
  that layer runs transformers' own SDPA function with it, unchanged.
* Packed documents: ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs (flash-attention-2 varlen convention, batch 1), or
  else ``position_ids`` (a new document starts wherever the position does not increase by exactly 1, the rule of
  ``transformers.masking_utils.find_packed_sequence_indices``). Unlike ``eager``/``sdpa``, documents are also
  separated when a padding mask is present (as flash-attention-2 does).
* Query rows that see no key (e.g. fully padded rows under left padding) return 0 instead of eager's uniform average.

Queries shorter than keys (decoding with a cache) and fp32 or CPU tensors use the exact torch fallback.
"""

from __future__ import annotations

import logging
import weakref

import torch

from slimtune.errors import ConfigError, UnsupportedModelError
from slimtune.kernels.attention_reference import attention_fallback, document_bounds
from slimtune.kernels.flash_attention import flash_attention

__all__ = [
    "ATTENTION_NAME",
    "enable_slimtune_attention",
    "packed_document_ids",
    "register_slimtune_attention",
    "slimtune_attention_forward",
    "slimtune_attention_mask",
]

logger = logging.getLogger(__name__)

ATTENTION_NAME = "slimtune"
_SUPPORTED_TEXT_MODEL_TYPES = ("gemma4_text",)


def packed_document_ids(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Document id per token from packed ``position_ids`` (batch or 1, seq): a new document wherever ``diff != 1``."""
    pos = position_ids.expand(batch, -1)
    first = pos[:, :1] - 1
    return (torch.diff(pos, prepend=first, dim=-1) != 1).cumsum(-1)


# One-entry memo: every decoder layer of a forward pass receives the same position_ids tensor.
_doc_memo: dict[str, object] = {"ref": None, "version": -1, "batch": -1, "bounds": None}


def _doc_bounds_from_positions(position_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``document_bounds`` of the packed documents in ``position_ids``, computed once per forward pass."""
    if torch.compiler.is_compiling():  # traced into each layer's graph: a few fused elementwise ops, no memo
        return document_bounds(packed_document_ids(position_ids, batch), None, batch, position_ids.shape[-1],
                               position_ids.device)
    ref = _doc_memo["ref"]
    if (ref is not None and ref() is position_ids and _doc_memo["version"] == position_ids._version
            and _doc_memo["batch"] == batch):
        return _doc_memo["bounds"]
    ids = packed_document_ids(position_ids, batch)
    bounds = document_bounds(ids, None, batch, ids.shape[-1], ids.device)
    _doc_memo.update(ref=weakref.ref(position_ids), version=position_ids._version, batch=batch, bounds=bounds)
    return bounds


def slimtune_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function registered as ``"slimtune"``: the 2D padding mask (or None); dense only for custom overlays."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    if use_vmap:  # transformers added an and/or overlay we cannot express compactly: materialise it
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         use_vmap=use_vmap, **kwargs)
    return flash_attention_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask)


def slimtune_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"slimtune"`` (transformers' attention-interface signature).

    Args:
        module: The attention module (reads ``is_causal``).
        query: (batch, q_heads, q_len, head_dim).
        key: (batch, kv_heads, kv_len, head_dim).
        value: (batch, kv_heads, kv_len, head_dim).
        attention_mask: None, (batch, kv_len) bool padding mask, or a 4D mask (runs transformers' SDPA path).
        scaling: Score scale (Gemma 4: 1.0); None means head_dim ** -0.5.
        dropout: Must be 0 (Gemma 4 has no attention dropout).
        sliding_window: Window W of sliding layers, None for full layers.
        **kwargs: ``position_ids``, ``cu_seq_lens_q``/``cu_seq_lens_k``, ``is_causal``; others are ignored.

    Returns:
        ``(output, None)`` with output (batch, q_len, q_heads, head_dim), as transformers expects.

    Raises:
        ConfigError: dropout > 0, softcap set, or a BlockMask was passed.
    """
    if dropout:
        raise ConfigError(f"slimtune attention has no dropout; got dropout={dropout}. Set attention_dropout=0.0.")
    if kwargs.get("softcap") is not None:
        raise ConfigError("slimtune attention does not support an attention-logit softcap; use attn 'eager'.")
    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)

    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ConfigError(f"slimtune attention got a {type(attention_mask).__name__} mask; expected a tensor or None.")
    if attention_mask is not None and attention_mask.dim() == 4:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    b, _, tq, d = query.shape
    tk = key.shape[2]
    if scaling is None:
        scaling = d ** -0.5
    padding = None
    if attention_mask is not None:
        padding = attention_mask[:, -tk:].to(torch.bool)

    cu_seqlens = bounds = None
    if tq == tk and tq > 1:
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        position_ids = kwargs.get("position_ids")
        if cu_q is not None and b == 1 and (cu_k is None or cu_k is cu_q or torch.equal(cu_k, cu_q)):
            cu_seqlens = cu_q
        elif isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == tq:
            bounds = _doc_bounds_from_positions(position_ids.to(query.device), b)

    if is_causal and tq == tk:
        out = flash_attention(query, key, value, scale=scaling, window=sliding_window, cu_seqlens=cu_seqlens,
                              key_padding_mask=padding, doc_bounds=bounds)
    else:  # bidirectional modules, or decoding (queries are the last tq of tk positions)
        doc_start = bounds[0] if bounds is not None else document_bounds(None, cu_seqlens, b, tk, query.device)[0]
        out = attention_fallback(query, key, value, scale=scaling, causal=is_causal, window=sliding_window,
                                 doc_start=doc_start, key_padding_mask=padding)
    return out.transpose(1, 2).contiguous(), None


def register_slimtune_attention() -> None:
    """Register ``"slimtune"`` in transformers' attention and attention-mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, slimtune_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, slimtune_attention_mask)


def enable_slimtune_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch the text decoder of a loaded Gemma 4 model to slimtune attention; other towers are left as they are.

    Works for ``Gemma4ForCausalLM``/``Gemma4TextModel`` (text config at the top) and for the multimodal
    ``Gemma4ForConditionalGeneration``/``Gemma4Model`` (only the ``text_config`` sub-config is switched, through
    ``model.set_attn_implementation({"text_config": "slimtune"})``).

    Args:
        model: A transformers Gemma 4 model.

    Returns:
        The same model, switched in place.

    Raises:
        UnsupportedModelError: not a Gemma 4 model, or transformers did not accept the switch.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("google/gemma-4-E2B-it")  # doctest: +SKIP
        >>> model = enable_slimtune_attention(model)  # doctest: +SKIP
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers model with a config")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "model_type", None) not in _SUPPORTED_TEXT_MODEL_TYPES:
        raise UnsupportedModelError(
            f"slimtune attention supports Gemma 4 text decoders (model_type {_SUPPORTED_TEXT_MODEL_TYPES}); "
            f"{type(model).__name__} has text model_type {getattr(text_config, 'model_type', None)!r}"
        )
    register_slimtune_attention()
    if text_config is config:
        model.set_attn_implementation(ATTENTION_NAME)
    else:
        key = next((name for name in getattr(config, "sub_configs", {}) if getattr(config, name, None) is text_config),
                   None)
        if key is None:
            raise UnsupportedModelError(f"could not find the text sub-config of {type(model).__name__}")
        model.set_attn_implementation({key: ATTENTION_NAME})
    if text_config._attn_implementation != ATTENTION_NAME:
        raise UnsupportedModelError(
            f"transformers kept attn_implementation={text_config._attn_implementation!r} for the text decoder of "
            f"{type(model).__name__}; slimtune attention could not be enabled"
        )
    _keep_masks_whole(model)
    return model


def _no_kv_shared_slicing(module, args, kwargs):
    kwargs["logits_to_keep"] = None  # any non-int turns the slicing off; the model's own head still slices
    return args, kwargs


def _keep_masks_whole(model: torch.nn.Module) -> None:
    """Stop newer transformers (5.2x) from slicing the masks before the KV-shared layers.

    ``Gemma4TextModel._maybe_slice_kv_shared_inputs`` indexes every mask as ``mask[:, :, keep, :]`` whenever
    ``logits_to_keep`` is an int (0 during training) unless the implementation's name contains "flash". Our mask
    is flash-attention-2's (batch, kv_len) padding mask, so a padded batch would raise IndexError. Passing
    ``logits_to_keep=None`` to the text model disables that optimisation (a no-op at 0; at generation it only
    costs the KV-shared layers' prefill of the prompt positions), through a forward pre-hook, not a patch.
    """
    for module in model.modules():
        if hasattr(module, "_maybe_slice_kv_shared_inputs") and not getattr(module, "_slimtune_whole_masks", False):
            module.register_forward_pre_hook(_no_kv_shared_slicing, with_kwargs=True)
            module._slimtune_whole_masks = True
