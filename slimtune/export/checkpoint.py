"""Read an HF safetensors checkpoint folder shard by shard, and copy its non-weight files.

Exports must not load a whole 31B checkpoint into host memory, so everything here works per shard (or per
tensor): the index is read from ``model.safetensors.index.json`` (or the single ``model.safetensors`` header),
and tensors are only materialised when a caller asks for one shard or one tensor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimtune.errors import ExportError
from slimtune.export.source import read_json

__all__ = ["WEIGHT_SUFFIXES", "Checkpoint", "copy_aux_files", "read_shard", "write_shard"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files that are weights (or weight indexes) and therefore never copied verbatim into an export.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".h5", ".msgpack")
# Tokenizer / chat files an adapter folder may carry (a trainer may save an edited chat template there).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class Checkpoint:
    """A safetensors checkpoint folder.

    Attributes:
        folder: the checkpoint folder.
        config: parsed config.json.
        shards: shard file names, in index order.
        key_to_shard: tensor name -> shard file name.
    """

    folder: Path
    config: dict[str, Any]
    shards: list[str]
    key_to_shard: dict[str, str] = field(repr=False)

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        """Read config.json and the shard index (headers only, no tensor data).

        Raises:
            ExportError: no config.json, no safetensors weights, or an index naming a missing shard.
        """
        config = read_json(folder / "config.json")
        if (folder / INDEX_NAME).is_file():
            weight_map = read_json(folder / INDEX_NAME).get("weight_map") or {}
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ExportError(f"checkpoint {str(folder)!r} is incomplete: missing shard(s) {missing}")
            return cls(folder, config, shards, dict(weight_map))
        if (folder / SINGLE_NAME).is_file():
            with safe_open(str(folder / SINGLE_NAME), framework="pt") as f:
                keys = list(f.keys())
            return cls(folder, config, [SINGLE_NAME], {k: SINGLE_NAME for k in keys})
        raise ExportError(f"no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}) in {str(folder)!r}")

    def tensor_names(self) -> set[str]:
        """All tensor names in the checkpoint."""
        return set(self.key_to_shard)

    def shard_keys(self, shard: str) -> list[str]:
        """Tensor names stored in one shard, in a stable (sorted) order."""
        return sorted(k for k, s in self.key_to_shard.items() if s == shard)

    def get_tensor(self, key: str) -> torch.Tensor:
        """Load a single tensor (used for small companions such as quantization state)."""
        with safe_open(str(self.folder / self.key_to_shard[key]), framework="pt") as f:
            return f.get_tensor(key)

    def shape_and_dtype(self, key: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype string of one tensor, read from the header only."""
        with safe_open(str(self.folder / self.key_to_shard[key]), framework="pt") as f:
            sl = f.get_slice(key)
            return list(sl.get_shape()), sl.get_dtype()

    @property
    def is_bnb_4bit(self) -> bool:
        """True for a bitsandbytes 4-bit (pre-quantized) checkpoint."""
        qc = self.config.get("quantization_config") or {}
        if qc.get("quant_method") == "bitsandbytes" and (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
            return True
        return any(".quant_state.bitsandbytes__" in k for k in self.key_to_shard)

    @property
    def is_bnb_8bit(self) -> bool:
        """True for a bitsandbytes 8-bit (LLM.int8) checkpoint, which merge does not support."""
        qc = self.config.get("quantization_config") or {}
        return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit"))


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of one safetensors shard into memory.

    Exports call this once per shard and drop the result before the next call, which is what bounds their peak
    host memory to about one shard (tests wrap this function to check exactly that).
    """
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors shard (the single place merged weights hit the disk; tests patch it)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write model.safetensors.index.json for a sharded export."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def copy_aux_files(src: Path, dst: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the non-weight top-level files (tokenizer, processor, chat template, generation config...).

    Args:
        src: source folder.
        dst: destination folder.
        skip: file names not to copy (e.g. config.json when the caller rewrites it).

    Returns:
        The names of the copied files.
    """
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in skip or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def copy_tokenizer_overrides(adapter_dir: Path, dst: Path) -> list[str]:
    """Copy tokenizer/chat-template files saved next to the adapter over the base model's copies.

    A training run may change the chat template or add tokens; the adapter folder's copy then describes the
    fine-tuned model better than the base model's.
    """
    copied = []
    for name in TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, dst / name)
            copied.append(name)
    return copied
