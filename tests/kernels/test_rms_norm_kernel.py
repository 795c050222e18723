"""Fused RMSNorm kernels (slimtune.kernels.rms_norm) against an fp64 reference.

CPU: the fallback is transformers' Gemma4RMSNorm bit for bit. Triton interpreter (subprocess, fp32/fp16): forward
and input gradient of the kernels on odd shapes, strided rows, with and without a weight. CUDA (`-m gpu`): bf16,
fp16, fp32 on Gemma 4's widths, no farther from fp64 than transformers' own norm, inside torch.compile and a CUDA
graph.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from slimtune.kernels.rms_norm import fused_rms_norm_available, rms_norm, rms_norm_reference

REPO = Path(__file__).resolve().parents[2]


def _fp64(x, w, eps):
    xd = x.double()
    y = xd * (xd.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    return y * w.double() if w is not None else y


@pytest.mark.parametrize("with_scale", [True, False])
def test_cpu_fallback_is_transformers_norm_bit_for_bit(with_scale):
    torch.manual_seed(0)
    ref = Gemma4RMSNorm(96, eps=1e-6, with_scale=with_scale).to(torch.bfloat16)
    if with_scale:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(96) * 0.3 + 1)
        ref.weight.requires_grad_(False)
    x = (torch.randn(2, 9, 96) * 4).to(torch.bfloat16)
    assert not fused_rms_norm_available(x, ref.weight if with_scale else None)
    assert torch.equal(rms_norm(x, ref.weight if with_scale else None, 1e-6), ref(x))
    assert torch.equal(rms_norm_reference(x, ref.weight if with_scale else None, 1e-6), ref(x))


def test_first_use_check_measures_the_backward_against_the_terms_it_subtracts():
    """A 1-wide row's dx is rstd·g·(1 − x̂²) ≈ 0: two fp32 computations of it differ by rounding of rstd·g, which is
    ~100 % of dx itself. That must not count as a broken kernel (it did on the H200: every 1-wide backward fell
    back to torch), while an error at the size of rstd·g still does."""
    import slimtune.kernels.rms_norm as rn

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, generator=gen) * 3
    dy = torch.randn(64, 1, generator=gen)
    rstd = rn._rstd(x, 1e-6)
    want = rn.rms_norm_backward_reference(dy, x, None, rstd)
    scale = rn._weighted(dy, None) * rstd[:, None]  # rstd·g: the size of the terms the backward subtracts
    assert want.norm() < 1e-3 * scale.norm()  # the case: dx has cancelled to ~0

    def check(noise):
        rn._checked.clear()
        got = torch.empty_like(x)
        ok = rn._launch_checked("backward", x, None, lambda: got.copy_(want + noise * scale), got,
                                lambda k: want[:k], lambda k: scale[:k].norm())
        return ok, rn._checked.copy()

    ok, state = check(1e-6)  # fp32 rounding of the terms
    assert ok and all(state.values()), state
    with pytest.warns(RuntimeWarning, match="off the torch formula"):
        ok, state = check(0.1)  # a wrong kernel
    assert not ok and not any(state.values())
    rn._checked.clear()


_INTERPRETER_SCRIPT = r"""
import torch
from slimtune.kernels.rms_norm import fused_rms_norm_available, rms_norm

