"""slimtune attention on GPUs with less shared memory than the H200 (A100 163 KiB, RTX 30xx/40xx and L4 99 KiB).

The tuned head_dim-512 kernels need up to 200 KiB of shared memory; Triton refuses such a launch with
OutOfResources before running it. The launchers then try smaller launch shapes and remember the one that fits.
Here, under the Triton interpreter (CPU, fp16), every launch with BLOCK_M or BLOCK_N above a pretend limit raises
OutOfResources, as a 99 KiB card would: forward and all three gradients must still equal the reference, and when
nothing fits the error must say what to do.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = r"""
import torch
from triton.runtime.errors import OutOfResources
import slimtune.kernels.flash_attention as fa
from slimtune.errors import KernelUnavailableError
from slimtune.kernels.attention_reference import attention_reference

LIMIT = int(__import__("sys").argv[1])  # largest BLOCK_M / BLOCK_N this pretend GPU can hold
launches = []

class SmallGPU:
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        def launch(*args, **kw):
            if max(kw.get("BLOCK_M", 0), kw.get("BLOCK_N", 0)) > LIMIT:
                raise OutOfResources(200 * 1024, 99 * 1024, "shared memory")
            launches.append((kw.get("BLOCK_M"), kw.get("BLOCK_N")))
            return self.kernel[grid](*args, **kw)
        return launch

class SmallGPUProducts(SmallGPU):  # the stored backward's products: their shared memory grows with BLOCK_D
    def __getitem__(self, grid):
        def launch(*args, **kw):
            if kw["BLOCK_Q"] > LIMIT or kw["BLOCK_D"] > 2 * LIMIT:
                raise OutOfResources(96 * 1024, 99 * 1024 if LIMIT >= 32 else 48 * 1024, "shared memory")
            launches.append((kw["BLOCK_Q"], kw["BLOCK_D"] // 2))
            return self.kernel[grid](*args, **kw)
        return launch

for mod, names in ((fa._k, ("_attn_fwd_kernel", "_attn_bwd_dq_kernel")), (fa._kb, ("_attn_bwd_dkdv_kernel",))):
    for name in names:
        setattr(mod, name, SmallGPU(getattr(mod, name)))
stored = fa._stored
stored._ks._dkdv_from_pds_kernel = SmallGPUProducts(stored._ks._dkdv_from_pds_kernel)

torch.manual_seed(0)
t, d = 45, 64
q = torch.randn(1, 4, t, d, dtype=torch.float16).requires_grad_()
k = torch.randn(1, 2, t, d, dtype=torch.float16).requires_grad_()
v = torch.randn(1, 2, t, d, dtype=torch.float16).requires_grad_()
big = fa.KernelConfig(64, 64, 4, 1)
configs = {"fwd": big, "dq": big._replace(variant=1), "dkdv": big._replace(transposed=True)}
try:
    out = fa.flash_attention(q, k, v, scale=1.0, window=20, _configs=configs)
except KernelUnavailableError as exc:
    assert "attention='sdpa'" in str(exc), exc
    print("NOTHING_FITS")
    raise SystemExit(0)
do = torch.randn_like(out)
grads = torch.autograd.grad(out, (q, k, v), do)
ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
ref = attention_reference(*ref_in, scale=1.0, window=20)
ref_grads = torch.autograd.grad(ref, ref_in, do.double())
for got, want in zip((out, *grads), (ref, *ref_grads)):
    assert ((got.double() - want).norm() / want.norm()).item() < 5e-3
assert launches and all(max(m, n) <= LIMIT for m, n in launches)
fitted = {key[3]: c for key, c in fa._fitted.items()}
assert set(fitted) == {"fwd", "dq", "dkdv"} and fitted["dq"].variant & 1, fitted  # fused delta kept
print("FITTED", {kind: tuple(c)[:4] for kind, c in fitted.items()})

# the stored backward (full layer, dq variant 5): its dQ launches and its products fall back as well
stored.POISON_BUFFERS = True
stored.WAVES = 1
launches.clear()
out = fa.flash_attention(q, k, v, scale=1.0, _configs={**configs, "dq": big._replace(variant=5)})
grads = torch.autograd.grad(out, (q, k, v), do)
ref = attention_reference(*ref_in, scale=1.0)
ref_grads = torch.autograd.grad(ref, ref_in, do.double())
for got, want in zip((out, *grads), (ref, *ref_grads)):
    assert ((got.double() - want).norm() / want.norm()).item() < 5e-3
assert launches and all(max(m, n) <= LIMIT for m, n in launches), launches
products = [c for key, c in fa._fitted.items() if key[3] == "products"]
assert products and all(t.block_d <= 2 * LIMIT for t in products), products
print("STORED_FITTED")
"""


@pytest.mark.parametrize("limit", [32, 16, 8], ids=["fits-32", "fits-16", "nothing-fits"])
def test_kernels_fall_back_to_launch_shapes_that_fit(limit):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(limit)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert ("NOTHING_FITS" in proc.stdout) == (limit < 16), proc.stdout
    assert ("STORED_FITTED" in proc.stdout) == (limit >= 16), proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_real_gpu_a_shape_over_its_shared_memory_falls_back_and_stays_exact():
    """Launch shapes too big for any GPU (head_dim 512, 128-row tiles: well over 227 KiB) make Triton raise the real
    OutOfResources; the launchers must land on a shape that fits and give the reference's results."""
    import slimtune.kernels.flash_attention as fa
    from slimtune.kernels.attention_reference import attention_reference

    gen = torch.Generator().manual_seed(5)
    t, d = 300, 512
    q, k, v = (torch.randn(1, h, t, d, generator=gen).to("cuda", torch.bfloat16).requires_grad_() for h in (8, 1, 1))
    huge = fa.KernelConfig(128, 128, 8, 2)
    out = fa.flash_attention(q, k, v, scale=1.0, _configs={"fwd": huge, "dq": huge, "dkdv": huge._replace(
        transposed=True)})
    do = torch.randn(out.shape, generator=gen).to("cuda", torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(*ref_in, scale=1.0)
    for got, want in zip((out, *grads), (ref, *torch.autograd.grad(ref, ref_in, do.double()))):
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2
    chosen = {key[3]: c for key, c in fa._fitted.items() if key[2] == d and key[4] in (huge, huge._replace(
        transposed=True))}
    assert set(chosen) == {"fwd", "dq", "dkdv"} and all(c != huge for c in chosen.values()), chosen
