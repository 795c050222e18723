"""Tests for slimtune's training attention: reference, CPU fallback, transformers adapter, Triton kernels.

Levels: CPU tests (reference vs a naive fp64 loop; fallback vs reference; the registered attention inside a tiny
Gemma 4 text model vs ``eager``), Triton-interpreter tests of the kernels on tiny fp16 shapes (subprocess with
TRITON_INTERPRET=1; the interpreter's bf16 dot is unreliable), and ``@pytest.mark.gpu`` tests of the kernels against an
fp64 reference on CUDA.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune.kernels.attention_reference import (
    attention_fallback,
    attention_reference,
    document_bounds,
)

REPO = Path(__file__).resolve().parents[2]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; when ref is ~0 (e.g. dq of a 1-token row) the absolute norm."""
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 1e-6 else 1.0)


def _runs(doc_ids: torch.Tensor) -> torch.Tensor:
    change = torch.zeros_like(doc_ids, dtype=torch.long)
    change[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    return change.cumsum(-1)


def _naive(q, k, v, scale, window=None, doc_ids=None, kpm=None):
    """Row-by-row fp64 softmax attention, written independently of the library's mask code."""
    b, hq, t, d = q.shape
    g = hq // k.shape[1]
    runs = _runs(doc_ids) if doc_ids is not None else None
    out = torch.zeros(b, hq, t, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                keys = [j for j in range(i + 1)
                        if (window is None or j > i - window)
                        and (runs is None or runs[bi, j] == runs[bi, i])
                        and (kpm is None or bool(kpm[bi, j]))]
                if not keys:
                    continue
                s = torch.stack([q[bi, h, i].double() @ k[bi, h // g, j].double() * scale for j in keys])
                p = torch.softmax(s, 0)
                out[bi, h, i] = sum(p[n] * v[bi, h // g, j].double() for n, j in enumerate(keys))
    return out


CPU_CASES = [
    {"b": 1, "hq": 2, "hk": 1, "t": 23, "window": None, "docs": None, "pad": None},
    {"b": 2, "hq": 4, "hk": 2, "t": 19, "window": 5, "docs": None, "pad": None},
    {"b": 2, "hq": 4, "hk": 1, "t": 21, "window": None, "docs": [[0] * 7 + [1] + [2] * 13, [5] * 21], "pad": None},
    {"b": 2, "hq": 2, "hk": 2, "t": 20, "window": 4, "docs": [[0] * 9 + [1] * 11, [0] * 3 + [1] * 3 + [2] * 14],
     "pad": [[0] * 4 + [1] * 16, [1] * 15 + [0] * 5]},
]


@pytest.mark.parametrize("case", CPU_CASES)
def test_reference_matches_naive_fp64(case):
    torch.manual_seed(0)
    b, hq, hk, t, d = case["b"], case["hq"], case["hk"], case["t"], 8
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64) for h in (hq, hk, hk))
    docs = torch.tensor(case["docs"]) if case["docs"] else None
    pad = torch.tensor(case["pad"], dtype=torch.bool) if case["pad"] else None
    ref = attention_reference(q, k, v, scale=0.7, window=case["window"], doc_ids=docs, key_padding_mask=pad)
    naive = _naive(q, k, v, 0.7, case["window"], docs, pad)
    assert _rel(ref, naive) < 1e-12


@pytest.mark.parametrize("case", CPU_CASES)
def test_fallback_matches_reference_with_grads(case):
    torch.manual_seed(1)
    b, hq, hk, t, d = case["b"], case["hq"], case["hk"], case["t"], 16
    inputs = [torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True) for h in (hq, hk, hk)]
    docs = torch.tensor(case["docs"]) if case["docs"] else None
    pad = torch.tensor(case["pad"], dtype=torch.bool) if case["pad"] else None
    dstart, _ = document_bounds(docs, None, b, t, torch.device("cpu"))
    out = attention_fallback(*inputs, scale=0.5, window=case["window"], doc_start=dstart, key_padding_mask=pad)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, do)
    ref_in = [x.detach().clone().requires_grad_() for x in inputs]
    ref = attention_reference(*ref_in, scale=0.5, window=case["window"], doc_ids=docs, key_padding_mask=pad)
    ref_grads = torch.autograd.grad(ref, ref_in, do)
    assert _rel(out, ref) < 1e-10
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and _rel(g, r) < 1e-10


def test_fully_masked_rows_give_zero_output_and_grads():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.tensor([[False, False, True, True, True, True]])  # left padding: rows 0, 1 see no key
    dstart, _ = document_bounds(None, None, 1, 6, torch.device("cpu"))
    out = attention_fallback(q, k, v, scale=1.0, doc_start=dstart, key_padding_mask=pad)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and out[:, :, :2].abs().max() == 0
    assert q.grad[:, :, :2].abs().max() == 0 and k.grad[:, :, :2].abs().max() == 0
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_document_bounds_cu_seqlens_equals_doc_ids():
    doc_ids = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 3, 3]])
    cu = torch.tensor([0, 3, 4, 8, 10], dtype=torch.int32)
    a = document_bounds(doc_ids, None, 1, 10, torch.device("cpu"))
    c = document_bounds(None, cu, 1, 10, torch.device("cpu"))
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert a[0].tolist() == [[0, 0, 0, 3, 4, 4, 4, 4, 8, 8]]
    assert a[1].tolist() == [[3, 3, 3, 4, 8, 8, 8, 8, 10, 10]]


