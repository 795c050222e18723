"""Save and load LoRA adapters in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors).

Keys are PEFT's: `base_model.model.<module>.lora_A.weight`. `target_modules` is written as a regex that matches
exactly the adapted modules, so PEFT (which matches a string with re.fullmatch) rebuilds the same adapter, also
for Gemma 4's vision/audio linears whose LoRA sits on the inner `.linear` of a Gemma4ClippableLinear.

Module names are the CHECKPOINT's: a model loaded with ``text_only=True`` (a Gemma4ForCausalLM built from a
multimodal checkpoint, layers under ``model.``) saves its adapter under ``model.language_model.…``, the names the
full multimodal model has, so PEFT applies it to the model users serve; ``load_adapter`` maps them back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from slimtune.adapt.inject import inject_lora, is_base_linear
from slimtune.adapt.lora import lora_modules
from slimtune.errors import ConfigError, ModelLoadError
from slimtune.utils.atomic import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def targets_regex(names: list[str]) -> str:
    """A regex that fully matches exactly these module names."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def saved_name(model: nn.Module, name: str) -> str:
    """The name a module of `model` has in its checkpoint (differs only for text_only loads)."""
    ours, theirs = getattr(model, "slimtune_checkpoint_prefix", ("", ""))
    return theirs + name[len(ours):] if ours and name.startswith(ours) else name


def module_name(model: nn.Module, saved: str) -> str:
    """Inverse of `saved_name`: the module of `model` that a saved adapter name refers to."""
    ours, theirs = getattr(model, "slimtune_checkpoint_prefix", ("", ""))
    return ours + saved[len(theirs):] if theirs and saved.startswith(theirs) else saved


def saved_lora_modules(model: nn.Module) -> dict:
    """LoRA layers keyed by their checkpoint name (what adapter files store)."""
    return {saved_name(model, n): layer for n, layer in lora_modules(model).items()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-keyed LoRA tensors of a model (contiguous CPU copies), under the checkpoint's module names."""
    state = {}
    for name, layer in saved_lora_modules(model).items():
        state[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().to("cpu").contiguous()
        state[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().to("cpu").contiguous()
    return state


def adapter_config(model: nn.Module) -> dict:
    """adapter_config.json content for the model's adapters (PEFT LoraConfig fields)."""
    layers = saved_lora_modules(model)
    settings = getattr(model, "slimtune_lora", None)
    first = next(iter(layers.values()))
    rank_pattern = {re.escape(n): layer.r for n, layer in layers.items() if layer.r != first.r}
    alpha_pattern = {re.escape(n): layer.alpha for n, layer in layers.items() if layer.alpha != first.alpha}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "slimtune_source", None),
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": settings.dropout if settings else 0.0,
        "use_rslora": first.use_rslora,
        "target_modules": targets_regex(list(layers)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
    }


def save_adapter(model: nn.Module, directory, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's LoRA adapter to `directory` in PEFT format (atomically: temp folder, then rename).

    Args:
        state: the PEFT-keyed tensors to write (default: adapter_state_dict(model)); distributed training
            passes the full tensors it gathered from the FSDP2 shards.

    Raises:
        ConfigError: the model has no LoRA layers.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    if not lora_modules(model):
        raise ConfigError("this model has no LoRA adapters to save; call slimtune.add_lora(model) first.")
    directory = Path(directory)
    with atomic_dir(directory, overwrite=True) as tmp:
        save_file(state if state is not None else adapter_state_dict(model), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config(model), indent=2) + "\n")
    return directory


def _pattern_value(pattern: dict, name: str, default):
    """A rank/alpha pattern entry for a module, matched exactly as PEFT matches it."""
    from peft.utils.other import get_pattern_key  # noqa: PLC0415

    pattern = pattern or {}
    return pattern.get(get_pattern_key(pattern.keys(), name), default)


def read_adapter(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate an adapter folder; returns (config, PEFT-keyed tensors).

    Raises:
        ModelLoadError: files missing or corrupt. ConfigError: PEFT features slimtune does not support.
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise ModelLoadError(f"{directory} is not an adapter folder: {CONFIG_NAME} is missing.")
    if not w_path.is_file():
        extra = " (adapter_model.bin is not supported; re-save it with safetensors)" if (
            directory / "adapter_model.bin").exists() else ""
        raise ModelLoadError(f"{directory} has no {WEIGHTS_NAME}{extra}.")
    try:
        config = json.loads(cfg_path.read_text())
        tensors = load_file(str(w_path))
    except Exception as exc:
        raise ModelLoadError(f"adapter in {directory} is corrupt ({exc}).") from exc
    unsupported = [k for k, bad in (("use_dora", True), ("fan_in_fan_out", True)) if config.get(k) == bad]
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type={config.get('peft_type')}")
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config.get('bias')}")
    if config.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if unsupported:
        raise ConfigError(f"adapter in {directory} uses PEFT features slimtune does not support: {unsupported}.")
    return config, tensors


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Add the LoRA modules described by a PEFT adapter folder to a plainly loaded model (in place).

    Raises:
        ModelLoadError / ConfigError: unreadable adapter, or keys that match no linear layer of this model.
    """
    config, tensors = read_adapter(directory)
    if lora_modules(model):
        raise ConfigError("this model already has LoRA adapters; load the base model again before load_adapter.")
    saved = sorted({k[len(_PREFIX):-len(s)] for k in tensors for s in _SUFFIXES
                     if k.startswith(_PREFIX) and k.endswith(s)})
    names = {s: module_name(model, s) for s in saved}  # saved (checkpoint) name -> module of this model
    modules = dict(model.named_modules())
    missing = [s for s, n in names.items() if n not in modules or not is_base_linear(modules[n])]
    if not saved or missing:
        hint = (" It adapts vision/audio modules, which a text_only load does not build; load the model without "
                "text_only." if getattr(model, "slimtune_text_only", False) and any(
                    ".language_model." not in s for s in missing) else " Was it trained on another base model?")
        raise ConfigError(f"adapter in {directory} does not fit this model: "
                          f"{len(missing)} of {len(saved)} adapted modules are not linear layers here "
                          f"(first: {missing[:3]}).{hint}")
    ranks = {names[s]: tensors[f"{_PREFIX}{s}.lora_A.weight"].shape[0] for s in saved}
    alpha = config.get("lora_alpha", 8)
    # Patterns were written against the saved names, so they are matched against those (as PEFT does).
    alphas = {names[s]: float(_pattern_value(config.get("alpha_pattern"), s, alpha)) for s in saved}
    inject_lora(model, list(names.values()), r=int(config.get("r", 8)), alpha=float(alpha), dropout=0.0,
                use_rslora=bool(config.get("use_rslora", False)), seed=None, ranks=ranks, alphas=alphas)
    layers = lora_modules(model)
    with torch.no_grad():
        for s, n in names.items():
            for part in ("lora_A", "lora_B"):
                src = tensors[f"{_PREFIX}{s}.{part}.weight"]
                dst = getattr(layers[n], part).weight
                if src.shape != dst.shape:
                    raise ConfigError(f"adapter tensor {n}.{part} has shape {tuple(src.shape)}, "
                                      f"expected {tuple(dst.shape)} for this model.")
                dst.copy_(src.to(dst.dtype))
    return model
