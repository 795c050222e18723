"""The tensor sizes the memory estimate needs, read from a Gemma 4 config by building the model on the meta device.

Everything here is counted, not assumed: parameters by role (what 4-bit loading stores in NF4: linears and MoE
expert tensors; the PLE table; other frozen weights), and per decoder layer the widths that set its activation
sizes: q/k/v projection widths (head_dim 256 on sliding layers, 512 on full layers; no k/v on KV-sharing consumer
layers), the MLP width (doubled on E2B's shared layers), the sliding window, the PLE width and, on MoE layers, the
expert width × top-k.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer (elements per token)."""

    q_dim: int  # heads × head_dim
    kv_dim: int  # k (and v) width; 0 on KV-sharing consumer layers (they read the producer's k/v)
    heads: int
    window: int | None  # sliding window, None on full-attention layers
    inter: int  # dense MLP width
    ple_dim: int  # per-layer-input width (0 without PLE)
    moe_inter: int  # top_k × expert width (0 without MoE)
    moe_stack: int = 0  # elements of the larger fused expert tensor, gate_up (E, 2I, H) (0 without MoE)


@dataclass(frozen=True)
class ModelShape:
    """Counted sizes of a model (parameters by role, widths) for the memory estimate."""

    quantizable: int  # parameters 4-bit loading stores in NF4: the family's linears and the MoE expert tensors
    ple: int  # per-layer-embedding table parameters (host-offloadable)
    other: int  # every other frozen parameter (embeddings, norms, towers, PLE projections, routers)
    lora_in_out: tuple[tuple[int, int], ...]  # (in, out) of every LoRA target (language layers, all-linear)
    hidden: int
    vocab: int
    layers: tuple[LayerShape, ...]
    max_position: int
    multimodal: bool


def read_model_shape(model: str, multimodal: bool = False, text_only: bool = False,
                     finetune_experts: bool = False) -> ModelShape:
    """Counted sizes of a geometry name (e2b, e4b, 26b-a4b, 31b) or a local model folder with a config.json.

    A folder's own config says whether it has towers; `text_only` counts only its language model (what
    ``load_model(..., text_only=True)`` loads). `finetune_experts` adds the expert LoRA factors to lora_in_out.

    Raises:
        ValueError: the model is neither (hub ids must be downloaded first).
    """
    return _read(str(model), bool(multimodal), bool(text_only), bool(finetune_experts))


@functools.lru_cache(maxsize=16)
def _read(model: str, multimodal: bool, text_only: bool = False, finetune_experts: bool = False) -> ModelShape:
    from slimtune.adapt.inject import select_lora_targets  # noqa: PLC0415
    from slimtune.adapt.quantize import nf4_module_names  # noqa: PLC0415
    from slimtune.models.registry import family_of  # noqa: PLC0415

    m, config, multimodal = build_meta_model(model, multimodal, text_only)
    quant = set(nf4_module_names(m, family_of(m)))  # owners: linears and expert blocks (experts.gate_up_proj)
    counts = {"quantizable": 0, "ple": 0, "other": 0}
    seen = set()
    for name, p in m.named_parameters():
        if id(p) in seen:  # tied lm_head
            continue
        seen.add(id(p))
        owner = name.rsplit(".", 1)[0]
        key = "ple" if "embed_tokens_per_layer" in name else ("quantizable" if owner in quant else "other")
        counts[key] += p.numel()
    lora = tuple((m.get_submodule(n).in_features, m.get_submodule(n).out_features) for n in select_lora_targets(m))
    if finetune_experts:  # a 3-D (E, out, in) tensor's factors are r·E·(in + out) values: one (E·in, E·out) entry
        lora += tuple((w.shape[0] * w.shape[2], w.shape[0] * w.shape[1]) for name, w in m.named_parameters()
                      if name.endswith(("experts.gate_up_proj", "experts.down_proj")))
    text = config.get_text_config()
    decoder = m.get_decoder() if hasattr(m, "get_decoder") else m.model
    decoder = getattr(decoder, "language_model", decoder)
    return ModelShape(**counts, lora_in_out=lora, hidden=text.hidden_size, vocab=text.vocab_size,
                      layers=tuple(_layer_shape(layer, text) for layer in decoder.layers),
                      max_position=int(getattr(text, "max_position_embeddings", 0) or 0), multimodal=multimodal)


def build_meta_model(model: str, multimodal: bool = False, text_only: bool = False):
    """(the model built on the meta device, its config, whether it is multimodal) for a geometry name or a local
    folder; shared by the estimate's counts and the distributed planner's per-tensor inventory.

    Raises:
        ValueError: the model is neither a geometry name nor a local folder with a config.json.
    """
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from slimtune.models import gemma4  # noqa: F401,PLC0415 - registers the family
    from slimtune.models.geometry import VARIANTS, build_config  # noqa: PLC0415

    if model in VARIANTS:
        config = build_config(model, tiny=False, text_only=not multimodal)
    else:
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(f"cannot estimate memory for {model!r}: not a local model folder (with config.json) "
                             f"or one of {', '.join(VARIANTS)}")
        config = transformers.AutoConfig.from_pretrained(str(folder))
    multimodal = getattr(config, "model_type", "") == "gemma4"
    if multimodal and text_only:
        config, multimodal = config.get_text_config(), False
    cls = transformers.Gemma4ForConditionalGeneration if multimodal else transformers.Gemma4ForCausalLM
    with torch.device("meta"):
        return cls(config), config, multimodal


def _layer_shape(layer, text) -> LayerShape:
    attn = layer.self_attn
    k_proj = getattr(attn, "k_proj", None)
    moe = stack = 0
    if getattr(layer, "enable_moe_block", False):
        moe = int(getattr(text, "top_k_experts", 0) or 0) * int(getattr(text, "moe_intermediate_size", 0) or 0)
        stack = int(getattr(text, "num_experts", 0) or 0) * 2 * int(text.moe_intermediate_size) * text.hidden_size
    return LayerShape(q_dim=attn.q_proj.out_features, kv_dim=k_proj.out_features if k_proj is not None else 0,
                      heads=attn.q_proj.out_features // attn.head_dim,
                      window=attn.sliding_window if getattr(attn, "is_sliding", False) else None,
                      inter=layer.mlp.intermediate_size,
                      ple_dim=int(getattr(layer, "hidden_size_per_layer_input", 0) or 0), moe_inter=moe,
                      moe_stack=stack)
