"""Re-quantize a merged 16-bit checkpoint to bitsandbytes NF4, in the layout transformers itself writes.

Rather than re-implementing bitsandbytes' serialisation (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``) and transformers' choice of which modules to
quantize, this loads the merged model with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``
and calls ``save_pretrained``. The result is therefore exactly what ``from_pretrained`` expects, quantization_config
included. This works on CPU with bitsandbytes >= 0.48.

Memory: unlike the 16-bit merge this step holds the whole quantized model (4-bit linears, 16-bit embeddings and
norms) in memory, on the GPU when one is available.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from slimtune.errors import ExportError
from slimtune.export.checkpoint import copy_aux_files
from slimtune.export.source import read_json

logger = logging.getLogger(__name__)

__all__ = ["quantize_to_nf4"]

_COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _model_class(config: dict):
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ExportError(
        f"cannot tell which transformers class loads this checkpoint (architectures={config.get('architectures')}); "
        "config.json needs an `architectures` entry such as Gemma4ForConditionalGeneration"
    )


def quantize_to_nf4(
    merged_dir: Path,
    out_dir: Path,
    *,
    double_quant: bool = True,
    max_shard_size: str = "5GB",
) -> None:
    """Quantize the merged checkpoint in `merged_dir` to NF4 and save it into `out_dir`.

    Args:
        merged_dir: a 16-bit (or fp32) HF checkpoint folder, e.g. the output of `merge_adapter`.
        out_dir: existing empty folder to write into.
        double_quant: also quantize the per-block absmax values (QLoRA's default; saves ~0.4 bit/weight).
        max_shard_size: shard size passed to ``save_pretrained``.

    Raises:
        ExportError: the architecture is unknown or bitsandbytes cannot quantize here.
    """
    from transformers import BitsAndBytesConfig

    config = read_json(merged_dir / "config.json")
    cls = _model_class(config)
    dtype_name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    compute_dtype = _COMPUTE_DTYPES.get(dtype_name, torch.bfloat16)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    # Quantizing on the GPU is much faster; bitsandbytes' CPU backend gives the same NF4 codes.
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        model = cls.from_pretrained(merged_dir, quantization_config=quant, device_map=device, dtype=compute_dtype)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise ExportError(f"bitsandbytes could not quantize the merged model to NF4 on {device}: {exc}") from exc
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    del model
    # save_pretrained writes config.json (with quantization_config) and generation_config.json; the tokenizer,
    # processor and chat template come from the merged folder.
    copy_aux_files(merged_dir, out_dir, skip=("config.json", "generation_config.json"))
    logger.info("wrote NF4 checkpoint to %s", out_dir)
