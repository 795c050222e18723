"""Streaming load straight onto CUDA: NF4 quantized on the GPU as each tensor arrives, PLE table in pinned host memory.
The streamed model computes what from_pretrained + quantize computes, and the GPU never holds more than the final
weights plus one checkpoint tensor. Runs on the device; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import transformers

import slimtune
from slimtune.adapt.quantize import dequantize_parts, is_nf4_linear, nf4_parts, quantize_model_nf4
from slimtune.memory.host_embedding import HostOffloadedEmbedding
from slimtune.models.loader import attention_plan, freeze
from slimtune.models.registry import family_of
from slimtune.models.tiny import build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def sharded_e2b(tmp_path_factory, tiny_dir):
    src = tiny_dir("e2b", text_only=True)
    out = tmp_path_factory.mktemp("sharded-gpu") / "model"
    build_tiny_model(variant="e2b", text_only=True).save_pretrained(out, max_shard_size="100KB")
    for f in src.iterdir():
        if not f.name.startswith("model") and not (out / f.name).exists():
            (out / f.name).write_bytes(f.read_bytes())
    return out


def _reference_cuda(path, four_bit):
    model = transformers.Gemma4ForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16, attn_implementation=attention_plan(transformers.Gemma4ForCausalLM))
    freeze(model)
    model.to("cuda")
    if four_bit:
        quantize_model_nf4(model, family_of(model), torch.bfloat16, "cuda")
    return model


@pytest.mark.parametrize("four_bit", [True, False], ids=["nf4", "16bit"])
def test_streamed_cuda_model_equals_reference(sharded_e2b, four_bit):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ours, _ = slimtune.load_model(sharded_e2b, dtype="bfloat16", device="cuda", load_in_4bit=four_bit,
                                  offload_embeddings=True, attention="sdpa")
    final = torch.cuda.memory_allocated() - base
    load_peak = torch.cuda.max_memory_allocated() - base
    ple = ours.model.embed_tokens_per_layer
    assert isinstance(ple, HostOffloadedEmbedding) and ple.host_weight.is_pinned()
    # load peak ≤ final weights + the largest single tensor (as bf16) + allocator slack for one block
    largest = max(p.numel() for p in ours.parameters()) * 2
    assert load_peak <= final + largest + (2 << 20), (load_peak, final, largest)
    ref = _reference_cuda(sharded_e2b, four_bit)
    nf4 = {n: m for n, m in ours.named_modules() if is_nf4_linear(m)}
    assert (len(nf4) > 0) == four_bit
    ref_modules = dict(ref.named_modules())
    for name, module in nf4.items():
        assert module.weight.device.type == "cuda"
        a = dequantize_parts(nf4_parts(module), torch.bfloat16).float()
        b = dequantize_parts(nf4_parts(ref_modules[name]), torch.bfloat16).float()
        assert torch.equal(a, b), name
    ids = torch.randint(20, 250, (2, 33), generator=torch.Generator().manual_seed(1)).cuda()
    ref_ple = ref.model.embed_tokens_per_layer.weight
    with torch.no_grad():
        assert torch.equal(ple.host_weight, ref_ple.cpu())
        got = ours(input_ids=ids).logits.float()
        want = ref(input_ids=ids).logits.float()
    assert torch.allclose(got, want, atol=2e-2, rtol=2e-2), (got - want).abs().max()
