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

import json
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


def _key_to_shard(folder: Path, shards: list[Path]) -> dict[str, Path]:
    """Which shard holds each key: the index when there is one (no shard is opened), else the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open  # noqa: PLC0415

    out = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), shard))
    return out


def load_language_model(folder: Path, shards: list[Path], dtype: torch.dtype) -> nn.Module:
    """A frozen-ready ``Gemma4ForCausalLM`` holding the decoder weights of a multimodal checkpoint, on the CPU.

    Raises:
        ModelLoadError: the checkpoint lacks decoder tensors the model needs, or they have the wrong shape.
    """
    import transformers  # noqa: PLC0415
    from accelerate import init_empty_weights  # noqa: PLC0415
    from safetensors import safe_open  # noqa: PLC0415 - looked up at call time (tests count the reads)

    text_config = transformers.AutoConfig.from_pretrained(str(folder)).get_text_config()
    # Parameters stay on the meta device until their tensor is read; buffers (RoPE tables, scales) are built for
    # real, exactly as from_pretrained builds them.
    with init_empty_weights(include_buffers=False):
        model = transformers.Gemma4ForCausalLM._from_config(text_config, attn_implementation="sdpa", dtype=dtype)
    wanted = model.state_dict()
    where = _key_to_shard(folder, shards)
    by_shard: dict[Path, list[tuple[str, str]]] = {}
    for name in wanted:
        key = checkpoint_key_for(name)
        if key in where:
            by_shard.setdefault(where[key], []).append((name, key))
    state = {}
    for shard, pairs in by_shard.items():
        with safe_open(str(shard), framework="pt") as f:
            for name, key in pairs:
                tensor = f.get_tensor(key)
                want = wanted[name]
                if tuple(tensor.shape) != tuple(want.shape):
                    raise ModelLoadError(f"{shard.name}: {key} has shape {tuple(tensor.shape)}, but this "
                                         f"checkpoint's config.json expects {tuple(want.shape)}; the files do not "
                                         "belong together.")
                state[name] = tensor.to(want.dtype) if tensor.is_floating_point() else tensor
    tied = getattr(text_config, "tie_word_embeddings", True)
    missing = [n for n in wanted if n not in state and not (n == _LM_HEAD and tied)]
    if missing:
        raise ModelLoadError(f"{folder} lacks {len(missing)} language-model tensors (first: "
                             f"{[checkpoint_key_for(n) for n in missing[:3]]}); text_only=True needs a Gemma 4 "
                             "checkpoint whose decoder is stored under model.language_model.")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:  # the checkpoint need not store lm_head; it is the input embedding
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise ModelLoadError(f"text_only load of {folder} left parameters unset: {leftovers[:3]}.")
    # What from_pretrained would also have set: the source folder, and the saved generation settings (their eos
    # ids include Gemma 4's end-of-turn token, without which chat generation would not stop).
    model.config.name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(folder))
    model.slimtune_checkpoint_prefix = CHECKPOINT_PREFIX
    return model
