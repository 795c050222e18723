"""The fine-tuning recipe: load → adapt → data → fit → save. CLI, Studio and Python users all call `train`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from slimtune.adapt.inject import add_lora
from slimtune.data import load_records
from slimtune.data.tokenize import tokenize_rows, text_tokenizer
from slimtune.errors import DataError
from slimtune.models.loader import load_model
from slimtune.train.config import TrainConfig
from slimtune.train.loop import FitResult, fit
from slimtune.utils.atomic import atomic_write_text


@dataclass
class TrainResult:
    """Where the run's outputs are, and its per-step metrics."""

    run_dir: Path
    adapter_dir: Path
    history: list[dict]


def prepare_model(cfg: TrainConfig):
    """Load the base model and add the configured LoRA adapters."""
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit,
                                  max_seq_length=cfg.max_seq_length, device=cfg.device)
    add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
             finetune_language_layers=cfg.finetune_language_layers, finetune_vision_layers=cfg.finetune_vision_layers,
             finetune_audio_layers=cfg.finetune_audio_layers,
             finetune_attention_modules=cfg.finetune_attention_modules,
             finetune_mlp_modules=cfg.finetune_mlp_modules, use_rslora=cfg.use_rslora, seed=cfg.seed)
    if cfg.gradient_checkpointing:
        # Non-reentrant: reentrant checkpointing drops the gradients that flow from KV-consumer layers back
        # into the producer layer's k/v projections on E2B/E4B (tests/train/test_kv_sharing.py shows it).
        enable_checkpointing(model)
    return model, tokenizer


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing through transformers' public switch (renamed in 5.24)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_data(cfg: TrainConfig, tokenizer, log=print):
    """Read, normalise and tokenize the dataset; reports skipped and truncated rows."""
    loaded = load_records(cfg.data)
    examples, stats = tokenize_rows(loaded.rows, tokenizer, max_seq_length=cfg.max_seq_length,
                                    train_on=cfg.train_on)
    log(f"data: {loaded.n_read} rows read ({loaded.format}), {loaded.n_skipped} skipped, "
        f"{stats.n_truncated} truncated to {cfg.max_seq_length} tokens, {stats.n_skipped_no_targets} without "
        f"targets; {len(examples)} samples, {stats.n_target_tokens} target tokens")
    for skip in loaded.skipped[:5]:
        log(f"  skipped {skip.location}: {skip.reason}")
    if not examples:
        raise DataError(f"{cfg.data}: no usable training samples (see the skipped rows above).")
    return examples


def write_run_config(cfg: TrainConfig, run_dir: Path) -> None:
    """The resolved config, loadable again with `slimtune train --config`."""
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def train(cfg: TrainConfig, log=print) -> TrainResult:
    """Run a full fine-tune described by `cfg`; returns where the adapter and metrics were written."""
    run_dir = Path(cfg.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(cfg, run_dir)
    model, tokenizer = prepare_model(cfg)
    examples = prepare_data(cfg, tokenizer, log)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    dtype = model.get_input_embeddings().weight.dtype
    pad_id = text_tokenizer(tokenizer).pad_token_id or 0
    result: FitResult = fit(model, examples, cfg, run_dir, pad_id=pad_id, device=device, dtype=dtype)
    log(f"adapter saved to {result.adapter_dir}")
    return TrainResult(run_dir=run_dir, adapter_dir=result.adapter_dir, history=result.history)
