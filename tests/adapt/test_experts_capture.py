"""Which MoE blocks a CUDA graph can capture (slimtune.adapt.experts.graph_capture_problems).

A captured step may not read anything back to the host. slimtune's grouped experts path keeps its offsets on the
GPU; the per-expert loop and transformers' own block read token counts on the host, and torch's grouped GEMM does
too outside Hopper. The checks run on CPU with a pretend CUDA device; the captured 26B-A4B step itself is a GPU
test (tests/train/test_auto_graphs.py).
"""

import pytest
import torch

import slimtune
from slimtune.adapt.experts import graph_capture_problems
from slimtune.adapt.experts_grouped import experts_impl
from slimtune.train.cuda_graph import graph_step_problems

CUDA = torch.device("cuda")


@pytest.fixture
def gpu_arch(monkeypatch):
    """gpu_arch(major): pretend every CUDA device has compute capability (major, 0)."""
    def set_arch(major: int):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (major, 0))
    return set_arch


def _moe(tiny_dir, *, expert_lora: bool, four_bit: bool = False):
    model, _ = slimtune.load_model(tiny_dir("26b-a4b", text_only=True), dtype=torch.bfloat16, device="cpu",
                                   load_in_4bit=four_bit)
    if expert_lora:
        slimtune.add_lora(model, r=4, alpha=8, finetune_experts=True)
    return model


def test_slimtunes_grouped_blocks_capture_on_hopper_only(tiny_dir, gpu_arch):
    model = _moe(tiny_dir, expert_lora=True)
    gpu_arch(9)
    assert graph_capture_problems(model, torch.bfloat16, CUDA) == []
    gpu_arch(8)
    problems = graph_capture_problems(model, torch.bfloat16, CUDA)
    assert len(problems) == 1 and "Hopper" in problems[0] and "MoE experts (" in problems[0]
    gpu_arch(9)
    with experts_impl("loop"):
        assert "per-expert loop" in graph_capture_problems(model, torch.bfloat16, CUDA)[0]
    assert "per-expert loop" in graph_capture_problems(model, torch.float16, CUDA)[0]  # grouped GEMM is bf16-only


def test_nf4_experts_capture_and_transformers_own_block_does_not(tiny_dir, gpu_arch):
    gpu_arch(9)
    assert graph_capture_problems(_moe(tiny_dir, expert_lora=False, four_bit=True), torch.bfloat16, CUDA) == []
    plain = _moe(tiny_dir, expert_lora=False)
    problems = graph_capture_problems(plain, torch.bfloat16, CUDA)
    assert len(problems) == 1 and "transformers' experts block" in problems[0] and "--finetune-experts" in problems[0]


def test_the_step_check_names_moe_only_where_it_would_capture(tiny_dir, gpu_arch):
    plain = _moe(tiny_dir, expert_lora=False)
    # on CPU without capture the step runs eagerly: the host-side routing is fine there
    assert not any("MoE" in p for p in graph_step_problems(plain, dtype=torch.bfloat16, capture=False))
    gpu_arch(9)
    assert any("MoE" in p for p in graph_step_problems(plain, dtype=torch.bfloat16, capture=False,
                                                       device=CUDA))
    adapted = _moe(tiny_dir, expert_lora=True)
    assert not graph_step_problems(adapted, dtype=torch.bfloat16, capture=False, device=CUDA)
