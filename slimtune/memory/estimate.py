"""Analytic training-memory estimate (GPU allocated bytes) for a Gemma 4 config and a LoRA/QLoRA setting.

The model is instantiated on the meta device to count parameters by role, then each term below is added up.
Terms (bytes): NF4 linears 0.516/param (4-bit codes + double-quantized absmax), other frozen weights 2/param
(bf16), LoRA 16/param (fp32 weight, grad, two AdamW moments), checkpointed layer inputs, one layer's recompute
working set, and the loss chunk. Calibrated against H200 measurements (see BENCHMARKS.md); treat it as a guide.
"""

from __future__ import annotations

import functools
from pathlib import Path

GIB = 2**30
_NF4_BYTES = 0.516


@functools.lru_cache(maxsize=16)
def _param_counts(model: str, multimodal: bool) -> dict:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from slimtune.adapt.inject import select_lora_targets  # noqa: PLC0415
    from slimtune.adapt.quantize import quantizable_linear_names  # noqa: PLC0415
    from slimtune.models import gemma4  # noqa: F401,PLC0415
    from slimtune.models.geometry import VARIANTS, build_config  # noqa: PLC0415
    from slimtune.models.registry import family_of  # noqa: PLC0415

    if model in VARIANTS:
        config = build_config(model, tiny=False, text_only=not multimodal)
    else:
        folder = Path(model).expanduser()
        if (folder / "config.json").is_file():
            config = transformers.AutoConfig.from_pretrained(str(folder))
        else:
            raise ValueError(f"cannot estimate memory for {model!r}: not a local model folder or one of {VARIANTS}")
    multimodal = getattr(config, "model_type", "") == "gemma4"
    cls = transformers.Gemma4ForConditionalGeneration if multimodal else transformers.Gemma4ForCausalLM
    with torch.device("meta"):
        m = cls(config)
    fam = family_of(m)
    quant = set(quantizable_linear_names(m, fam))
    text = config.get_text_config()
    counts = {"quantizable": 0, "ple": 0, "other": 0}
    seen = set()
    for name, p in m.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        owner = name.rsplit(".", 1)[0]
        key = "ple" if "embed_tokens_per_layer" in name else ("quantizable" if owner in quant else "other")
        counts[key] += p.numel()
    lora_in_out = [(m.get_submodule(n).in_features, m.get_submodule(n).out_features)
                   for n in select_lora_targets(m)]
    counts.update(
        lora_in_out=lora_in_out, hidden=text.hidden_size, layers=text.num_hidden_layers,
        heads=text.num_attention_heads, vocab=text.vocab_size,
        inter=max(text.intermediate_size * (2 if getattr(text, "use_double_wide_mlp", False) else 1), 1),
        ple_dim=getattr(text, "hidden_size_per_layer_input", 0) or 0,
        # the widest attention head (Gemma 4's full layers: 512); read from the modules, since 5.24 configs
        # refuse global access to per-layer attributes
        global_head_dim=max(getattr(mod, "head_dim", 0) for n, mod in m.named_modules() if n.endswith("self_attn")))
    return counts


def estimate_training_memory(model: str, *, seq_len: int, batch_size: int = 1, load_in_4bit: bool = True,
                             lora_r: int = 16, gradient_checkpointing: bool = True, offload_ple: bool = True,
                             o_t_attention: bool = True, multimodal: bool = False) -> dict:
    """Estimated peak GPU memory of LoRA/QLoRA training.

    Args:
        model: a local model folder, or a geometry name (e2b, e4b, 26b-a4b, 31b).
        seq_len / batch_size: tokens per micro-batch = seq_len × batch_size.
        o_t_attention: an O(T)-memory attention kernel (False: the O(T²) math path for head_dim 512).

    Returns:
        {"total_gib": float, "breakdown": {term: GiB}}.
    """
    c = _param_counts(str(model), multimodal)
    tokens = seq_len * batch_size
    h, layers = c["hidden"], c["layers"]
    weights = c["quantizable"] * (_NF4_BYTES if load_in_4bit else 2) + c["other"] * 2
    ple = 0 if offload_ple else c["ple"] * 2
    lora = sum(lora_r * (i + o) for i, o in c["lora_in_out"]) * 16
    per_layer_in = tokens * (layers * c["ple_dim"]) * 2 * 2  # PLE inputs (+ grad-free copies)
    saved = tokens * h * 2 * (layers if gradient_checkpointing else 12 * layers)
    working = tokens * (6 * h + 4 * c["inter"]) * 2 * 2
    attn = (tokens * c["heads"] * c["global_head_dim"] * 2 * 4 if o_t_attention
            else batch_size * c["heads"] * seq_len * seq_len * 2 * 3)
    chunk = min(tokens, 4096) * c["vocab"] * 4 * 2
    breakdown = {"weights": weights, "ple_table": ple, "lora_and_optimizer": lora, "checkpointed_activations": saved,
                 "layer_working_set": working + attn + per_layer_in, "loss_chunk": chunk}
    gib = {k: round(v / GIB, 3) for k, v in breakdown.items()}
    return {"total_gib": round(sum(breakdown.values()) / GIB, 3), "breakdown": gib}

