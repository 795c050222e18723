"""The fine-tuning recipe: load → adapt → data → fit → save. CLI, Studio and Python users all call `train`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from slimtune.adapt.inject import add_lora
from slimtune.data import load_records
from slimtune.data.tokenize import tokenize_rows, text_tokenizer
from slimtune.errors import ConfigError, DataError, TrainingOutOfMemoryError
from slimtune.memory.activation_offload import enable_activation_offload
from slimtune.memory.tiled_mlp import tile_decoder_mlps
from slimtune.adapt.rms_norm import swap_rms_norms
from slimtune.models.loader import load_model
from slimtune.train.checkpoint import check_resume_config, find_resume_point
from slimtune.train.config import TrainConfig
from slimtune.train.distributed import DistInfo, init_distributed, shutdown_distributed
from slimtune.train.evaluate import split_eval
from slimtune.train.loop import FitResult, fit
from slimtune.utils.atomic import atomic_write_text


@dataclass
class TrainResult:
    """Where the run's outputs are, and its per-step metrics."""

    run_dir: Path
    adapter_dir: Path
    history: list[dict]
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_early: bool = False


def prepare_model(cfg: TrainConfig, device: str | None = None):
    """Load the base model and add the configured LoRA adapters.

    Args:
        device: overrides cfg.device (under torchrun each process uses cuda:LOCAL_RANK).
    """
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit,
                                  max_seq_length=cfg.max_seq_length, device=device or cfg.device,
                                  text_only=cfg.text_only)
    if cfg.chat_template != "auto":
        from slimtune.data.chat_template import GEMMA4_CHAT_TEMPLATE, GEMMA4_THINKING_CHAT_TEMPLATE  # noqa: PLC0415

        template = GEMMA4_THINKING_CHAT_TEMPLATE if cfg.chat_template == "gemma4-thinking" else GEMMA4_CHAT_TEMPLATE
        text_tokenizer(tokenizer).chat_template = template
        if tokenizer is not text_tokenizer(tokenizer):
            tokenizer.chat_template = template
    add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
             finetune_language_layers=cfg.finetune_language_layers, finetune_vision_layers=cfg.finetune_vision_layers,
             finetune_audio_layers=cfg.finetune_audio_layers,
             finetune_multimodal_embedders=cfg.finetune_multimodal_embedders,
             finetune_attention_modules=cfg.finetune_attention_modules,
             finetune_mlp_modules=cfg.finetune_mlp_modules, use_rslora=cfg.use_rslora, seed=cfg.seed,
             finetune_experts=cfg.finetune_experts)
    apply_layer_switches(model, mlp_chunk_size=cfg.mlp_chunk_size, recompute_norms=cfg.recompute_norms,
                         compile_layers=cfg.compile_layers, loss_chunk_size=cfg.loss_chunk_size,
                         gradient_checkpointing=cfg.gradient_checkpointing,
                         activation_offload=cfg.activation_offload, checkpoint_layers=cfg.checkpoint_layers)
    return model, tokenizer


def apply_layer_switches(model, *, mlp_chunk_size: int = 0, recompute_norms: bool = False,
                         compile_layers: bool = False, loss_chunk_size: int = 0, gradient_checkpointing: bool = True,
                         activation_offload: bool = False, checkpoint_layers: int | None = None):
    """The memory and speed switches on a LoRA-adapted model, in the one order that works (training and bench).

    Module swaps first (tiled MLP, recomputed norms), then each decoder layer compiled (after every swap, so the
    compiled code is the swapped one), then checkpointing, then activation offload (it wraps the checkpoint
    function checkpointing installs). Returns the activation offloader, or None.
    """
    if mlp_chunk_size:
        tile_decoder_mlps(model, mlp_chunk_size)
    if recompute_norms:
        swap_rms_norms(model)
    if compile_layers:
        from slimtune.adapt.compile import compile_decoder_layers  # noqa: PLC0415

        compile_decoder_layers(model)
    model.slimtune_loss_chunk_size = loss_chunk_size or None  # read by train.loss.loss_sum (None = auto)
    if gradient_checkpointing:
        # Non-reentrant: reentrant checkpointing drops the gradients that flow from KV-consumer layers back
        # into the producer layer's k/v projections on E2B/E4B (tests/train/test_kv_sharing.py shows it).
        enable_checkpointing(model, checkpoint_layers)
    return enable_activation_offload(model) if activation_offload else None


