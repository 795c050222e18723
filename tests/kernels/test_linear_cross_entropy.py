"""Tests for slimtune.kernels.linear_cross_entropy against its full-logits reference.

CPU tests run in seconds. Tests marked ``gpu`` need CUDA (and Triton for the fast path) and are skipped without
it; they use Gemma 4's real vocabulary (262,144) at 2,048 tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.kernels import linear_cross_entropy as lce
from slimtune.kernels import softcap_cross_entropy_triton as triton_ce
from slimtune.kernels.linear_cross_entropy import (
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

# dtype -> (loss rel err, grad max-abs err / max-abs ref, grad norm rel err), against an fp32 reference of the
# same (rounded) inputs. Low-precision rows cover the rounding of dz and of the returned gradient.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.bfloat16: (2e-5, 2e-2, 8e-3),
    torch.float16: (2e-5, 4e-3, 2e-3),
}
# On CUDA, fp32 matmuls over K = 262,144 may sum in another order (split-K) than the reference's: a bit more room.
GPU_TOLERANCES = {**TOLERANCES, torch.float32: (1e-5, 5e-5, 2e-5)}
N, H, V = 37, 16, 101  # odd on purpose: N is not a multiple of any chunk size tested


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh, reproducible random inputs in every test (seed derived from the test's name)."""
    torch.manual_seed(zlib.crc32(request.node.name.encode()))


def _inputs(n=N, h=H, v=V, dtype=torch.float32, ignore_frac=0.25, ignore_index=-100, device="cpu", shape=None):
    """Hidden scaled so logits span the softcap's non-linear range (std ~ 20), labels with ignored rows."""
    hidden = torch.randn(n, h, device=device) * (20.0 / h**0.5)
    weight = torch.randn(v, h, device=device)
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.rand(n, device=device) < ignore_frac] = ignore_index
    if shape is not None:
        hidden, labels = hidden.reshape(*shape, h), labels.reshape(shape)
    return hidden.to(dtype), weight.to(dtype), labels