def test_flash_attention_cpu_path_matches_reference():
    from slimtune.kernels.flash_attention import flash_attention

    torch.manual_seed(3)
    q = torch.randn(2, 4, 30, 16)
    k, v = torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    docs = torch.tensor([[0] * 10 + [1] * 20, [0] * 30])
    out = flash_attention(q, k, v, scale=1.0, window=8, doc_ids=docs)
    ref = attention_reference(q.double(), k.double(), v.double(), scale=1.0, window=8, doc_ids=docs)
    assert _rel(out, ref) < 1e-5


def test_packed_document_ids_follow_transformers():
    from transformers.masking_utils import find_packed_sequence_indices

    from slimtune.adapt.attention import packed_document_ids

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    ours = packed_document_ids(pos, 2)
    theirs = find_packed_sequence_indices(pos)
    assert torch.equal(ours[0], theirs[0]) and ours[1].max() == 0


# ----------------------------------------------------------------------------------------------------------------------
# The registered attention inside a tiny Gemma 4 text model.


def _tiny_gemma4(attn: str, seed: int = 0):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    cfg = Gemma4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0, num_kv_shared_layers=0, max_position_embeddings=256,
        attn_implementation="eager",
    )
    model = Gemma4ForCausalLM(cfg).double().eval()
    if attn == "slimtune":
        from slimtune.adapt.attention import enable_slimtune_attention

        enable_slimtune_attention(model)
    return model


# eager computes its softmax in fp32 even for an fp64 model, so agreement is ~1e-7, not fp64 rounding.
_EAGER_TOL = 1e-5