def enable_checkpointing(model, layers: int | None = None, *, preserve_rng_state: bool = True) -> None:
    """Non-reentrant activation checkpointing through transformers' public switch (renamed in 5.24).

    ``layers``: how many decoder layers recompute (the first ``layers``; None = all). The others keep their
    activations from the forward: less recompute, more memory. Each layer reads its own ``gradient_checkpointing``
    flag (transformers' GradientCheckpointingLayer), so the mix needs no other change; non-reentrant checkpointing
    keeps the KV-sharing gradients either way (tests/train/test_kv_sharing.py). ``preserve_rng_state=False``: the
    CUDA-graph step's setting (reading the RNG state is a host sync; nothing random runs there).
    """
    kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if layers is not None:
        decoder_layers = list(model.get_decoder().layers)
        if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= len(decoder_layers):
            raise ConfigError(f"checkpoint_layers must be an integer from 0 to the model's {len(decoder_layers)} "
                              f"decoder layers, or unset for all of them (got {layers!r})")
        for i, layer in enumerate(decoder_layers):
            layer.gradient_checkpointing = i < layers


def media_root(data: str) -> Path:
    """Image/audio paths in a dataset are relative to the dataset file (or the folder of files)."""
    path = Path(data)
    return path if path.is_dir() else path.parent


def media_front_end(cfg: TrainConfig):
    """The image processor + feature extractor of a local multimodal checkpoint (None otherwise, or text_only)."""
    if cfg.text_only:
        return None
    return _media_front_end(str(Path(cfg.model).expanduser()), cfg.image_max_soft_tokens)


@functools.lru_cache(maxsize=4)  # training and eval data share one front end: read the checkpoint files once
def _media_front_end(folder: str, max_soft_tokens: int | None):
    if not (Path(folder) / "processor_config.json").is_file():
        return None
    from slimtune.data.multimodal import load_media_front_end  # noqa: PLC0415

    return load_media_front_end(folder, max_soft_tokens=max_soft_tokens)


def prepare_data(cfg: TrainConfig, tokenizer, log=print):
    """Read, normalise and tokenize the dataset; reports skipped and truncated rows."""
    loaded = load_records(cfg.data, tool_messages=cfg.tool_messages)
    examples, stats = tokenize_rows(loaded.rows, tokenizer, max_seq_length=cfg.max_seq_length,
                                    train_on=cfg.train_on, media_root=media_root(cfg.data),
                                    media_front_end=media_front_end(cfg), allow_media=not cfg.text_only)
    log(f"data: {loaded.n_read} rows read ({loaded.format}), {loaded.n_skipped} skipped, "
        f"{stats.n_truncated} truncated to {cfg.max_seq_length} tokens, {stats.n_skipped_no_targets} without "
        f"targets; {len(examples)} samples, {stats.n_target_tokens} target tokens")
    for skip in loaded.skipped[:5]:
        log(f"  skipped {skip.location}: {skip.reason}")
    if not examples:
        raise DataError(f"{cfg.data}: no usable training samples (see the skipped rows above).")
    return examples


def prepare_eval_data(cfg: TrainConfig, tokenizer, examples: list, log=print) -> tuple[list, list | None]:
    """The eval set: cfg.eval_data tokenized like the training data, or a seeded cfg.eval_fraction split.

    Returns:
        (training examples, eval examples or None when no eval set is configured).

    Raises:
        DataError: the eval file has no usable samples, or the split would leave no training samples.
    """
    if cfg.eval_data:
        loaded = load_records(cfg.eval_data, tool_messages=cfg.tool_messages)
        held, _ = tokenize_rows(loaded.rows, tokenizer, max_seq_length=cfg.max_seq_length, train_on=cfg.train_on,
                                media_root=media_root(cfg.eval_data), media_front_end=media_front_end(cfg),
                                allow_media=not cfg.text_only)
        if not held:
            raise DataError(f"eval_data {cfg.eval_data}: no usable samples ({loaded.n_read} rows read, "
                            f"{loaded.n_skipped} skipped); point eval_data at a dataset with assistant replies.")
        log(f"eval: {len(held)} samples from {cfg.eval_data}")
        return examples, held
    if cfg.eval_fraction > 0:
        train_part, held = split_eval(examples, cfg.eval_fraction, cfg.seed)
        if not train_part:
            raise DataError(f"eval_fraction={cfg.eval_fraction} leaves no training samples out of "
                            f"{len(examples)}; use a smaller eval_fraction or more data.")
        log(f"eval: {len(held)} of {len(examples)} samples split off (eval_fraction={cfg.eval_fraction})")
        return train_part, held
    return examples, None


