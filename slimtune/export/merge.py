"""Merge a LoRA adapter into its base checkpoint, streaming one safetensors shard at a time.

For each base shard: read it, dequantize bitsandbytes-4bit weights to 16-bit if the base is pre-quantized, add
``scale · B @ A`` to every adapted weight (computed in fp32, fp64 for fp32 weights, then cast back), write the output
shard, and drop the shard before reading the next. Peak host memory is therefore about one shard (one dequantized
shard for a 4-bit base) plus the adapter, whatever the model size. The output is a plain HF folder: config.json
(without quantization_config), safetensors shards + index, and the base's tokenizer/processor/generation files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.adapt.quantize import dequantize_bnb_4bit
from slimtune.errors import ExportError
from slimtune.export import checkpoint as ckpt_io
from slimtune.export.checkpoint import Checkpoint
from slimtune.export.lora_plan import LoraDelta, load_adapter_plan, match_base_keys

logger = logging.getLogger(__name__)

__all__ = ["MergeReport", "merge_adapter"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class MergeReport:
    """What a merge did.

    Attributes:
        merged_tensors: number of base tensors that received a LoRA update.
        replaced_tensors: number of base tensors replaced by ``modules_to_save`` copies.
        dequantized_tensors: number of bitsandbytes-4bit tensors dequantized to 16-bit.
        shards: number of output shards.
    """

    merged_tensors: int
    replaced_tensors: int
    dequantized_tensors: int
    shards: int


def _dequant_dtype(config: dict) -> torch.dtype:
    # A pre-quantized checkpoint records the model's original dtype in `dtype` (older files: `torch_dtype`).
    # The merged output is 16-bit, so an fp32 (or missing) record becomes bf16, Gemma 4's native dtype.
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    return _DTYPES.get(name, torch.bfloat16) if name in ("bfloat16", "float16") else torch.bfloat16


def _bnb_companions(ckpt: Checkpoint) -> dict[str, list[str]]:
    """Map each bitsandbytes-4bit weight name to its companion tensor names.

    A quantized ``X.weight`` is stored with ``X.weight.absmax``, ``X.weight.quant_map``,
    ``X.weight.quant_state.bitsandbytes__nf4`` (and ``X.weight.nested_*`` with double quantization).
    """
    weights = {k.split(".quant_state.")[0] for k in ckpt.tensor_names() if ".quant_state.bitsandbytes__" in k}
    out: dict[str, list[str]] = {w: [] for w in weights}
    for key in ckpt.tensor_names():
        head, sep, _ = key.partition(".weight.")
        if sep and head + ".weight" in out:
            out[head + ".weight"].append(key)
    return out


def _dequantize_4bit(
    ckpt: Checkpoint, tensors: dict[str, torch.Tensor], companions: dict[str, list[str]], dtype: torch.dtype
) -> int:
    """Replace the bitsandbytes-4bit weights of one shard (in place) by dequantized `dtype` tensors.

    transformers' sharding may put a companion in another shard than its weight, so a missing companion is read
    on its own from its shard (they are tiny). Companions are dropped from the output.
    """
    from bitsandbytes.functional import (
        QuantState,  # only parses the stored state; no kernels involved
    )

    done = 0
    for weight_key, parts in companions.items():
        if weight_key not in tensors:
            continue
        qs = {k[len(weight_key) + 1:]: tensors[k] if k in tensors else ckpt.get_tensor(k) for k in parts}
        state = QuantState.from_dict(qs, device=torch.device("cpu"))
        tensors[weight_key] = dequantize_bnb_4bit(tensors[weight_key], state).to(dtype)
        done += 1
    all_parts = {k for parts in companions.values() for k in parts}
    for k in [k for k in tensors if k in all_parts]:
        del tensors[k]
    return done


def _apply(key: str, weight: torch.Tensor, deltas: list[LoraDelta]) -> torch.Tensor:
    # 16-bit weights: fp32 arithmetic is far finer than the result's rounding. fp32 weights: fp64 arithmetic, so
    # the stored weight is the correctly rounded W + s·BA (fp32 arithmetic would add up to a few ulp of error).
    compute = torch.float64 if weight.dtype == torch.float32 else torch.float32
    merged = weight.to(compute)
    for d in deltas:
        update = d.delta(compute)
        if update.shape != merged.shape:
            raise ExportError(
                f"LoRA update for {d.module!r} has shape {tuple(update.shape)} but base weight {key!r} has shape "
                f"{tuple(merged.shape)}; the adapter was trained on a different model size"
            )
        merged += update
    return merged.to(weight.dtype)


def _warn_tied_embedding(ckpt: Checkpoint, deltas: dict[str, list[LoraDelta]]) -> None:
    # Gemma 4 ties lm_head to embed_tokens. PEFT applies an embedding LoRA to the input lookup only, but the merged
    # checkpoint has one shared matrix, so the merge also changes the output head. Say so rather than surprise.
    text_cfg = ckpt.config.get("text_config") or ckpt.config
    tied = ckpt.config.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", True))
    hit = [k for k in deltas if k.endswith("embed_tokens.weight")]
    if hit and tied and "lm_head.weight" not in ckpt.tensor_names():
        logger.warning(
            "the adapter has LoRA on the tied input embedding (%s); after merging, the output head (tied to it) "
            "changes too, so the merged model's logits differ from the PEFT model's",
            hit[0],
        )


def merge_adapter(
    adapter_dir: Path,
    adapter_config: dict,
    base_dir: Path,
    out_dir: Path,
    *,
    progress: bool = True,
) -> MergeReport:
    """Write the base model with the adapter merged in, as a 16-bit HF checkpoint folder.

    Args:
        adapter_dir: folder with adapter_model.safetensors.
        adapter_config: parsed adapter_config.json.
        base_dir: base checkpoint folder (16/32-bit, or bitsandbytes 4-bit which is dequantized first).
        out_dir: existing empty folder to write into (the caller handles atomicity).
        progress: show a per-shard progress bar.

    Returns:
        A `MergeReport`.

    Raises:
        ExportError: adapter keys matching no base weight, shape mismatches, unsupported adapter features or an
            8-bit base.
    """
    ckpt = Checkpoint.open(base_dir)
    if ckpt.is_bnb_8bit:
        raise ExportError(
            f"base model {str(base_dir)!r} is a bitsandbytes 8-bit checkpoint, which cannot be merged; use its "
            "16-bit original as the base"
        )
    plan = load_adapter_plan(adapter_dir, adapter_config)
    deltas, replacements = match_base_keys(plan, ckpt.tensor_names(), base_name=str(base_dir))
    _warn_tied_embedding(ckpt, deltas)
    quantized = ckpt.is_bnb_4bit
    dtype = _dequant_dtype(ckpt.config)
    companions = _bnb_companions(ckpt) if quantized else {}

    weight_map: dict[str, str] = {}
    total_size = 0
    merged = dequantized = 0
    shards = ckpt.shards
    if progress:
        from tqdm.auto import tqdm

        shards = tqdm(shards, desc="merging shards", unit="shard")
    for shard in shards:
        tensors = ckpt_io.read_shard(base_dir / shard)
        if quantized:
            dequantized += _dequantize_4bit(ckpt, tensors, companions, dtype)
        # Replacements first: PEFT stores an adapted embedding's base weight too, and the LoRA update goes on top.
        for key in tensors.keys() & replacements.keys():
            if replacements[key].shape != tensors[key].shape:
                raise ExportError(
                    f"the adapter stores a full {key!r} of shape {tuple(replacements[key].shape)}, but the base has "
                    f"{tuple(tensors[key].shape)} (was the vocabulary resized?); merging it is not supported"
                )
            tensors[key] = replacements[key].to(tensors[key].dtype)
        for key in tensors.keys() & deltas.keys():
            tensors[key] = _apply(key, tensors[key], deltas[key])
            merged += 1
        ckpt_io.write_shard(tensors, out_dir / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        # Drop this shard's tensors before the next read: this is what keeps peak memory at about one shard.
        del tensors
    if ckpt.shards != [ckpt_io.SINGLE_NAME]:
        ckpt_io.write_index(out_dir, weight_map, total_size)

    config = dict(ckpt.config)
    if quantized:
        config.pop("quantization_config", None)
        config["dtype"] = str(dtype).replace("torch.", "")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    ckpt_io.copy_aux_files(base_dir, out_dir, skip=("config.json",))
    ckpt_io.copy_tokenizer_overrides(adapter_dir, out_dir)
    logger.info(
        "merged %d LoRA-adapted tensors (%d replaced, %d dequantized) into %d shard(s)",
        merged, len(replacements), dequantized, len(ckpt.shards),
    )
    return MergeReport(merged, len(replacements), dequantized, len(ckpt.shards))
