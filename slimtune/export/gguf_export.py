"""Write a Gemma 4 HF checkpoint folder as GGUF (BF16 or Q8_0), streaming one tensor at a time.

The text decoder goes into ``<name>-<TYPE>.gguf`` (architecture ``gemma4``); when the checkpoint has vision
and/or audio towers they go, with their projections into the text model, into ``mmproj-<name>-<TYPE>.gguf``
(architecture ``clip``), the split llama.cpp's ``llama-mtmd-cli`` / ``llama-server --mmproj`` expect.

Two passes keep memory at about one encoded tensor: pass 1 reads only shard headers and registers every tensor's
GGUF name, type and byte size with ``GGUFWriter.add_tensor_info``; pass 2 reads, converts and writes tensors in
exactly that order with ``write_tensor_data`` (big ones read and encoded in slices of their first dimension). Quantization is done in Python by ``gguf.quants`` (BF16, Q8_0); tensors llama.cpp
keeps in F32 (norms, 1-D tensors, router, scales) stay F32, and a tensor whose rows are not a multiple of Q8_0's
32-element block falls back to F16, as llama.cpp's converter does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from slimtune.errors import ExportError, UnsupportedModelError
from slimtune.export.checkpoint import Checkpoint
from slimtune.export.gguf_metadata import (
    add_mmproj_metadata,
    add_text_metadata,
    add_tokenizer_metadata,
    rope_freqs_full,
    text_geometry,
)
from slimtune.export.gguf_names import (
    force_f32,
    is_mmproj_tensor,
    is_text_tensor,
    mmproj_gguf_name,
    mmproj_transform,
    text_gguf_name,
)

logger = logging.getLogger(__name__)

__all__ = ["GGUF_TYPES", "write_gguf"]

Q = gguf.GGMLQuantizationType
# export format suffix -> (tensor type for "big" weights, GGUF file type, file-name tag)
GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType, str]] = {
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16, "BF16"),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class _Entry:
    hf_name: str | None  # None for generated tensors (rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    data: np.ndarray | None = None  # generated tensors only


def _pick_type(gguf_name: str, hf_name: str, shape: tuple[int, ...], big: Q, mmproj: bool) -> Q:
    if force_f32(gguf_name, hf_name, len(shape), mmproj):
        return Q.F32
    if big == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return Q.F16  # llama.cpp's converter falls back to F16 when a row does not fill whole Q8_0 blocks
    return big


def _nbytes(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], int]:
    if qtype in (Q.F32, Q.F16):
        return shape, int(np.prod(shape)) * (4 if qtype == Q.F32 else 2)
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, int(np.prod(byte_shape))


_CHUNK_ELEMENTS = 1 << 24  # 16 M values (64 MiB in fp32) converted at a time


def _encode(t: torch.Tensor, qtype: Q) -> np.ndarray:
    arr = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def _encode_chunked(ckpt: Checkpoint, key: str, shape: tuple[int, ...], qtype: Q) -> np.ndarray:
    """Read and encode a big tensor slice by slice along its first dimension.

    Peak memory is the encoded output plus one fp32 chunk, instead of the whole tensor in fp32 (E2B's per-layer
    embedding table alone is 2.3 G values: 9.4 GB in fp32 against 2.5 GB as Q8_0).
    """
    byte_shape, _ = _nbytes(shape, qtype)
    out = np.empty(byte_shape, dtype=np.uint8)
    per_row = int(np.prod(shape[1:]))
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    with safe_open(str(ckpt.folder / ckpt.key_to_shard[key]), framework="pt") as f:
        sl = f.get_slice(key)
        for i in range(0, shape[0], step):
            out[i : i + step] = _encode(sl[i : i + step], qtype)
    return out


def _plan(ckpt: Checkpoint, big: Q, text_map: gguf.TensorNameMap, mm_map: gguf.TensorNameMap | None):
    text: list[_Entry] = []
    mmproj: list[_Entry] = []
    shapes: dict[str, list[int]] = {}
    for shard in ckpt.shards:
        for key in ckpt.shard_keys(shard):
            shape, st_dtype = ckpt.shape_and_dtype(key)
            if st_dtype not in _ST_DTYPES:
                raise ExportError(
                    f"tensor {key!r} has dtype {st_dtype}; GGUF export needs a 16/32-bit checkpoint (merge first)"
                )
            if is_mmproj_tensor(key):
                if mm_map is None:
                    continue
                meta = mmproj_transform(key, torch.empty(shape, dtype=torch.float32, device="meta"))
                name = mmproj_gguf_name(key, mm_map)
                out_shape = tuple(meta.shape)
                mmproj.append(_Entry(key, name, out_shape, _pick_type(name, key, out_shape, big, True),
                                     transform=lambda t, k=key: mmproj_transform(k, t)))
            elif is_text_tensor(key):
                shapes[key.replace("language_model.", "", 1)] = shape
                name = text_gguf_name(key, text_map)
                text.append(_Entry(key, name, tuple(shape), _pick_type(name, key, tuple(shape), big, False)))
    return text, mmproj, shapes


def _write_file(path: Path, writer: gguf.GGUFWriter, entries: list[_Entry], ckpt: Checkpoint, progress: bool) -> None:
    for e in entries:
        byte_shape, nbytes = _nbytes(e.shape, e.qtype)
        if e.qtype in (Q.F32, Q.F16):
            writer.add_tensor_info(e.gguf_name, e.shape, np.dtype(np.float32 if e.qtype == Q.F32 else np.float16), nbytes)
        else:
            writer.add_tensor_info(e.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=e.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    items = entries
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(entries, desc=f"writing {path.name}", unit="tensor")
    # Reading tensor by tensor (not shard by shard) keeps memory at one tensor plus its encoded copy.
    for e in items:
        if e.data is not None:
            arr = e.data
        elif e.transform is None and e.qtype in (Q.BF16, Q.Q8_0) and len(e.shape) >= 2:
            arr = _encode_chunked(ckpt, e.hf_name, e.shape, e.qtype)
        else:
            t = ckpt.get_tensor(e.hf_name)
            if e.transform is not None:
                t = e.transform(t)
            arr = _encode(t, e.qtype)
            del t
        writer.write_tensor_data(arr)
        del arr


def _write_one(path: Path, arch, gguf_type: str, name: str, file_type: int, add_metadata, entries, ckpt,
               progress) -> Path:
    """One GGUF file: the common header keys, the file's own metadata, then its tensors."""
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    try:
        w.add_type(gguf_type)
        w.add_name(name)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_metadata(w)
        _write_file(path, w, entries, ckpt, progress)
    finally:
        w.close()
    return path


