"""Load only the language model of a multimodal Gemma 4 checkpoint (``load_model(..., text_only=True)``).

A multimodal checkpoint stores the decoder under ``model.language_model.`` next to ``model.vision_tower.``,
``model.audio_tower.`` and the ``model.embed_{vision,audio}`` projections. ``Gemma4ForCausalLM`` is the same
decoder (plus the tied lm_head and the logit softcap) with its layers under ``model.``. We build it with empty
parameters, then read from the safetensors files ONLY the tensors it needs, one key at a time (``safe_open``), so
the towers' tensors are never read from disk or held in memory. transformers' own ``from_pretrained`` has no key
filter common to 5.17 and 5.24, which is why the read is done here; the module tree is still transformers' own.

Adapters trained on such a model must apply to the full multimodal model (which is what users serve), so the
model remembers how its module names map to the checkpoint's (``CHECKPOINT_PREFIX``); ``slimtune.adapt.adapter_io``
saves and loads adapters under the checkpoint's names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimtune.errors import ModelLoadError

CHECKPOINT_PREFIX = ("model.", "model.language_model.")
"""(prefix in Gemma4ForCausalLM, prefix of the same modules in the multimodal checkpoint)."""

_LM_HEAD = "lm_head.weight"


def checkpoint_key_for(name: str) -> str | None:
    """The multimodal checkpoint key of a ``Gemma4ForCausalLM`` state-dict key (None if it has none)."""
    if name == _LM_HEAD:
        return name
    ours, theirs = CHECKPOINT_PREFIX
    return theirs + name[len(ours):] if name.startswith(ours) else None


def load_language_model(folder: Path, shards: list[Path], dtype: torch.dtype, *, device="cpu",
                        quantize_family=None, offload_ple: bool = False) -> nn.Module:
    """A frozen ``Gemma4ForCausalLM`` holding the decoder weights of a multimodal checkpoint, on ``device``.

    Read by the streaming reader (``stream_load.stream_weights``): one tensor at a time, linears of
    ``quantize_family`` and the MoE experts straight to NF4, the PLE table straight into host memory when
    ``offload_ple``.

    Raises:
        ModelLoadError: the checkpoint lacks decoder tensors the model needs, or they have the wrong shape.
    """
    import transformers  # noqa: PLC0415

    from slimtune.adapt.quantize import nf4_module_names  # noqa: PLC0415
    from slimtune.models.stream_load import (  # noqa: PLC0415
        build_empty, finish_like_from_pretrained, key_to_shard, missing_keys, stream_weights)

    text_config = transformers.AutoConfig.from_pretrained(str(folder)).get_text_config()
    model = build_empty(transformers.Gemma4ForCausalLM, text_config, dtype, "sdpa")
    missing = missing_keys(model, key_to_shard(folder, shards), checkpoint_key_for)
    if missing:
        raise ModelLoadError(f"{folder} lacks {len(missing)} language-model tensors (first: "
                             f"{[checkpoint_key_for(n) for n in missing[:3]]}); text_only=True needs a Gemma 4 "
                             "checkpoint whose decoder is stored under model.language_model.")
    quantize = set(nf4_module_names(model, quantize_family)) if quantize_family is not None else set()
    stream_weights(model, folder, shards, device=torch.device(device), quantize=quantize, offload_ple=offload_ple,
                   key_for=checkpoint_key_for)
    finish_like_from_pretrained(model, folder)
    model.slimtune_checkpoint_prefix = CHECKPOINT_PREFIX
    return model
