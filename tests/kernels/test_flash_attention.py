"""Tests for slimtune's training attention: reference, CPU fallback, transformers adapter, Triton kernels.

Levels: CPU tests (reference vs a naive fp64 loop; fallback vs reference; the registered attention inside a tiny
Gemma 4 text model vs ``eager``), Triton-interpreter tests of the kernels on tiny fp16 shapes (subprocess with
TRITON_INTERPRET=1; the interpreter's bf16 dot is unreliable). The CUDA tests against an fp64 reference are in
test_flash_attention_gpu.py.
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
sys.path.insert(0, str(Path(__file__).parent))
from _attention_checks import rel_error as _rel  # noqa: E402


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


def test_padded_batch_generation_equals_sdpa_on_a_kv_sharing_model(tiny_dir):
    """transformers 5.2x slices masks as mask[:, :, keep, :] before the KV-shared layers unless the attention is named
    "flash"; our 2D padding mask raised IndexError there (slimtune.adapt.attention._keep_masks_whole)."""
    import slimtune

    ids = torch.tensor([[0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])  # left padding: a 2D mask reaches the layers
    out = {}
    for attention in ("sdpa", "slimtune"):
        model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), dtype="float32", device="cpu",
                                       attention=attention)
        with torch.no_grad():
            out[attention] = model.eval().generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=4,
                                                   do_sample=False)
    assert torch.equal(out["slimtune"], out["sdpa"])


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


def test_flops_formula():
    from slimtune.kernels.flash_attention import causal_attention_flops

    assert math.isclose(causal_attention_flops(1, 8, 8192, 512), 4 * 8 * 8192**2 * 512 / 2)
