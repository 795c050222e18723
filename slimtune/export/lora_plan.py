"""Read a PEFT LoRA adapter and work out, per base-checkpoint tensor, what to add to it.

PEFT saves ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight`` ``(out, r)`` for a
Linear, and ``...lora_embedding_A`` ``(r, num_embeddings)`` / ``...lora_embedding_B`` ``(dim, r)`` for an
Embedding. The merged weight is::

    W' = W + s · B @ A            (Linear; transposed when fan_in_fan_out)
    E' = E + s · (B @ A)ᵀ         (Embedding)
    s  = alpha / r   or   alpha / √r with use_rslora

where ``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module name
(PEFT's own matching function is used, so slimtune resolves patterns exactly as PEFT did at training time).
``modules_to_save`` entries are whole replacement tensors. For Gemma4ClippableLinear the LoRA sits on the inner
``.linear``, whose weight key (``...q_proj.linear.weight``) is also the checkpoint key, so no special case is needed.

LoRA on fused MoE expert tensors (``target_parameters``, PEFT's ParamWrapper; see slimtune.adapt.experts) is
saved as ``<experts>[.base_layer…].lora_A.weight`` ``(r·E, in)`` / ``lora_B.weight`` ``(out, r·E)``; PEFT nests one
wrapper per adapted tensor in the block's parameter order, so the number of ``.base_layer`` hops names the tensor.
The merged expert ``e`` is ``W[e] + s · B.view(out, r, E)[:, :, e] @ A.view(E, r, in)[e]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from slimtune.adapt.experts import EXPERT_PARAMS
from slimtune.errors import ExportError

__all__ = ["AdapterPlan", "LoraDelta", "load_adapter_plan", "match_base_keys"]

_PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
# Adapter features whose merge is not plain W + sBA. Refusing them beats writing a subtly wrong model.
_UNSUPPORTED_MARKERS = {
    "lora_magnitude_vector": "DoRA (use_dora=True)",
    "trainable_tokens_delta": "trainable token indices",
    "lora_B.bias": "LoRA bias (lora_bias=True)",
}


@dataclass
class LoraDelta:
    """One LoRA pair and its scale.

    Attributes:
        module: module path inside the model, e.g. ``model.language_model.layers.0.self_attn.q_proj``; for
            "experts" the adapted parameter's full name (``...layers.0.experts.gate_up_proj``).
        kind: "linear", "embedding" or "experts" (a 3-D (E, out, in) parameter; A is (r·E, in), B (out, r·E)).
        A: ``(r, in)`` for a Linear, ``(r, num_embeddings)`` for an Embedding.
        B: ``(out, r)`` for a Linear, ``(dim, r)`` for an Embedding.
        scale: alpha / r (or alpha / sqrt(r) with rsLoRA).
        fan_in_fan_out: the base layer stores its weight as ``(in, out)``.
    """

    module: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False
    num_experts: int = 1

    @property
    def weight_key(self) -> str:
        """The checkpoint tensor it updates: expert parameters are stored without a ``.weight`` suffix."""
        return self.module if self.kind == "experts" else self.module + ".weight"

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The update to add to the base weight, shaped like that weight, computed in `dtype` (fp32 or fp64)."""
        if self.kind == "experts":
            rank = self.B.shape[1] // self.num_experts
            a = self.A.to(dtype).view(self.num_experts, rank, self.A.shape[1])
            b = self.B.to(dtype).view(self.B.shape[0], rank, self.num_experts).permute(2, 0, 1)
            return torch.bmm(b, a) * self.scale
        product = self.B.to(dtype) @ self.A.to(dtype)
        if self.kind == "embedding" or self.fan_in_fan_out:
            product = product.T
        return product * self.scale


