"""`add_lora`: choose target linears from the family's module names and swap each for a `LoraLinear`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from slimtune.adapt.experts import EXPERT_PARAMS, experts_modules, expert_targets, inject_expert_lora
from slimtune.adapt.lora import LoraLinear, lora_modules
from slimtune.adapt.quantize import is_nf4_linear, keep_standard_nf4_layout
from slimtune.errors import ConfigError
from slimtune.models.registry import ModelFamily, family_of


@dataclass
class LoraSettings:
    """What was injected; saved into adapter_config.json and used to rebuild the adapter."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    targets: list[str] = field(default_factory=list)
    expert_targets: list[str] = field(default_factory=list)  # fused expert blocks (gate_up_proj + down_proj)

    def to_dict(self) -> dict:
        return asdict(self)


def is_base_linear(module: nn.Module) -> bool:
    """A frozen linear LoRA can wrap: a plain nn.Linear or an NF4 Linear4bit (which subclasses nn.Linear)."""
    return isinstance(module, nn.Linear) or is_nf4_linear(module)


def _leaf_name(name: str, model: nn.Module, family: ModelFamily) -> str:
    """The meaningful name of a linear: for a wrapper's inner `.linear`, the wrapper's own name (q_proj, …)."""
    parts = name.split(".")
    if parts[-1] == "linear" and len(parts) > 1:
        parent = model.get_submodule(".".join(parts[:-1]))
        if type(parent).__name__ in family.wrapper_classes:
            return parts[-2]
    return parts[-1]


def _component(name: str, family: ModelFamily) -> tuple[str, int | None]:
    """("language", layer index) | ("vision"|"audio"|"embedders", None) | ("other", None)."""
    if name.startswith(family.embedder_prefixes):
        return "embedders", None
    for prefix in family.language_prefixes:
        if name.startswith(prefix):
            return "language", int(name[len(prefix):].split(".")[0])
    for comp, prefix in family.tower_prefixes.items():
        if name.startswith(prefix):
            return comp, None
    return "other", None


def select_lora_targets(model: nn.Module, *, target_modules="all-linear", finetune_language_layers=True,
                        finetune_vision_layers=False, finetune_audio_layers=False, finetune_attention_modules=True,
                        finetune_mlp_modules=True, layers_to_transform=None,
                        finetune_multimodal_embedders=False) -> list[str]:
    """Names of the base linears that get LoRA, in module order.

    "all-linear" means the attention and MLP linears of the selected components (decoder layers and/or towers),
    filtered by the attention/MLP flags. A list of names (e.g. ["q_proj", "v_proj"]) picks those linears in the
    selected components. ``finetune_multimodal_embedders`` adds every linear of the multimodal embedders (Gemma 4:
    ``embed_vision`` / ``embed_audio`` ``.embedding_projection``) whatever target_modules says. Embeddings,
    lm_head and routers are never targeted.

    Raises:
        ConfigError: a flag asks for a component the model does not have, or nothing matches.
    """
    family = family_of(model)
    components = {"language": finetune_language_layers, "vision": finetune_vision_layers,
                  "audio": finetune_audio_layers, "embedders": finetune_multimodal_embedders}
    if not any(components.values()):
        raise ConfigError("all of finetune_language_layers / finetune_vision_layers / finetune_audio_layers / "
                          "finetune_multimodal_embedders are False: nothing would be trained. Enable at least one.")
    if finetune_multimodal_embedders and not any(
            n.startswith(family.embedder_prefixes) for n, _ in model.named_modules()):
        raise ConfigError("finetune_multimodal_embedders=True but this model has no multimodal embedders "
                          "(text-only checkpoint or text_only load). Set it to False.")
    present = {comp for comp, prefix in family.tower_prefixes.items()
               if any(n.startswith(prefix) for n, _ in model.named_modules())}
    for comp in ("vision", "audio"):
        if components[comp] and comp not in present:
            raise ConfigError(f"finetune_{comp}_layers=True but this model has no {comp} tower "
                              "(text-only checkpoint or text_only load). Set it to False.")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    if target_modules == "all-linear":
        wanted = set()
        if finetune_attention_modules:
            wanted |= set(family.attention_modules)
        if finetune_mlp_modules:
            wanted |= set(family.mlp_modules)
        if not wanted:
            raise ConfigError("finetune_attention_modules and finetune_mlp_modules are both False: "
                              "no linear would get LoRA. Enable one, or pass target_modules explicitly.")
    else:
        wanted = set(target_modules)
    layers = _layer_set(layers_to_transform)
    targets, seen_leaves = [], set()
    for name, module in model.named_modules():
        if not is_base_linear(module) or name.endswith((".lora_A", ".lora_B")):
            continue
        comp, layer = _component(name, family)
        if comp == "other" or not components[comp]:
            continue
        if comp == "embedders":  # its own switch: not filtered by target_modules or the attention/MLP flags
            targets.append(name)
            continue
        leaf = _leaf_name(name, model, family)
        seen_leaves.add(leaf)
        if leaf not in wanted:
            continue
        if comp == "language" and layers is not None and layer not in layers:
            continue
        targets.append(name)
    if not targets:
        raise ConfigError(f"target_modules={target_modules!r} (layers_to_transform={layers_to_transform}) matched no "
                          f"linear layer. Linear names available: {sorted(seen_leaves)}.")
    return targets


