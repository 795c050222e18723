"""`export()`: turn a training run (or a bare adapter) into a shareable model in one of five formats."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from slimtune.errors import ExportError
from slimtune.export.atomic import atomic_output_dir, check_output_free
from slimtune.export.checkpoint import TOKENIZER_FILES, Checkpoint
from slimtune.export.lora_plan import load_adapter_plan, match_base_keys
from slimtune.export.source import ExportSource, resolve_base_dir, resolve_source

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "export"]

#: Export formats: name -> what it writes. The CLI and Studio list these names.
EXPORT_FORMATS: dict[str, str] = {
    "lora": "the PEFT adapter alone (adapter_config.json + adapter_model.safetensors), validated",
    "merged-16bit": "base + adapter merged, HF safetensors in the base model's 16-bit dtype",
    "merged-4bit": "base + adapter merged, re-quantized to bitsandbytes NF4 (loads with from_pretrained)",
    "gguf-bf16": "base + adapter merged, GGUF BF16 for llama.cpp (+ mmproj-*.gguf for vision/audio)",
    "gguf-q8_0": "base + adapter merged, GGUF Q8_0 for llama.cpp (+ mmproj-*.gguf for vision/audio)",
}

_SCRATCH = ".merged-16bit"  # merged weights inside the temp folder, for formats that post-process them


def _export_lora(src: ExportSource, tmp: Path, progress: bool) -> None:
    # Validate before copying: the adapter must parse, and when its base is available locally, match it.
    plan = load_adapter_plan(src.adapter_dir, src.adapter_config)
    try:
        base_dir = resolve_base_dir(src.base_model, run_dir=src.run_dir)
    except ExportError as exc:
        logger.warning("could not check the adapter against its base model (%s); copying it unchecked", exc)
    else:
        match_base_keys(plan, Checkpoint.open(base_dir).tensor_names(), base_name=src.base_model)
    keep = ("adapter_config.json", "adapter_model.safetensors", "README.md", *TOKENIZER_FILES)
    for name in keep:
        if (src.adapter_dir / name).is_file():
            shutil.copy2(src.adapter_dir / name, tmp / name)


def _merge(src: ExportSource, out: Path, progress: bool) -> None:
    from slimtune.export.merge import merge_adapter

    base_dir = resolve_base_dir(src.base_model, run_dir=src.run_dir)
    out.mkdir(exist_ok=True)
    merge_adapter(src.adapter_dir, src.adapter_config, base_dir, out, progress=progress)


def _export_merged_16bit(src: ExportSource, tmp: Path, progress: bool) -> None:
    _merge(src, tmp, progress)


def _export_merged_4bit(src: ExportSource, tmp: Path, progress: bool) -> None:
    from slimtune.export.merge_4bit import quantize_to_nf4

    scratch = tmp / _SCRATCH
    _merge(src, scratch, progress)
    quantize_to_nf4(scratch, tmp)
    shutil.rmtree(scratch)


def _gguf_exporter(qtype: str):
    def run(src: ExportSource, tmp: Path, progress: bool) -> None:
        from slimtune.export.gguf_export import write_gguf

        scratch = tmp / _SCRATCH
        _merge(src, scratch, progress)
        name = Path(src.base_model.rstrip("/")).name or "model"
        write_gguf(scratch, tmp, qtype=qtype, name=name, progress=progress)
        shutil.rmtree(scratch)

    return run


_EXPORTERS = {
    "lora": _export_lora,
    "merged-16bit": _export_merged_16bit,
    "merged-4bit": _export_merged_4bit,
    "gguf-bf16": _gguf_exporter("bf16"),
    "gguf-q8_0": _gguf_exporter("q8_0"),
}


def export(
    source: Path | str,
    format: str,
    out: Path | str,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export a fine-tuned adapter, alone or merged into its base model.

    The export is built in a temp folder beside `out` and renamed to `out` only when complete; on any failure
    (including a full disk) nothing is left at `out` and the temp folder is removed. Merging streams the base
    checkpoint one safetensors shard at a time, so host memory stays near one shard plus the adapter.

    Example::

        from slimtune.export import export
        export("runs/gemma4-e2b-chat", "gguf-q8_0", "exports/e2b-chat-gguf")

    Args:
        source: a training run folder (with ``adapter/`` and ``config.yaml``) or a PEFT adapter folder.
        format: one of `EXPORT_FORMATS`: ``lora``, ``merged-16bit``, ``merged-4bit``, ``gguf-bf16``,
            ``gguf-q8_0``.
        out: folder to create. GGUF formats write ``<base>-BF16.gguf`` / ``<base>-Q8_0.gguf`` into it, plus
            ``mmproj-<base>-*.gguf`` when the model has vision/audio towers.
        overwrite: replace `out` if it exists.
        progress: show progress bars.

    Returns:
        The output folder.

    Raises:
        ExportError: unknown format, `out` exists without `overwrite`, no adapter in `source`, base model not
            found locally, adapter keys matching no base weight, unsupported adapter features, or a write failure
            such as a full disk.
    """
    fmt = str(format).strip().lower()
    if fmt not in _EXPORTERS:
        raise ExportError(f"unknown export format {format!r}; valid formats are: {', '.join(EXPORT_FORMATS)}")
    out_path = Path(out).expanduser().absolute()
    check_output_free(out_path, overwrite=overwrite)  # fail before any slow work
    src = resolve_source(source)
    if fmt != "lora":
        resolve_base_dir(src.base_model, run_dir=src.run_dir)  # "base not found" before creating anything
    with atomic_output_dir(out_path, overwrite=overwrite) as tmp:
        _EXPORTERS[fmt](src, tmp, progress)
    logger.info("exported %s (%s) to %s", src.adapter_dir, fmt, out_path)
    return out_path
