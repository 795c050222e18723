"""Random weights of a real Gemma 4 geometry, built straight on the GPU (no checkpoint, no disk round trip).

Parameters are created empty (meta) and materialised one module at a time on the device: linears that QLoRA
quantizes become NF4 as soon as their random 16-bit weight exists, and 26B-A4B's MoE expert tensors are drawn one
expert matrix at a time straight into NF4 (experts_nf4), so the peak while building is the final footprint plus
one linear (or one expert matrix). The per-layer-embedding table is filled on the GPU in slices and copied into pinned
host memory (it never lives on the GPU). Buffers (RoPE frequencies, scales) are real: only parameters are empty.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.adapt.experts_nf4 import NF4Experts, is_plain_experts
from slimtune.adapt.quantize import make_nf4_linear, nf4_module_names
from slimtune.memory.host_embedding import HostOffloadedEmbedding
from slimtune.models.geometry import build_config
from slimtune.models.loader import attention_plan
from slimtune.models.registry import family_of


def _fill_random(out: torch.Tensor, device, gen, rows_per_slice: int = 16384) -> torch.Tensor:
    """Fill `out` (on `device`, or in host memory) with 0.02-scaled normal values drawn on `device` in float32, a
    slice of rows at a time: a 262K-row vocabulary table drawn whole would need a float32 temporary twice its own
    size (5.25 GiB for 31B), more than a 24 GB card has left."""
    for start in range(0, out.shape[0], rows_per_slice):
        stop = min(out.shape[0], start + rows_per_slice)
        out[start:stop] = torch.randn((stop - start, *out.shape[1:]), dtype=torch.float32, device=device,
                                      generator=gen) * 0.02
    return out


def _random(shape, dtype, device, gen) -> torch.Tensor:
    if len(shape) == 1:  # norm weights / scales: ones keep activations in a realistic range
        return torch.ones(shape, dtype=dtype, device=device)
    return _fill_random(torch.empty(shape, dtype=dtype, device=device), device, gen)


def _host_table(shape, dtype, device, gen) -> torch.Tensor:
    """A table in pinned host memory (offloaded embeddings), drawn on `device` like every other weight."""
    return _fill_random(torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available()), device, gen)


def build_random_model(variant: str, *, mode: str = "qlora", multimodal: bool = False,
                       device="cuda", dtype: torch.dtype = torch.bfloat16, offload_ple: bool = True,
                       seed: int = 0, tiny: bool = False, quantize_experts: bool = True) -> nn.Module:
    """A Gemma 4 model of the real geometry with random frozen weights on `device`.

    Args:
        variant: e2b | e4b | 26b-a4b | 31b. mode: "qlora" (NF4 linears and MoE experts) or "lora16" (16-bit).
        multimodal: include the vision/audio towers (Gemma4ForConditionalGeneration).
        offload_ple: keep the per-layer-embedding table in pinned host memory.
        tiny: the variant's tiny look-alike instead (CPU tests of this builder).
        quantize_experts: qlora mode: MoE experts in NF4 (slimtune's own layout); False keeps them 16-bit, as
            transformers' bitsandbytes loading does (pre-quantized checkpoints other libraries can read).
    """
    import transformers  # noqa: PLC0415
    from accelerate import init_empty_weights  # noqa: PLC0415

    from slimtune.models import gemma4  # noqa: F401,PLC0415 - registers the family

    device = torch.device(device)
    config = build_config(variant, tiny=tiny, text_only=not multimodal)
    cls = transformers.Gemma4ForConditionalGeneration if multimodal else transformers.Gemma4ForCausalLM
    with init_empty_weights(include_buffers=False):
        # attention_plan: 5.24 declares the audio tower eager-only and refuses a blanket "sdpa"
        model = cls._from_config(config, attn_implementation=attention_plan(cls), dtype=dtype)
    family = family_of(model)
    if mode not in ("qlora", "lora16"):
        raise ValueError(f"mode must be 'qlora' or 'lora16', got {mode!r}")
    quantize = set(nf4_module_names(model, family)) if mode == "qlora" else set()
    gen = torch.Generator(device).manual_seed(seed)
    text = model.get_decoder()
    ple = getattr(text, "embed_tokens_per_layer", None)
    tied = getattr(config.get_text_config(), "tie_word_embeddings", True)
    lm_head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if tied and module is lm_head:  # becomes the input embedding below: drawing it too costs a whole table
            continue
        if module is ple and offload_ple:
            weight = _host_table(tuple(ple.weight.shape), dtype, device, gen)
            text.embed_tokens_per_layer = HostOffloadedEmbedding(weight, scale=float(ple.embed_scale),
                                                                 padding_idx=ple.padding_idx, pin=False)
            continue
        if name in quantize and is_plain_experts(module) and quantize_experts:
            nf4 = NF4Experts.empty_like(module, dtype, device)
            for stack in (nf4.gate_up_proj, nf4.down_proj):
                for e in range(stack.num_experts):
                    stack.quantize_expert(e, _random((stack.out_features, stack.in_features), dtype, device, gen))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, nf4)
            continue
        if name in quantize and isinstance(module, nn.Linear):
            lin = nn.Linear(module.in_features, module.out_features, bias=False, device=device, dtype=dtype)
            lin.weight.data = _random(lin.weight.shape, dtype, device, gen)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, make_nf4_linear(lin, dtype, device))
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                module._parameters[pname] = nn.Parameter(_random(tuple(p.shape), dtype, device, gen),
                                                         requires_grad=False)
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.device != device:
                module._buffers[bname] = b.to(device)
    if tied:
        lm_head.weight = model.get_input_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(False)
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    assert not leftovers, f"unmaterialised parameters: {leftovers[:5]}"
    model.slimtune_source = f"random:{variant}"
    return model