def _logits_and_grads(model, **inputs):
    model.zero_grad()
    logits = model(**inputs).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=logits.dtype)
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tiny_gemma4_matches_eager():
    ids = torch.randint(1, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_grads = _logits_and_grads(_tiny_gemma4("eager"), input_ids=ids)
    model = _tiny_gemma4("slimtune")
    assert model.config._attn_implementation == "slimtune"
    logits, grads = _logits_and_grads(model, input_ids=ids)
    assert _rel(logits, ref_logits) < _EAGER_TOL
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert _rel(grads[name], ref_grads[name]) < _EAGER_TOL, name


def test_tiny_gemma4_packed_documents_equal_separate_runs():
    gen = torch.Generator().manual_seed(1)
    doc_a, doc_b = torch.randint(1, 128, (1, 40), generator=gen), torch.randint(1, 128, (1, 24), generator=gen)
    packed = torch.cat([doc_a, doc_b], 1)
    position_ids = torch.cat([torch.arange(40), torch.arange(24)])[None]
    model = _tiny_gemma4("slimtune")
    logits = model(input_ids=packed, position_ids=position_ids).logits
    eager = _tiny_gemma4("eager")
    alone_a, alone_b = eager(input_ids=doc_a).logits, eager(input_ids=doc_b).logits
    assert _rel(logits[:, :40], alone_a) < _EAGER_TOL
    assert _rel(logits[:, 40:], alone_b) < _EAGER_TOL
    # Gradients of a loss over the packed row equal the sum of the two separate runs' gradients.
    wa = torch.randn(alone_a.shape, generator=gen, dtype=torch.float64)
    wb = torch.randn(alone_b.shape, generator=gen, dtype=torch.float64)
    model.zero_grad()
    (logits[:, :40] * wa).sum().add((logits[:, 40:] * wb).sum()).backward()
    eager.zero_grad()
    ((eager(input_ids=doc_a).logits * wa).sum() + (eager(input_ids=doc_b).logits * wb).sum()).backward()
    for (name, p), (_, r) in zip(model.named_parameters(), eager.named_parameters()):
        if r.grad is not None:
            assert _rel(p.grad, r.grad) < _EAGER_TOL, name


def test_tiny_gemma4_right_padding_matches_eager_on_real_tokens():
    ids = torch.randint(1, 128, (2, 64), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, 50:] = 0
    ref = _tiny_gemma4("eager")(input_ids=ids, attention_mask=mask).logits
    out = _tiny_gemma4("slimtune")(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert _rel(out[real], ref[real]) < _EAGER_TOL


def test_enable_rejects_other_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.adapt.attention import enable_slimtune_attention
    from slimtune.errors import UnsupportedModelError

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(UnsupportedModelError):
        enable_slimtune_attention(model)


def test_enable_switches_only_the_text_tower_of_multimodal_gemma4():
    from transformers import (
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    from slimtune.adapt.attention import enable_slimtune_attention

    text = Gemma4TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            hidden_size_per_layer_input=0, num_kv_shared_layers=0)
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16)
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, attn_implementation="sdpa")
    model = Gemma4ForConditionalGeneration(cfg)
    enable_slimtune_attention(model)
    assert model.config.text_config._attn_implementation == "slimtune"
    assert model.config.vision_config._attn_implementation == "sdpa"
    ids = torch.randint(1, 250, (1, 12))
    assert torch.isfinite(model(input_ids=ids).logits).all()


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (CPU), tiny fp16 shapes.