def write_gguf(model_dir: Path, out_dir: Path, *, qtype: str, name: str, progress: bool = True) -> list[Path]:
    """Convert a (merged) Gemma 4 HF checkpoint folder into GGUF file(s).

    Args:
        model_dir: HF folder with config.json, 16/32-bit safetensors and tokenizer files.
        out_dir: existing folder to write into.
        qtype: "bf16" or "q8_0".
        name: base of the file names and ``general.name``.
        progress: show progress bars.

    Returns:
        The written files: the text model first, then the projector file if the model has towers.

    Raises:
        UnsupportedModelError: the checkpoint is not Gemma 4.
        ExportError: unknown qtype, quantized/unsupported tensors, missing tokenizer, or unmapped tensor names.
    """
    if qtype not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {qtype!r}; choose one of {sorted(GGUF_TYPES)}")
    big, file_type, tag = GGUF_TYPES[qtype]
    ckpt = Checkpoint.open(model_dir)
    cfg = ckpt.config
    if cfg.get("model_type") not in ("gemma4", "gemma4_text"):
        raise UnsupportedModelError(
            f"GGUF export supports Gemma 4 checkpoints only; {str(model_dir)!r} has model_type {cfg.get('model_type')!r}"
        )
    text_cfg = cfg.get("text_config") or cfg
    n_layers = int(text_cfg["num_hidden_layers"])
    has_towers = bool(cfg.get("vision_config") or cfg.get("audio_config")) and any(
        is_mmproj_tensor(k) for k in ckpt.tensor_names()
    )
    n_mm_blocks = max(
        int((cfg.get("vision_config") or {}).get("num_hidden_layers", 0)),
        int((cfg.get("audio_config") or {}).get("num_hidden_layers", 0)),
    )
    text_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n_layers)
    mm_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_mm_blocks) if has_towers else None
    try:
        text, mmproj, shapes = _plan(ckpt, big, text_map, mm_map)
    except KeyError as exc:
        raise ExportError(f"GGUF export cannot name a tensor: {exc.args[0]}") from exc
    geo = text_geometry(text_cfg, shapes)
    rope = rope_freqs_full(text_cfg, geo.head_dim_full)
    text.insert(0, _Entry(None, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope.shape, Q.F32, data=rope))
    n_vocab = shapes["model.embed_tokens.weight"][0]

    def text_metadata(w) -> None:
        add_text_metadata(w, text_cfg, geo)
        add_tokenizer_metadata(w, model_dir, n_vocab)

    written = [_write_one(out_dir / f"{name}-{tag}.gguf", gguf.MODEL_ARCH.GEMMA4, gguf.GGUFType.MODEL, name,
                          file_type, text_metadata, text, ckpt, progress)]
    if mm_map is not None:
        written.append(_write_one(out_dir / f"mmproj-{name}-{tag}.gguf", gguf.MODEL_ARCH.MMPROJ,
                                  gguf.GGUFType.MMPROJ, name, file_type,
                                  lambda w: add_mmproj_metadata(w, cfg, model_dir), mmproj, ckpt, progress))
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return written