def _run(fn, hidden, weight, labels, *, weight_grad=True, scale=1.0, **kwargs):
    """Loss and gradients of ``scale * fn(...)`` on fresh leaf copies of hidden/weight."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(weight_grad)
    loss = fn(hidden, weight, labels, **kwargs)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def _assert_close(ours, ref, dtype, what="", tolerances=TOLERANCES):
    loss_tol, max_tol, norm_tol = tolerances[dtype]
    (loss, gh, gw), (rloss, rgh, rgw) = ours, ref
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(loss)
    assert abs(loss.item() - rloss.item()) <= loss_tol * max(1.0, abs(rloss.item())), (what, loss, rloss)
    for name, g, r in (("grad_hidden", gh, rgh), ("grad_weight", gw, rgw)):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == r.shape, (name, g.dtype, g.shape)
        diff = (g.float() - r.float()).abs()
        scale = r.float().abs().max().clamp_min(1e-30)
        assert diff.max() <= max_tol * scale, (what, name, (diff.max() / scale).item())
        assert diff.norm() <= norm_tol * r.float().norm().clamp_min(1e-30), (what, name)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk_size", [1, 5, None, 10_000])
def test_fp32_matches_reference(softcap, chunk_size):
    hidden, weight, labels = _inputs()
    ours = _run(linear_cross_entropy, hidden, weight, labels, softcap=softcap, chunk_size=chunk_size)
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, softcap=softcap)
    _assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("cpu_fp32_math", [True, False], ids=["fp32-math", "lowp-data-path"])
def test_low_precision_matches_fp32_reference(dtype, softcap, cpu_fp32_math, monkeypatch):
    """``lowp-data-path`` runs what CUDA runs (dz rounded to the input dtype, low-precision matmuls) on CPU."""
    monkeypatch.setattr(lce, "_CPU_FP32_MATH", cpu_fp32_math)
    hidden, weight, labels = _inputs(dtype=dtype)
    ours = _run(linear_cross_entropy, hidden, weight, labels, softcap=softcap, chunk_size=7)
    ref = _run(linear_cross_entropy_reference, hidden.float(), weight.float(), labels, softcap=softcap)
    _assert_close(ours, ref, dtype)


def test_ignored_rows_get_zero_gradient():
    hidden, weight, labels = _inputs(ignore_frac=0.7, ignore_index=-1)
    ours = _run(linear_cross_entropy, hidden, weight, labels, softcap=30.0, ignore_index=-1, chunk_size=4)
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, softcap=30.0, ignore_index=-1)
    _assert_close(ours, ref, torch.float32)
    assert (ours[1][labels == -1] == 0).all()
    # -100 is an ordinary (out-of-range) label when ignore_index is -1
    with pytest.raises(ConfigError, match="-100"):
        linear_cross_entropy(hidden, weight, torch.full_like(labels, -100), ignore_index=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.6, 1.0])
def test_static_shapes_equal_dropping_ignored_rows(dtype, ignore_frac, monkeypatch):
    """CUDA-graph mode scores every row with weight 0 for ignored ones: same loss and gradients as dropping them."""
    monkeypatch.setattr(lce, "_CPU_FP32_MATH", False)  # the CUDA data path (bf16 dz) on CPU
    hidden, weight, labels = _inputs(dtype=dtype, ignore_frac=ignore_frac, shape=(37,))
    ours = _run(linear_cross_entropy, hidden, weight, labels, softcap=30.0, chunk_size=8, static_shapes=True)
    ref = _run(linear_cross_entropy, hidden, weight, labels, softcap=30.0, chunk_size=8)
    _assert_close(ours, ref, dtype)
    assert (ours[1][labels == -100] == 0).all()


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_all_ignored_gives_zero_loss_and_grads(softcap):
    hidden, weight, labels = _inputs(ignore_frac=1.0)
    loss, gh, gw = _run(linear_cross_entropy, hidden, weight, labels, softcap=softcap, chunk_size=3)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert gh.shape == hidden.shape and (gh == 0).all()
    assert gw.shape == weight.shape and (gw == 0).all()
    rloss, _, _ = _run(linear_cross_entropy_reference, hidden, weight, labels, softcap=softcap)
    assert rloss.item() == 0.0


def test_grad_output_scaling():
    hidden, weight, labels = _inputs()
    ours = _run(linear_cross_entropy, hidden, weight, labels, softcap=30.0, chunk_size=8, scale=3.5)
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, softcap=30.0, scale=3.5)
    _assert_close(ours, ref, torch.float32)
    unscaled = _run(linear_cross_entropy, hidden, weight, labels, softcap=30.0, chunk_size=8)
    torch.testing.assert_close(ours[1], unscaled[1] * 3.5)
    torch.testing.assert_close(ours[2], unscaled[2] * 3.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_input(dtype):
    hidden, weight, labels = _inputs(n=3 * 11, dtype=dtype, shape=(3, 11))
    ours = _run(linear_cross_entropy, hidden, weight, labels, softcap=30.0, chunk_size=6)
    ref = _run(linear_cross_entropy_reference, hidden.float(), weight.float(), labels, softcap=30.0)
    assert ours[1].shape == (3, 11, H)
    _assert_close(ours, ref, dtype)


def test_non_contiguous_inputs():
    hidden, weight, labels = _inputs(n=2 * N)
    hidden_nc = hidden.T.contiguous().T[::2]  # column-major storage, every other row
    weight_nc = weight.T.contiguous().T  # (V, H) view of an (H, V) buffer
    labels_nc = labels[::2]
    assert not hidden_nc.is_contiguous() and not weight_nc.is_contiguous() and not labels_nc.is_contiguous()
    ours = _run(linear_cross_entropy, hidden_nc, weight_nc, labels_nc, softcap=30.0, chunk_size=5)
    ref = _run(linear_cross_entropy_reference, hidden_nc.contiguous(), weight, labels_nc.contiguous(), softcap=30.0)
    _assert_close(ours, ref, torch.float32)


def test_frozen_weight_and_no_grad():
    hidden, weight, labels = _inputs()
    ours = _run(linear_cross_entropy, hidden, weight, labels, softcap=30.0, weight_grad=False)
    ref = _run(linear_cross_entropy_reference, hidden, weight, labels, softcap=30.0, weight_grad=False)
    _assert_close(ours, ref, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.requires_grad_(), weight, labels, softcap=30.0)
    assert not loss.requires_grad
    assert abs(loss.item() - ref[0].item()) <= 1e-5 * abs(ref[0].item())


def test_empty_input():
    hidden, weight, labels = _inputs(n=0)
    loss, gh, _ = _run(linear_cross_entropy, hidden, weight, labels)
    assert loss.item() == 0.0 and gh.shape == (0, H)


@pytest.mark.parametrize("fn", [linear_cross_entropy, linear_cross_entropy_reference])
@pytest.mark.parametrize("bad", [V, V + 7, -5])
def test_out_of_range_label_is_a_clear_error(fn, bad):
    hidden, weight, labels = _inputs(n=12, shape=(3, 4))
    labels[1, 2] = bad
    with pytest.raises(ValueError) as info:
        fn(hidden, weight, labels)
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    assert f"= {bad}" in message and f"vocab size {V}" in message and "[1, 2]" in message


def test_bad_arguments_are_listed_together():
    hidden, weight, labels = _inputs()
    with pytest.raises(ConfigError) as info:
        linear_cross_entropy(hidden, weight[:, :-1], labels[:-1].float(), softcap=0.0, chunk_size=0)
    message = str(info.value)
    for part in ("weight is", "labels must be an integer", "labels shape", "softcap", "chunk_size"):
        assert part in message


def test_force_reference_switch(monkeypatch):
    hidden, weight, labels = _inputs()
    calls = []
    real = lce.linear_cross_entropy_reference
    monkeypatch.setattr(lce, "linear_cross_entropy_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(lce, "FORCE_REFERENCE", True)
    loss = lce.linear_cross_entropy(hidden, weight, labels, softcap=30.0)
    assert calls and loss.item() == real(hidden, weight, labels, softcap=30.0).item()


def test_default_chunk_size():
    assert default_chunk_size(262_144, "cuda") == 512  # 512 MiB of fp32 logits
    assert default_chunk_size(262_144, "cpu") == 32
    assert default_chunk_size(1001, "cpu") % 64 == 0
    assert default_chunk_size(10**9, "cuda") == 1


@pytest.mark.skipif(not triton_ce.TRITON_AVAILABLE, reason="triton is not installed")
def test_triton_kernel_under_interpreter():
    """Runs the Triton kernel on CPU through TRITON_INTERPRET=1 (set before triton loads: a subprocess)."""
    script = textwrap.dedent(
        """
        import json, torch
        from slimtune.kernels import linear_cross_entropy as lce
        from slimtune.kernels import softcap_cross_entropy_triton as t
        torch.manual_seed(0)
        out = {}
        for softcap in (None, 30.0):
            z = torch.randn(9, 3001) * 40
            y = torch.randint(0, 3001, (9,))
            ref_loss, ref_dz = lce._softcap_ce_chunk_torch(z.clone(), y, softcap, True)
            z1 = z.clone()
            loss1 = t.softcap_cross_entropy_chunk(z1, y, softcap)
            g = torch.empty(9, 3001, dtype=torch.bfloat16)
            loss2 = t.softcap_cross_entropy_chunk(z.clone(), y, softcap, grad_out=g)
            z3 = z.clone()
            loss3 = t.softcap_cross_entropy_chunk(z3, y, softcap, compute_grad=False)
            out[str(softcap)] = [
                ((loss1 - ref_loss).abs() / ref_loss.abs()).max().item(),
                (z1 - ref_dz).abs().max().item(),
                (g.float() - ref_dz).abs().max().item(),
                (loss2 - ref_loss).abs().max().item() + (loss3 - ref_loss).abs().max().item(),
                float(torch.equal(z3, z)),
            ]
        lce.ELEMENTWISE_BACKEND = "triton"
        for cpu_fp32 in (True, False):
            lce._CPU_FP32_MATH = cpu_fp32
            h = (torch.randn(37, 16) * 5).bfloat16().requires_grad_()
            w = torch.randn(101, 16).bfloat16()
            y = torch.randint(0, 101, (37,)); y[::4] = -100
            loss = lce.linear_cross_entropy(h, w, y, softcap=30.0, chunk_size=6)
            loss.backward()
            hr = h.detach().float().requires_grad_()
            ref = lce.linear_cross_entropy_reference(hr, w.float(), y, softcap=30.0)
            ref.backward()
            out["lce" + str(cpu_fp32)] = [
                abs(loss.item() - ref.item()) / abs(ref.item()),
                ((h.grad.float() - hr.grad).abs().max() / hr.grad.abs().max()).item(),
            ]
        print(json.dumps(out))
        """
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for softcap in ("None", "30.0"):
        loss_rel, dz_fp32, dz_bf16, loss_other, untouched = out[softcap]
        assert loss_rel < 1e-6 and dz_fp32 < 1e-6 and dz_bf16 < 4e-3 and loss_other < 1e-4 and untouched == 1.0
    for key in ("lceTrue", "lceFalse"):
        loss_rel, grad_rel = out[key]
        assert loss_rel < 1e-5 and grad_rel < 2e-2, (key, out[key])


# ---------------------------------------------------------------------------------------------------------------
# GPU tests (run on an H200 by the lead): real vocabulary, every dtype, the Triton path and its memory.

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_SHAPES = [(2048, 1536, 262_144), (333, 97, 1001)]


@pytest.fixture
def _fp32_matmul_highest():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the fp32 reference
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_matches_reference(dtype, shape, softcap, _fp32_matmul_highest):
    n, h, v = shape
    hidden, weight, labels = _inputs(n, h, v, dtype=dtype, device="cuda")
    ours = _run(linear_cross_entropy, hidden, weight, labels, softcap=softcap, weight_grad=False)
    ref = _run(
        linear_cross_entropy_reference, hidden.float(), weight.float(), labels, softcap=softcap, weight_grad=False
    )
    _assert_close(ours, ref, dtype, what=f"{dtype} {shape} softcap={softcap}", tolerances=GPU_TOLERANCES)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_weight_grad(dtype, _fp32_matmul_highest):
    hidden, weight, labels = _inputs(333, 97, 1001, dtype=dtype, device="cuda")
    ours = _run(linear_cross_entropy, hidden, weight, labels, softcap=30.0, chunk_size=64)
    ref = _run(linear_cross_entropy_reference, hidden.float(), weight.float(), labels, softcap=30.0)
    _assert_close(ours, ref, dtype, tolerances=GPU_TOLERANCES)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(not triton_ce.TRITON_AVAILABLE, reason="triton is not installed")
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_triton_chunk_matches_torch_chunk(softcap):
    z = torch.randn(64, 262_144, device="cuda") * 40
    y = torch.randint(0, 262_144, (64,), device="cuda")
    ref_loss, ref_dz = lce._softcap_ce_chunk_torch(z.clone(), y, softcap, True)
    z1 = z.clone()
    loss = triton_ce.softcap_cross_entropy_chunk(z1, y, softcap)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(z1, ref_dz, rtol=1e-4, atol=1e-6)
    g = torch.empty_like(z, dtype=torch.bfloat16)
    triton_ce.softcap_cross_entropy_chunk(z.clone(), y, softcap, grad_out=g)
    torch.testing.assert_close(g.float(), ref_dz, rtol=8e-3, atol=1e-6)


@pytest.mark.gpu
@requires_cuda
def test_gpu_peak_memory_is_one_chunk():
    """bf16, 2,048 tokens x 262,144 vocab: extra memory ~ one chunk (768 MiB), far below the full logits."""
    hidden, weight, labels = _inputs(2048, 1536, 262_144, dtype=torch.bfloat16, device="cuda", ignore_frac=0.0)
    hidden.requires_grad_(True)

    def peak_extra(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(hidden, weight, labels, softcap=30.0).backward()
        torch.cuda.synchronize()
        hidden.grad = None
        return torch.cuda.max_memory_allocated() - base

    ours, ref = peak_extra(linear_cross_entropy), peak_extra(linear_cross_entropy_reference)
    assert ours < 1.1 * 2**30, ours / 2**20
    assert ref > 4 * ours, (ours / 2**20, ref / 2**20)
