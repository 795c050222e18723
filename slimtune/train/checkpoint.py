"""Checkpoints that make `--resume` bit-exact, and finding the newest complete one.

A checkpoint (RUN_DIR/checkpoints/step-NNNNNN/) holds the LoRA weights (adapter/, PEFT format) and
trainer_state.pt: optimizer, scheduler and GradScaler state, the torch CPU/CUDA RNG states (dropout), the position
in the data stream (epoch + index into that epoch's order, which is a pure function of (seed, epoch)), the
eval/early-stopping bookkeeping, the step and the run's config. Each is written through `atomic_dir`, so a kill
during a save leaves only a hidden `.step-NNNNNN.tmp-*` folder, which is never picked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from slimtune.adapt.adapter_io import (CONFIG_NAME, WEIGHTS_NAME, adapter_parameters, read_adapter,
                                      save_adapter)
from slimtune.errors import ConfigError
from slimtune.train.config import TrainConfig
from slimtune.utils.atomic import atomic_dir

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")

# Settings that may change between an interrupted run and its resume: they decide where and how often things are
# written, never the numbers the run computes. Everything else must match the checkpoint.
# max_memory only chooses other settings, and those are compared themselves; `distributed` is safe too: ddp and
# fsdp compute the same gradients and checkpoints hold full tensors. `cuda_graphs` too: the captured step computes
# the eager step's losses and updates (tests/train/test_cuda_graph.py), torch moves AdamW's step counters between
# the capturable and plain layouts on load, and "auto" may decide differently on another card.
RESUME_SAFE_KEYS = frozenset({"output", "resume", "log_every", "save_steps", "max_memory", "distributed",
                              "cuda_graphs"})


@dataclass
class ResumePoint:
    """A loaded checkpoint: its folder and the contents of its trainer_state.pt."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save_checkpoint(model: nn.Module, run_dir: Path, step: int, optimizer, scheduler, scaler,
                    extra: dict | None = None, *, adapter_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write adapter + trainer state under checkpoints/step-NNNNNN atomically; returns the folder.

    Args:
        extra: more resumable state (data position, eval bookkeeping, config, elapsed time) stored as is.
        adapter_state, optimizer_state: full (unsharded) LoRA tensors and optimizer state gathered by
            distributed training (default: read from model and optimizer), so a checkpoint looks the same
            whatever the number of processes that wrote it.
    """
    target = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    opt_state = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    state = {"step": step, "optimizer": opt_state, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             **(extra or {})}
    with atomic_dir(target, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter", state=adapter_state)
        torch.save(state, tmp / STATE_NAME)
        if "config" in state:  # for people: what this checkpoint's run was (resume reads trainer_state.pt)
            (tmp / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
    return target


def is_complete(folder: Path) -> bool:
    """A checkpoint folder whose save finished: trainer state and both adapter files are present."""
    return ((folder / STATE_NAME).is_file() and (folder / "adapter" / WEIGHTS_NAME).is_file()
            and (folder / "adapter" / CONFIG_NAME).is_file())


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, newest first; temp folders and partial saves are skipped."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        m = _STEP_DIR.match(folder.name)  # hidden `.step-…tmp-*` / `.old-*` folders never match
        if m and folder.is_dir() and is_complete(folder):
            found.append((int(m.group(1)), folder))
    return sorted(found, reverse=True)


def find_resume_point(run_dir: Path, log=print) -> ResumePoint | None:
    """Load the newest complete, readable checkpoint of a run, or None when there is none."""
    for step, folder in list_checkpoints(run_dir):
        try:
            state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file: say so and fall back to the previous checkpoint
            log(f"warning: skipping checkpoint {folder} ({type(exc).__name__}: {exc}); trying an older one")
            continue
        if isinstance(state, dict) and state.get("step") == step:
            return ResumePoint(folder, state)
        log(f"warning: skipping checkpoint {folder}: its trainer_state.pt does not describe step {step}")
    return None


def check_resume_config(saved: dict, cfg: TrainConfig, checkpoint: Path) -> None:
    """Refuse to resume when a setting that changes the run differs from the checkpoint's.

    Raises:
        ConfigError: naming every differing key with both values.
    """
    defaults = TrainConfig.__dataclass_fields__
    now = cfg.to_dict()
    diffs = []
    for key in TrainConfig.field_names():
        if key in RESUME_SAFE_KEYS:
            continue
        field_default = defaults[key].default
        before = saved.get(key, field_default)  # a key added after the checkpoint was written: its default
        if before != now[key]:
            diffs.append(f"{key} (checkpoint: {before!r}, now: {now[key]!r})")
    if diffs:
        raise ConfigError(f"cannot resume from {checkpoint}: settings that change the run differ from the "
                          f"checkpoint's: {'; '.join(diffs)}. Run with the checkpoint's values (listed in "
                          f"{checkpoint / 'config.yaml'}), or drop --resume / use a new --output to start over.")


def restore_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Copy a checkpoint's LoRA weights into the model's (already injected) LoRA layers, bit for bit.

    Raises:
        ConfigError: the checkpoint's adapter has other layers than this model's.
    """
    _, tensors = read_adapter(adapter_dir)
    live = adapter_parameters(model)  # file keys (checkpoint names for text_only; expert LoRA included)
    expected = set(live)
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ConfigError(f"the adapter in {adapter_dir} does not match this model's LoRA layers (missing "
                          f"{missing}, unexpected {extra}); was the checkpoint written for another model?")
    with torch.no_grad():
        for key, weight in live.items():
            weight.copy_(tensors[key].to(weight.device, weight.dtype))


def restore_rng(state: dict) -> None:
    """Put the torch RNGs back where the checkpoint left them (dropout masks continue identically)."""
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
