"""`slimtune bench --steps-profile`: kernel grouping, per-step figures, and a real profile of a step."""

import pytest
import torch

from slimtune.bench.profile import (format_profile, kernel_group, profile_steps, summarize_host_calls,
                                    summarize_kernels)


@pytest.mark.parametrize("name,group", [
    ("_attn_fwd_kernel", "attention"),
    ("_attn_bwd_dkdv_kernel", "attention"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int, int)",
     "nf4 dequantize"),
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("triton_poi_fused_add_mul_0", "compiled (inductor)"),
    ("_softcap_ce_fwd_bwd_kernel", "loss (lm_head + cross-entropy)"),
    ("Memcpy HtoD (Pinned -> Device)", "copies and fills"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise and reductions"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_names_fall_in_the_group_that_does_that_work(name, group):
    assert kernel_group(name) == group


def test_summary_is_per_step_and_shares_add_up():
    rows = [("nvjet_gemm_a", 6000.0, 40), ("_attn_fwd_kernel", 3000.0, 20), ("triton_poi_fused_x", 1000.0, 10),
            ("kDequantizeBlockwise", 2000.0, 20)]
    p = summarize_kernels(rows, steps=2, wall_s=0.008, top=3)
    assert p["gpu_busy_ms"] == pytest.approx(6.0)  # 12,000 µs over 2 steps
    assert p["gpu_busy_pct"] == pytest.approx(75.0)
    assert [g["group"] for g in p["groups"]] == ["matmul", "attention", "nf4 dequantize", "compiled (inductor)"]
    assert sum(g["pct"] for g in p["groups"]) == pytest.approx(100.0, abs=0.2)
    assert [k["kernel"] for k in p["top_kernels"]] == ["nvjet_gemm_a", "_attn_fwd_kernel", "kDequantizeBlockwise"]
    assert p["top_kernels"][0]["ms"] == pytest.approx(3.0) and p["top_kernels"][0]["calls"] == 20
    assert "matmul" in format_profile(p)
    with pytest.raises(ValueError, match="steps"):
        summarize_kernels(rows, steps=0, wall_s=1.0)


def test_profiling_a_cpu_step_times_it_and_says_no_kernels_were_seen():
    a = torch.randn(64, 64)
    calls = []
    p = profile_steps(lambda: calls.append(a @ a), 3)
    assert len(calls) == 3 and p["steps"] == 3 and p["wall_ms"] > 0
    assert p["kernels_traced"] == 0 and "no CUDA kernels" in format_profile(p)


def test_host_calls_keep_only_cuda_calls_and_syncs_per_step_longest_first():
    rows = [("cudaLaunchKernel", 4000.0, 200), ("aten::mm", 9000.0, 10), ("cudaStreamSynchronize", 8000.0, 2),
            ("aten::_local_scalar_dense", 600.0, 4), ("cuLaunchKernelEx", 200.0, 20)]
    calls = summarize_host_calls(rows, steps=2, top=3)
    assert [c["call"] for c in calls] == ["cudaStreamSynchronize", "cudaLaunchKernel", "aten::_local_scalar_dense"]
    assert calls[0]["ms"] == pytest.approx(4.0) and calls[0]["calls"] == 1
    p = summarize_kernels([("nvjet_gemm_a", 10.0, 1)], steps=1, wall_s=1.0) | {"host_calls": calls}
    assert "cudaStreamSynchronize" in format_profile(p)


def test_a_step_that_reads_a_value_back_shows_the_sync():
    a = torch.randn(64, 64)
    p = profile_steps(lambda: (a @ a).sum().item(), 2)
    assert any(c["call"] in ("aten::item", "aten::_local_scalar_dense") for c in p["host_calls"]), p["host_calls"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profiling_a_cuda_graph_replay_sees_its_kernels():
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out.copy_(torch.relu(a @ a))  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(torch.relu(a @ a))
    p = profile_steps(g.replay, 4)
    groups = {x["group"] for x in p["groups"]}
    assert "matmul" in groups, format_profile(p)
    assert p["gpu_busy_ms"] > 0
    synced = profile_steps(lambda: (g.replay(), torch.cuda.synchronize()), 2)
    assert any(c["call"].startswith("cudaDeviceSynchronize") for c in synced["host_calls"]), synced["host_calls"]
