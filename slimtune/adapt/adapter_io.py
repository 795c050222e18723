"""Save and load LoRA adapters in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors).

Keys are PEFT's: `base_model.model.<module>.lora_A.weight`. `target_modules` is written as a regex that matches
exactly the adapted modules, so PEFT (which matches a string with re.fullmatch) rebuilds the same adapter, also
for Gemma 4's vision/audio linears whose LoRA sits on the inner `.linear` of a Gemma4ClippableLinear.

Module names are the CHECKPOINT's: a model loaded with ``text_only=True`` (a Gemma4ForCausalLM built from a
multimodal checkpoint, layers under ``model.``) saves its adapter under ``model.language_model.…``, the names the
full multimodal model has, so PEFT applies it to the model users serve; ``load_adapter`` maps them back.

Expert LoRA (slimtune.adapt.experts) is written as PEFT's ``target_parameters`` adapters are: PEFT wraps the
experts block once per targeted parameter, in the block's parameter order, so with both tensors adapted
``<experts>.base_layer.lora_A.weight`` is gate_up_proj's and ``<experts>.lora_A.weight`` is down_proj's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from slimtune.adapt.experts import EXPERT_PARAMS, experts_modules, inject_expert_lora, is_experts_module
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


def _nested_prefixes(name: str, params: list[str]) -> dict[str, str]:
    """PEFT's module path for each adapted parameter of an experts block: the last-wrapped one is outermost."""
    return {p: name + ".base_layer" * (len(params) - 1 - i) for i, p in enumerate(params)}


def saved_expert_adapters(model: nn.Module) -> dict:
    """Expert LoRA factors keyed by the checkpoint name of the parameter they adapt (``<block>.gate_up_proj``)."""
    return {f"{saved_name(model, n)}.{p}": a for n, block in experts_modules(model).items()
            for p, a in block.adapters.items()}


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live LoRA parameters keyed as in the adapter file (PEFT keys, checkpoint module names)."""
    params = {}
    for name, layer in saved_lora_modules(model).items():
        params[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        params[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    for name, block in experts_modules(model).items():
        for p, path in _nested_prefixes(saved_name(model, name), list(block.adapters)).items():
            params[f"{_PREFIX}{path}.lora_A.weight"] = block.adapters[p].lora_A
            params[f"{_PREFIX}{path}.lora_B.weight"] = block.adapters[p].lora_B
    return params


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-keyed LoRA tensors of a model (contiguous CPU copies), under the checkpoint's module names."""
    return {k: v.detach().to("cpu").contiguous() for k, v in adapter_parameters(model).items()}


def adapter_config(model: nn.Module) -> dict:
    """adapter_config.json content for the model's adapters (PEFT LoraConfig fields)."""
    layers = saved_lora_modules(model)
    experts = saved_expert_adapters(model)  # PEFT matches rank/alpha patterns on the full parameter name
    settings = getattr(model, "slimtune_lora", None)
    every = {**layers, **experts}
    first = next(iter(every.values()))
    rank_pattern = {re.escape(n): layer.r for n, layer in every.items() if layer.r != first.r}
    alpha_pattern = {re.escape(n): layer.alpha for n, layer in every.items() if layer.alpha != first.alpha}
    extra = {"target_parameters": list(experts)} if experts else {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(model, "slimtune_source", None),
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": settings.dropout if settings else 0.0,
        "use_rslora": first.use_rslora,
        "target_modules": targets_regex(list(layers)) if layers else [],
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
        **extra,
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

    if not lora_modules(model) and not experts_modules(model):
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


def _expert_plan(model: nn.Module, config: dict) -> dict[str, list[str]]:
    """Expert blocks of `model` (module names) and which parameters the config's target_parameters adapt there,
    matched as PEFT matches them (the full ``<block>.<param>`` name, or a dotted suffix of it)."""
    wanted = config.get("target_parameters") or []
    plan = {}
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        full = saved_name(model, name)
        params = [p for p in EXPERT_PARAMS
                  if any(f"{full}.{p}" == t or f"{full}.{p}".endswith("." + t) for t in wanted)]
        if params:
            plan[name] = params
    return plan


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Add the LoRA modules described by a PEFT adapter folder to a plainly loaded model (in place).

    Raises:
        ModelLoadError / ConfigError: unreadable adapter, or keys that match no linear layer / expert tensor.
    """
    config, tensors = read_adapter(directory)
    if lora_modules(model) or experts_modules(model):
        raise ConfigError("this model already has LoRA adapters; load the base model again before load_adapter.")
    experts = _expert_plan(model, config)
    if config.get("target_parameters") and not experts:
        raise ConfigError(f"adapter in {directory} adapts parameters {config['target_parameters']} that match no "
                          "MoE expert tensor of this model (only fused Gemma 4 expert tensors are supported).")
    expert_keys = {}  # file key -> (block, param, part)
    for name, params in experts.items():
        for p, path in _nested_prefixes(saved_name(model, name), params).items():
            for part in ("lora_A", "lora_B"):
                expert_keys[f"{_PREFIX}{path}.{part}.weight"] = (name, p, part)
    absent = [k for k in expert_keys if k not in tensors]
    if absent:
        raise ConfigError(f"adapter in {directory} lists target_parameters but lacks their tensors "
                          f"(first: {absent[:2]}).")
    saved = sorted({k[len(_PREFIX):-len(s)] for k in tensors for s in _SUFFIXES
                     if k.startswith(_PREFIX) and k.endswith(s) and k not in expert_keys})
    names = {s: module_name(model, s) for s in saved}  # saved (checkpoint) name -> module of this model
    modules = dict(model.named_modules())
    missing = [s for s, n in names.items() if n not in modules or not is_base_linear(modules[n])]
    if not (saved or experts) or missing:
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
    e_ranks, e_alphas = {}, {}
    for key, (name, p, part) in expert_keys.items():
        full = f"{saved_name(model, name)}.{p}"
        if part == "lora_A":  # A is (r·E, in): the rank is its rows over the expert count
            e_ranks[f"{name}.{p}"] = tensors[key].shape[0] // model.get_submodule(name).num_experts
            e_alphas[f"{name}.{p}"] = float(_pattern_value(config.get("alpha_pattern"), full, alpha))
    inject_expert_lora(model, experts, r=int(config.get("r", 8)), alpha=float(alpha),
                       use_rslora=bool(config.get("use_rslora", False)), seed=None, ranks=e_ranks, alphas=e_alphas)
    if experts:
        model.slimtune_lora.expert_targets = list(experts)
    live = adapter_parameters(model)
    with torch.no_grad():
        for key, dst in live.items():
            src = tensors[key]
            if src.shape != dst.shape:
                raise ConfigError(f"adapter tensor {key[len(_PREFIX):]} has shape {tuple(src.shape)}, "
                                  f"expected {tuple(dst.shape)} for this model.")
            dst.copy_(src.to(dst.dtype))
    return model