def inject_lora(model: nn.Module, targets: list[str], *, r: int, alpha: float, dropout: float, use_rslora: bool,
                seed: int | None = 0, ranks: dict[str, int] | None = None,
                alphas: dict[str, float] | None = None) -> LoraSettings:
    """Swap each named base linear for a LoraLinear (per-module rank/alpha overrides allowed)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for p in model.parameters():  # only the adapters train, whoever built the model
        p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = LoraLinear(base, r=(ranks or {}).get(name, r), alpha=(alphas or {}).get(name, alpha),
                           dropout=dropout, use_rslora=use_rslora, generator=generator)
        setattr(parent, child, layer)
    settings = LoraSettings(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, targets=list(targets))
    model.slimtune_lora = settings
    return settings


def add_lora(model: nn.Module, *, r: int = 16, alpha: float = 16, dropout: float = 0.0, target_modules="all-linear",
             finetune_language_layers: bool = True, finetune_vision_layers: bool = False,
             finetune_audio_layers: bool = False, finetune_attention_modules: bool = True,
             finetune_mlp_modules: bool = True, use_rslora: bool = False, layers_to_transform=None,
             seed: int = 0, finetune_multimodal_embedders: bool = False,
             finetune_experts: bool = False) -> nn.Module:
    """Add trainable LoRA adapters to a model loaded by `load_model` (in place; returns the same model).

    Args:
        r: adapter rank (> 0). alpha: scaling numerator (update scaled by alpha/r, or alpha/√r with rsLoRA).
        dropout: dropout on the adapter input, in [0, 1).
        target_modules: "all-linear" or a list of linear names such as ["q_proj", "v_proj"].
        finetune_*_layers: which components get adapters (text decoder, vision tower, audio tower).
        finetune_multimodal_embedders: also adapt the projections from the towers into the text model
            (embed_vision / embed_audio); default off.
        finetune_attention_modules / finetune_mlp_modules: with "all-linear", which blocks get adapters.
        layers_to_transform: decoder layer indices to adapt (None = all).
        finetune_experts: also adapt the MoE experts' fused gate_up_proj / down_proj tensors (26B-A4B), in PEFT's
            ``target_parameters`` layout; default off: at r=16 it adds ~0.5 B fp32 trainable values on 26B-A4B
            (about 8 GB with AdamW states) and the per-expert loop is slower than transformers' grouped_mm.
            Needs dropout=0 (PEFT's expert LoRA has no dropout and would refuse to load the adapter).
        seed: seeds the adapters' initialisation.

    Example:
        >>> model, tok = slimtune.load_model("path/to/gemma-4-E2B-it", load_in_4bit=True)
        >>> model = slimtune.add_lora(model, r=16, alpha=16)

    Raises:
        ConfigError: invalid values, or the model already has adapters.
    """
    problems = []
    if not isinstance(r, int) or r <= 0:
        problems.append(f"r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        problems.append(f"alpha must be > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"dropout must be in [0, 1), got {dropout!r}")
    if finetune_experts and dropout:
        problems.append(f"finetune_experts=True needs dropout=0 (got {dropout!r}): PEFT's LoRA on expert tensors "
                        "has no dropout and refuses such adapters")
    if problems:
        raise ConfigError("invalid LoRA settings: " + "; ".join(problems) + ".")
    if lora_modules(model) or experts_modules(model):
        raise ConfigError("this model already has LoRA adapters; load a fresh model to add new ones.")
    experts = []
    if finetune_experts:
        family = family_of(model)
        experts = expert_targets(model, _layer_set(layers_to_transform), family.language_prefixes)
        if not experts:
            raise ConfigError("finetune_experts=True but this model has no MoE expert blocks in the selected layers "
                              "(only Gemma 4 26B-A4B has them). Set finetune_experts=False.")
    targets = select_lora_targets(
        model, target_modules=target_modules, finetune_language_layers=finetune_language_layers,
        finetune_vision_layers=finetune_vision_layers, finetune_audio_layers=finetune_audio_layers,
        finetune_attention_modules=finetune_attention_modules, finetune_mlp_modules=finetune_mlp_modules,
        layers_to_transform=layers_to_transform, finetune_multimodal_embedders=finetune_multimodal_embedders)
    keep_standard_nf4_layout(model)  # a model that ran inference on CPU must still backpropagate through NF4
    settings = inject_lora(model, targets, r=r, alpha=float(alpha), dropout=float(dropout), use_rslora=use_rslora,
                           seed=seed)
    if experts:
        # its own generator seed: adding experts must not change the linears' initialisation
        inject_expert_lora(model, dict.fromkeys(experts, list(EXPERT_PARAMS)), r=r, alpha=float(alpha),
                           use_rslora=use_rslora, seed=None if seed is None else seed + 1)
        settings.expert_targets = experts
    return model


def _layer_set(layers_to_transform) -> set[int] | None:
    if layers_to_transform is None:
        return None
    return {int(i) for i in ([layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (LoRA A and B, linear and expert)."""
    return [p for p in model.parameters() if p.requires_grad]
