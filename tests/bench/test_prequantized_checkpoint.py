"""benchmarks/gpu/prequantized_checkpoint.py: one 4-bit checkpoint that slimtune and transformers' bitsandbytes
loading (what Unsloth uses) both read, with the same NF4 bytes (issue 9's side-by-side 31B/26B runs)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtune.adapt.quantize import dequantize_nf4_weight, is_nf4_linear

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("preq") / "g31b"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/prequantized_checkpoint.py"), "--geometry",
                           "31b", "--tiny", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _nf4_weights(model):
    return {n: dequantize_nf4_weight(m) for n, m in model.named_modules() if is_nf4_linear(m)}


def test_transformers_and_slimtune_read_the_same_nf4_weights(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import slimtune
    from slimtune.bench.random_model import build_random_model

    built = _nf4_weights(build_random_model("31b", mode="qlora", device="cpu", tiny=True, offload_ple=False))
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    ours, _ = slimtune.load_model(checkpoint, load_in_4bit=True, device="cpu", dtype="bfloat16")
    from_hf, from_ours = _nf4_weights(hf), _nf4_weights(ours)
    assert len(built) > 0 and set(from_hf) == set(built)
    for name, w in built.items():
        assert torch.equal(from_hf[name], w), name
        assert torch.equal(from_ours[name], w), name
    ids = AutoTokenizer.from_pretrained(checkpoint)("The capital of France is Paris.")["input_ids"]
    assert ids and max(ids) < hf.config.vocab_size  # the folder's tokenizer fits the model
    assert not checkpoint.with_name(checkpoint.name + ".tmp").exists()


def test_moe_checkpoint_names_its_16_bit_router_so_transformers_loads_and_runs_it(tmp_path):
    """26B-A4B keeps its router in 16 bits: unnamed, transformers expects 4-bit bytes there and fails in forward."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "g26b"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/prequantized_checkpoint.py"), "--geometry",
                           "26b-a4b", "--tiny", "--device", "cpu", "--out", str(out), "--no-tokenizer"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    routers = [m for n, m in hf.named_modules() if n.endswith("router.proj")]
    assert routers and all(type(m) is torch.nn.Linear for m in routers)
    ids = torch.randint(3, hf.config.vocab_size, (1, 12))
    assert torch.isfinite(hf(input_ids=ids, labels=ids).loss)