def write_run_config(cfg: TrainConfig, run_dir: Path) -> None:
    """The resolved config, loadable again with `slimtune train --config`."""
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def train(cfg: TrainConfig, log=print) -> TrainResult:
    """Run a full fine-tune described by `cfg`; returns where the adapter and metrics were written.

    Under torchrun (WORLD_SIZE > 1) every process calls this: it joins the process group (nccl on
    cuda:LOCAL_RANK, gloo on CPU), trains its share of the data with DDP or FSDP2 (cfg.distributed), lets
    rank 0 alone write and print, and destroys the group at the end.
    """
    from slimtune.memory.train_plan import apply_memory_plan  # noqa: PLC0415

    info, device = init_distributed(cfg.device)
    try:
        # prints the per-GPU prediction (rank 0); with max_memory (a per-GPU budget), fills in the unset settings
        # alike on every rank
        cfg = apply_memory_plan(cfg, log if info.is_main else _quiet, world_size=info.world_size)
        return _train(cfg, log if info.is_main else _quiet, info, device)
    finally:
        shutdown_distributed(info)


def _quiet(*_args, **_kwargs) -> None:
    """Ranks other than 0 print nothing: rank 0 reports for the whole job."""


def _train(cfg: TrainConfig, log, info: DistInfo, device_name: str | None) -> TrainResult:
    run_dir = Path(cfg.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = None
    if cfg.resume:
        # Checked before anything is loaded or written, so a refused resume leaves the run folder untouched.
        resume = find_resume_point(run_dir, log)
        if resume is None:
            log(f"note: --resume given but {run_dir / 'checkpoints'} has no complete checkpoint; starting fresh")
        else:
            check_resume_config(resume.state.get("config", {}), cfg, resume.path)
            log(f"resuming from {resume.path} (step {resume.step})")
    if info.is_main:
        write_run_config(cfg, run_dir)
    if info.enabled:
        log(f"distributed: {info.world_size} processes, {cfg.distributed}"
            f"{' (ddp)' if cfg.distributed == 'auto' else ''} on {device_name}")
    model, tokenizer = prepare_model(cfg, device=device_name)
    examples = prepare_data(cfg, tokenizer, log)
    examples, eval_examples = prepare_eval_data(cfg, tokenizer, examples, log)
    if cfg.packing:  # after the eval split: eval samples stay whole and unpacked
        from slimtune.data.packing import pack_examples, packing_stats  # noqa: PLC0415

        examples = pack_examples(examples, cfg.max_seq_length, seed=cfg.seed)
        log(packing_stats(examples, cfg.max_seq_length).summary())
    device = next(p.device for p in model.parameters() if p.requires_grad)
    dtype = model.get_input_embeddings().weight.dtype
    pad_id = text_tokenizer(tokenizer).pad_token_id or 0
    try:
        # the caller's log gets the loop's lines too (step lines, cuda_graphs decisions); plain print would break
        # the progress bar, so it becomes tqdm.write, the loop's own default
        result: FitResult = fit(model, examples, cfg, run_dir, pad_id=pad_id, device=device, dtype=dtype,
                                eval_examples=eval_examples, resume=resume, dist_info=info,
                                log=tqdm.write if log is print else log)
    except torch.OutOfMemoryError as exc:
        from slimtune.memory.oom import explain_oom  # noqa: PLC0415

        raise TrainingOutOfMemoryError(explain_oom(cfg, exc)) from exc
    log(f"adapter saved to {result.adapter_dir}")
    if result.best_step is not None:
        log(f"best eval loss {result.best_eval_loss:.4f} at step {result.best_step}; adapter in {run_dir / 'best'}")
    return TrainResult(run_dir=run_dir, adapter_dir=result.adapter_dir, history=result.history,
                       best_step=result.best_step, best_eval_loss=result.best_eval_loss,
                       stopped_early=result.stopped_early)