@dataclass
class AdapterPlan:
    """Everything an adapter changes, keyed by module path (not yet matched to checkpoint keys).

    Attributes:
        config: the adapter_config.json contents.
        deltas: LoRA pairs, one per adapted module.
        replacements: ``modules_to_save`` tensors, keyed by tensor name inside the model.
    """

    config: dict[str, Any]
    deltas: list[LoraDelta]
    replacements: dict[str, torch.Tensor]


def _scale_for(module: str, rank: int, config: dict[str, Any]) -> float:
    from peft.utils.other import (
        get_pattern_key,  # PEFT's matcher: patterns resolve exactly as in training
    )

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", rank))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", r))
    if int(r) != rank:
        raise ExportError(
            f"adapter_config.json gives rank {r} for {module!r} but its saved LoRA weights have rank {rank}; "
            "the config and the weights come from different runs"
        )
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def load_adapter_plan(adapter_dir: Path, config: dict[str, Any]) -> AdapterPlan:
    """Load adapter_model.safetensors and pair up the LoRA tensors.

    Args:
        adapter_dir: folder with adapter_model.safetensors.
        config: its parsed adapter_config.json.

    Returns:
        The adapter's deltas and replacement tensors.

    Raises:
        ExportError: unreadable weights, unsupported adapter features (DoRA, trainable tokens, LoRA bias,
            target_parameters other than fused MoE expert tensors), or a lora_A without its lora_B.
    """
    if config.get("use_dora"):
        raise ExportError("DoRA adapters (use_dora=True) cannot be merged yet; export with format='lora' instead")
    try:
        state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types
        raise ExportError(f"cannot read {str(adapter_dir / 'adapter_model.safetensors')!r}: {exc}") from exc
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for marker, feature in _UNSUPPORTED_MARKERS.items():
            if marker in key:
                raise ExportError(f"the adapter uses {feature} (key {key!r}), which merge does not support yet")
        name = key.removeprefix(_PREFIX)
        for suffix, (kind, part) in _SUFFIXES.items():
            if name.endswith(suffix):
                pairs.setdefault((name[: -len(suffix)], kind), {})[part] = tensor
                break
        else:
            if "lora_" in name:
                raise ExportError(f"unrecognised LoRA tensor {key!r} in the adapter; it cannot be merged")
            # Full tensors: modules_to_save copies, and the embedding weights PEFT stores as `*.base_layer.weight`
            # when an embedding is adapted (save_embedding_layers). Both replace the base tensor of that name.
            replacements[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = tensor
    deltas: list[LoraDelta] = _expert_deltas(pairs, config)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for (module, kind), parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise ExportError(f"adapter tensor pair for {module!r} is incomplete (found only {sorted(parts)})")
        rank = parts["A"].shape[0]
        deltas.append(
            LoraDelta(
                module=module,
                kind=kind,
                A=parts["A"],
                B=parts["B"],
                scale=_scale_for(module, rank, config),
                fan_in_fan_out=fan_in_fan_out and kind == "linear",
            )
        )
    if not deltas and not replacements:
        raise ExportError(f"the adapter in {str(adapter_dir)!r} holds no LoRA weights")
    return AdapterPlan(config=config, deltas=deltas, replacements=replacements)


def _expert_deltas(pairs: dict, config: dict[str, Any]) -> list[LoraDelta]:
    """Take the ``target_parameters`` pairs out of `pairs` (in place) and return them as "experts" deltas.

    Raises:
        ExportError: target_parameters that are not fused expert tensors, or pairs that do not fit the config.
    """
    targets = config.get("target_parameters") or []
    if not targets:
        return []
    groups: dict[str, dict[int, tuple]] = {}  # unwrapped module -> {base_layer hops: pair key}
    for key in [k for k in pairs if k[1] == "linear" and (".base_layer" in k[0] or any(
            _matches(f"{k[0]}.{p}", targets) for p in EXPERT_PARAMS))]:
        depth = key[0].count(".base_layer")
        groups.setdefault(key[0].replace(".base_layer", ""), {})[depth] = key
    if not groups:
        raise ExportError(f"adapter_config.json lists target_parameters={targets} but the adapter has no such tensors")
    out = []
    for module, by_depth in sorted(groups.items()):
        params = [p for p in EXPERT_PARAMS if _matches(f"{module}.{p}", targets)]
        if len(params) != len(by_depth) or sorted(by_depth) != list(range(len(params))):
            raise ExportError(
                f"cannot merge the LoRA on raw parameters of {module!r} (target_parameters={targets}): only the fused "
                f"MoE expert tensors {list(EXPERT_PARAMS)} are supported; export with format='lora' instead")
        for index, param in enumerate(params):
            parts = pairs.pop(by_depth[len(params) - 1 - index])  # the last-wrapped tensor is outermost
            if set(parts) != {"A", "B"}:
                raise ExportError(f"adapter tensor pair for {module}.{param} is incomplete (found only {sorted(parts)})")
            name = f"{module}.{param}"
            rank = _config_rank(name, config)
            experts = parts["A"].shape[0] // rank
            if rank * experts != parts["A"].shape[0] or parts["B"].shape[1] != parts["A"].shape[0]:
                raise ExportError(f"LoRA tensors for {name!r} have shapes A {tuple(parts['A'].shape)}, B "
                                  f"{tuple(parts['B'].shape)}, which do not fit rank {rank} of adapter_config.json")
            out.append(LoraDelta(module=name, kind="experts", A=parts["A"], B=parts["B"],
                                 scale=_scale_for(name, rank, config), num_experts=experts))
    return out


def _matches(name: str, targets: list[str]) -> bool:
    # PEFT's target_parameters rule: the full parameter name, or a dotted suffix of it
    return any(name == t or name.endswith("." + t) for t in targets)


def _config_rank(name: str, config: dict[str, Any]) -> int:
    from peft.utils.other import get_pattern_key  # noqa: PLC0415

    pattern = config.get("rank_pattern") or {}
    return int(pattern.get(get_pattern_key(pattern.keys(), name), config.get("r", 8)))


def _aliases(name: str) -> list[str]:
    # A text-only model (Gemma4ForCausalLM) names the decoder `model.*`; the multimodal checkpoint names it
    # `model.language_model.*`. Training may load either class from either checkpoint, so try both spellings.
    out = [name]
    if name.startswith("model.language_model."):
        out.append("model." + name[len("model.language_model."):])
    elif name.startswith("model.") and not name.startswith(
        ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
    ):
        out.append("model.language_model." + name[len("model."):])
    return out


def match_base_keys(
    plan: AdapterPlan, base_keys: set[str], *, base_name: str
) -> tuple[dict[str, list[LoraDelta]], dict[str, torch.Tensor]]:
    """Map every delta and replacement onto a checkpoint tensor name.

    Args:
        plan: the loaded adapter.
        base_keys: tensor names present in the base checkpoint.
        base_name: the base model's name, for the error message.

    Returns:
        ``(deltas by checkpoint key, replacements by checkpoint key)``.

    Raises:
        ExportError: some adapter tensors match no base weight (lists them).
    """
    deltas: dict[str, list[LoraDelta]] = {}
    replacements: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for d in plan.deltas:
        key = next((k for k in _aliases(d.weight_key) if k in base_keys), None)
        if key is None:
            unmatched.append(d.module)
        else:
            deltas.setdefault(key, []).append(d)
    for name, tensor in plan.replacements.items():
        key = next((k for k in _aliases(name) if k in base_keys), None)
        if key is None:
            unmatched.append(name)
        else:
            replacements[key] = tensor
    if unmatched:
        shown = ", ".join(repr(u) for u in unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
        raise ExportError(
            f"{len(unmatched)} adapter module(s) match no weight in the base model {base_name!r}: {shown}. "
            "The adapter was probably trained on a different model; point base_model_name_or_path (or the run's "
            "`model`) at the checkpoint it was trained on"
        )
    return deltas, replacements