def fp64(x, w, eps):
    xd = x.double()
    y = xd * (xd.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    return y * w.double() if w is not None else y

def rel(a, b):  # relative, absolute where the reference is ~0 (width 1: the gradient vanishes)
    return ((a.double() - b).norm() / max(b.norm().item(), 1.0)).item()

torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    for shape in ((1, 1), (64, 1), (3, 7, 48), (5, 257), (2, 3, 256), (4, 1536), (1, 5376)):
        for scaled in (True, False):
            width = shape[-1]
            wide = torch.randn(*shape[:-1], width + 5) * 3      # rows with a stride larger than their width
            x = wide[..., :width].to(dtype).requires_grad_()
            w = (torch.randn(width) * 0.3 + 1).to(dtype) if scaled else None
            assert fused_rms_norm_available(x, w)
            y = rms_norm(x, w, 1e-6)
            ref = fp64(x.detach(), w, 1e-6)
            assert y.shape == x.shape and y.dtype == dtype
            assert rel(y, ref) < tol, (dtype, shape, scaled, rel(y, ref))
            dy = torch.randn(shape).to(dtype)
            (gx,) = torch.autograd.grad(y, x, dy)
            xd = x.detach().double().requires_grad_()
            (gref,) = torch.autograd.grad(fp64(xd, w, 1e-6), xd, dy.double())
            assert rel(gx, gref) < 4 * tol, (dtype, shape, scaled, rel(gx, gref))
            assert torch.isfinite(gx).all()

# A kernel that computes garbage (here: writes nothing) is caught by the first-use check: torch takes over, with a
# warning, and the results stay right.
import warnings
import slimtune.kernels.rms_norm as rn

class Broken:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

assert rn._checked and all(rn._checked.values()), rn._checked  # the kernels above passed their own first-use check
rn._k._rms_norm_fwd_kernel = rn._k._rms_norm_bwd_kernel = Broken()
rn._checked.clear()
x = (torch.randn(9, 96) * 3).requires_grad_()
w = torch.randn(96) * 0.3 + 1
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = rms_norm(x, w, 1e-6)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
assert rel(y, fp64(x.detach(), w, 1e-6)) < 1e-5
xd = x.detach().double().requires_grad_()
(gref,) = torch.autograd.grad(fp64(xd, w, 1e-6), xd, torch.ones(9, 96, dtype=torch.float64))
assert rel(gx, gref) < 1e-4
assert sum("kernel is" in str(c.message) for c in caught) == 2, [str(c.message) for c in caught]

# A kernel that cannot compile (a GPU Triton does not support) does not stop training either.
class Failing:
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("no kernel image for this GPU")
        return launch

rn._k._rms_norm_fwd_kernel = rn._k._rms_norm_bwd_kernel = Failing()
rn._checked.clear()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = rms_norm(x, w, 1e-6)
    (gx2,) = torch.autograd.grad(y, x, torch.ones_like(y))
    rms_norm(x, w, 1e-6)  # known bad now: no second launch, no second warning
assert rel(y, fp64(x.detach(), w, 1e-6)) < 1e-5 and rel(gx2, gref) < 1e-4
messages = [str(c.message) for c in caught]
assert sum("failed to compile or launch (RuntimeError: no kernel image" in m for m in messages) == 2, messages
print("INTERPRETER_OK")
"""


def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    assert proc.returncode == 0 and "INTERPRETER_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 48), (2048, 256), (1000, 8, 512), (4097, 1536), (33, 5376)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scaled", [True, False], ids=["weight", "no_weight"])
def test_cuda_kernels_are_as_close_to_fp64_as_transformers_norm(dtype, shape, scaled):
    gen = torch.Generator().manual_seed(hash((shape, scaled)) % 2**31)
    x = (torch.randn(shape, generator=gen) * 3).to("cuda", dtype)
    dy = torch.randn(shape, generator=gen).to("cuda", dtype)
    w = (torch.randn(shape[-1], generator=gen) * 0.3 + 1).to("cuda", dtype) if scaled else None
    assert fused_rms_norm_available(x, w)
    ref = Gemma4RMSNorm(shape[-1], eps=1e-6, with_scale=scaled).to("cuda", dtype)
    if scaled:
        with torch.no_grad():
            ref.weight.copy_(w)
        ref.weight.requires_grad_(False)

    def run(fn):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        return y, torch.autograd.grad(y, xi, dy)[0]

    y, gx = run(lambda t: rms_norm(t, w, 1e-6))
    y_hf, gx_hf = run(ref)
    xd = x.double().requires_grad_()
    y64 = _fp64(xd, w, 1e-6)
    (g64,) = torch.autograd.grad(y64, xd, dy.double())

    def err(a, b, size=None):
        b = b.detach()
        return float((a.double() - b).norm() / (b.norm() if size is None else size))

    from slimtune.kernels.rms_norm import _checked

    mine = {k: v for k, v in _checked.items() if k[1:] == (x.device, dtype, shape[-1], None if w is None else w.dtype)}
    assert len(mine) == 2 and all(mine.values()), mine  # both kernels ran: no first-use fallback to torch
    floor = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}[dtype]
    assert y.dtype == dtype and torch.isfinite(gx).all()
    assert err(y, y64) <= 1.5 * err(y_hf, y64) + floor, (err(y, y64), err(y_hf, y64))
    # dx against the size of the terms it is the difference of (1-wide rows cancel to ~0 in any precision)
    size = (dy.double() * (w.double() if scaled else 1)
            * (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()).norm()
    assert err(gx, g64, size) <= 1.5 * err(gx_hf, g64, size) + floor, (err(gx, g64, size), err(gx_hf, g64, size))


@pytest.mark.gpu
@requires_cuda
def test_cuda_kernels_inside_torch_compile_and_a_cuda_graph():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 1536, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    w = (torch.randn(1536, generator=gen) * 0.3 + 1).to("cuda", torch.bfloat16)
    dy = torch.randn(512, 1536, generator=gen).to("cuda", torch.bfloat16)

    def f(t):
        return rms_norm(t * 2, w, 1e-6) + 1

    eager = torch.autograd.grad(f(x), x, dy)[0]
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(x), x, dy)[0]
    assert torch.equal(compiled, eager)  # opaque op: the same kernels, the same bits
    static = torch.zeros_like(eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        static.copy_(torch.autograd.grad(f(x), x, dy)[0])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.copy_(torch.autograd.grad(f(x), x, dy)[0])
    static.zero_()
    graph.replay()
    assert torch.equal(static, eager)