_INTERPRETER_SCRIPT = r"""
import sys
import torch
from slimtune.kernels.flash_attention import flash_attention, KernelConfig
from slimtune.kernels.attention_reference import attention_reference

def rel(a, b):
    d = b.norm().item()
    return (a.double() - b).norm().item() / (d if d > 1e-6 else 1.0)

torch.manual_seed(0)
VARIANT = int(sys.argv[1])  # 0: default kernels; 1: dQ with fused delta and V loaded first (variant 3), split dK/dV
small = KernelConfig(16, 16, 4, 1)
cases = [
    dict(b=1, hq=2, hk=1, t=40, window=None, docs=None, pad=None, dkdv=small),
    dict(b=2, hq=4, hk=2, t=37, window=9, docs=None, pad=None, dkdv=KernelConfig(16, 16, 4, 1, True)),
    dict(b=2, hq=4, hk=1, t=37, window=7, docs=[[0] * 10 + [1] + [2] * 20 + [3] * 6, [0] * 37], pad=None,
         dkdv=small._replace(max_split=1)),  # GQA without the head split: no fp32 partials
    dict(b=2, hq=2, hk=1, t=37, window=12, docs=None,
         pad=[[0] * 5 + [1] * 32, [1] * 30 + [0] * 7], dkdv=KernelConfig(16, 32, 4, 1, True)),
    dict(b=1, hq=4, hk=1, t=1, window=None, docs=None, pad=None, dkdv=small),
    dict(b=2, hq=4, hk=2, t=37, window=7, docs=[[0] * 10 + [1] + [2] * 20 + [3] * 6, [0] * 37],
         pad=[[0] * 5 + [1] * 32, [1] * 37], dkdv=KernelConfig(16, 16, 4, 1, True, 1), scratch=1),
    dict(b=2, hq=4, hk=2, t=37, window=None, docs=None, pad=[[0] * 5 + [1] * 32, [1] * 37],
         dkdv=KernelConfig(16, 16, 4, 1, False, 2), scratch=2),
    # one query head per KV head (no head split): dK/dV written directly in the input dtype, no partial sums
    dict(b=2, hq=2, hk=2, t=45, window=None, docs=[[0] * 20 + [1] + [2] * 24, [0] * 45], pad=None, dkdv=small),
]
for i, c in enumerate(cases):
    q = torch.randn(c["b"], c["hq"], c["t"], 16, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(c["b"], c["hk"], c["t"], 16, dtype=torch.float16, requires_grad=True) for _ in range(2))
    docs = torch.tensor(c["docs"]) if c["docs"] else None
    pad = torch.tensor(c["pad"], dtype=torch.bool) if c["pad"] else None
    sc = c.get("scratch", 0)
    cfg = {"fwd": KernelConfig(32, 16, 4, 1, False, sc), "dq": KernelConfig(16, 16, 4, 1, False, sc, 3 * VARIANT),
           "dkdv": c["dkdv"]._replace(variant=VARIANT and 1 + i % 2)}  # variant 1: split and const-stride dK/dV
    out = flash_attention(q, k, v, scale=0.3, window=c["window"], doc_ids=docs, key_padding_mask=pad, _configs=cfg)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(*ref_in, scale=0.3, window=c["window"], doc_ids=docs, key_padding_mask=pad)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    errs = [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
    assert all(torch.isfinite(x).all() for x in (out, *grads)), c
    assert max(errs) < 5e-3, (c, errs)
    if pad is not None:
        assert out[0, :, :5].abs().max() == 0 and grads[0][0, :, :5].abs().max() == 0
print("INTERPRETER_OK")
"""


@pytest.mark.parametrize("variant", [0, 1], ids=["single_kernels", "fused_delta_split_dkdv"])
def test_triton_kernels_under_interpreter(variant):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, str(variant)], env=env, capture_output=True,
                          text=True,
                          check=False, timeout=600)
    assert proc.returncode == 0 and "INTERPRETER_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ----------------------------------------------------------------------------------------------------------------------
# CUDA: the Triton kernels against an fp64 reference on fresh random inputs.

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
@pytest.mark.parametrize("variant", [0, 1], ids=["default", "fused_delta_split_dkdv"])
@pytest.mark.parametrize("b,hq,hk,t,d,window,docs,pad,dtype", GPU_CASES)
def test_triton_attention_matches_fp64_reference(b, hq, hk, t, d, window, docs, pad, dtype, variant):
    from slimtune.kernels.flash_attention import KernelConfig, flash_attention

    C = KernelConfig
    cfgs = None
    if variant == 1:  # the non-default backward structures the sweep times (bench_flash_attention.SWEEP)
        cfgs = {512: {"dq": C(64, 32, 8, 1, False, 2, 3), "dkdv": C(64, 64, 8, 1, True, 2, 1)},
                256: {"dq": C(128, 32, 8, 2, False, 0, 1), "dkdv": C(64, 64, 8, 2, True, 2, 1, 1)}}[d]

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


def test_flops_formula():
    from slimtune.kernels.flash_attention import causal_attention_flops

    assert math.isclose(causal_attention_flops(1, 8, 8192, 512), 4 * 8 * 8192**2 * 512 / 2)
