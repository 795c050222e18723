"""slimtune's Triton attention kernels on CUDA against an fp64 reference on fresh random inputs (``-m gpu``; skipped
without CUDA and Triton): head_dim 512 and 256, GQA, windows, packed documents incl. 1-token ones, padding with fully
masked rows, bf16 and fp16, the default launch configurations and the sweep's variants; and a tiny Gemma 4 on CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from slimtune.kernels.attention_reference import attention_reference

sys.path.insert(0, str(Path(__file__).parent))
from _attention_checks import rel_error as _rel  # noqa: E402

_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _gpu_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _doc_ids(t: int, lengths: list[int]) -> list[int]:
    ids, n = [], 0
    for i, length in enumerate(lengths):
        ids += [i] * length
        n += length
    return (ids + [len(lengths)] * (t - n))[:t]


GPU_CASES = [
    # (batch, q_heads, kv_heads, seq, head_dim, window, docs, padding, dtype)
    (1, 8, 1, 1, 512, None, None, None, torch.bfloat16),
    (1, 8, 1, 17, 512, None, None, None, torch.float16),
    (2, 8, 2, 1000, 512, None, "docs", None, torch.bfloat16),
    (1, 8, 1, 4097, 512, None, None, None, torch.bfloat16),
    (1, 16, 2, 2048, 512, None, "docs1", None, torch.float16),
    (2, 8, 1, 577, 512, None, None, "pad", torch.float16),
    (1, 8, 2, 1500, 512, 1024, "docs", None, torch.bfloat16),
    (1, 4, 4, 1000, 256, 512, None, None, torch.bfloat16),
    (1, 8, 1, 4097, 256, 1024, "docs1", None, torch.float16),
    (2, 8, 2, 1000, 256, 512, "docs", "pad", torch.bfloat16),
    (1, 8, 1, 3000, 256, 512, None, None, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["default", "fused_delta_split_dkdv", "stored"])
@pytest.mark.parametrize("b,hq,hk,t,d,window,docs,pad,dtype", GPU_CASES)
def test_triton_attention_matches_fp64_reference(b, hq, hk, t, d, window, docs, pad, dtype, variant, monkeypatch):
    from slimtune.kernels import flash_attention_stored_bwd as stored
    from slimtune.kernels.flash_attention import KernelConfig, flash_attention

    C = KernelConfig
    cfgs = None
    if variant == 1:  # the non-default backward structures the sweep times (bench_flash_attention.SWEEP)
        cfgs = {512: {"dq": C(64, 32, 8, 1, False, 2, 3), "dkdv": C(64, 64, 8, 1, True, 2, 1)},
                256: {"dq": C(128, 32, 8, 2, False, 0, 1), "dkdv": C(64, 64, 8, 2, True, 2, 1, 1)}}[d]
    calls = []
    if variant == 2:  # the stored backward (full layers; windowed ones keep the fused kernels), NaN-poisoned buffers
        cfgs = {512: {"dq": C(64, 32, 8, 1, False, 2, 5)}, 256: {"dq": C(128, 32, 8, 2, False, 0, 5)}}[d]
        monkeypatch.setattr(stored, "POISON_BUFFERS", True)
        run = stored.backward_stored
        monkeypatch.setattr(stored, "backward_stored", lambda *a, **kw: calls.append(1) or run(*a, **kw))

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(hash((b, hq, hk, t, d, window, docs, pad)) % 2**31)
    q = torch.randn(b, t, hq, d, device=dev, dtype=dtype, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(b, hk, t, d, device=dev, dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(b, hk, t, d, device=dev, dtype=dtype, generator=gen).requires_grad_()
    doc_ids = None
    if docs == "docs":
        doc_ids = torch.tensor([_doc_ids(t, [t // 3, 1, t // 4]), _doc_ids(t, [7, t // 2])][:b], device=dev)
    elif docs == "docs1":  # many 1-token documents plus long ones
        doc_ids = torch.tensor([_doc_ids(t, [1, 1, 1, t // 2, 1, 1, 300])] * b, device=dev)
    kpm = None
    if pad:
        kpm = torch.ones(b, t, dtype=torch.bool, device=dev)
        kpm[0, :37] = False  # left padding: the first 37 rows of batch 0 see no key at all
        if b > 1:
            kpm[1, t - 100:] = False
    out = flash_attention(q, k, v, scale=1.0, window=window, doc_ids=doc_ids, key_padding_mask=kpm, _configs=cfgs)
    do = torch.randn(out.shape, device=dev, dtype=dtype, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(*ref_in, scale=1.0, window=window, doc_ids=doc_ids, key_padding_mask=kpm)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    tol = _TOL[dtype]
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        err = _rel(got, want)
        assert err <= tol, f"{name}: rel error {err:.2e} > {tol:.0e}"
    if pad:
        assert out[0, :, :37].abs().max() == 0 and grads[0][0, :, :37].abs().max() == 0
    if variant == 2:
        assert len(calls) == (window is None), "the stored backward runs exactly for the layers without a window"


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("variant", ["plain", "scratch", "keys_as_rows", "split_dkdv_32x64", "split_dkdv_32x64_2stages",
                                     "split_dkdv_64x32", "const_strides_dkdv"])
def test_triton_attention_other_configs(variant):
    """Non-default launch variants stay correct: no chain cut, global-scratch cut, keys-as-rows dK/dV, the other
    split dV/dK block shapes of the sweep."""
    from slimtune.kernels.flash_attention import KernelConfig, flash_attention

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(11)
    t = 777
    q = torch.randn(1, 8, t, 512, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
    k, v = (torch.randn(1, 1, t, 512, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(2))
    docs = torch.tensor([_doc_ids(t, [300, 1, 200])], device=dev)
    mode = 1 if variant == "scratch" else 0
    cfgs = {"fwd": KernelConfig(64, 32, 8, 2, False, mode), "dq": KernelConfig(64, 32, 8, 1, False, mode),
            "dkdv": KernelConfig(64, 32, 8, 1, True, mode)}
    if variant == "keys_as_rows":
        cfgs = {"dkdv": KernelConfig(32, 32, 8, 2, False, 0)}
    elif variant == "const_strides_dkdv":
        cfgs = {"dkdv": KernelConfig(64, 32, 8, 1, True, 2, 2)}
    elif variant.startswith("split_dkdv"):
        bm, bn, st = {"split_dkdv_32x64": (32, 64, 1), "split_dkdv_32x64_2stages": (32, 64, 2),
                      "split_dkdv_64x32": (64, 32, 1)}[variant]
        cfgs = {"dq": KernelConfig(64, 64, 8, 1, False, 2, 3), "dkdv": KernelConfig(bm, bn, 8, st, True, 2, 1)}
    out = flash_attention(q, k, v, scale=1.0, window=300, doc_ids=docs, _configs=cfgs)
    do = torch.randn(out.shape, device=dev, dtype=out.dtype, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(*ref_in, scale=1.0, window=300, doc_ids=docs)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(got).all() and _rel(got, want) <= 2e-2, name


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs CUDA and Triton")
def test_tiny_gemma4_cuda_bf16_close_to_eager():
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from slimtune.adapt.attention import enable_slimtune_attention

    cfg = Gemma4TextConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, global_head_dim=512, num_global_key_value_heads=1, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    ids = torch.randint(1, 256, (1, 300), device="cuda")
    position_ids = torch.cat([torch.arange(200), torch.arange(100)])[None].cuda()
    eager = Gemma4ForCausalLM(cfg).cuda().to(torch.bfloat16)
    ours = Gemma4ForCausalLM(cfg).cuda().to(torch.bfloat16)
    ours.load_state_dict(eager.state_dict())
    enable_slimtune_attention(ours)
    ref = eager(input_ids=ids, position_ids=position_ids).logits.float()
    out = ours(input_ids=ids, position_ids=position_ids).logits.float()
    assert torch.isfinite(out).all() and _rel(out, ref) < 2e-2
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
