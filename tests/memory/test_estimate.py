"""Each memory technique changes its own term of the estimate by the size of the tensors it removes.

Expected sizes are derived from the published geometry (config values, the LoRA parameter count the H200 bench
recorded), not from the estimate's own output.
"""

import json
from pathlib import Path

import pytest

from slimtune.memory.estimate import estimate_training_memory
from slimtune.memory.model_shape import read_model_shape
from slimtune.models.geometry import build_config

GIB = 2**30
E2B = build_config("e2b", tiny=False, text_only=True)
H, L = E2B.hidden_size, E2B.num_hidden_layers
# LoRA parameters of E2B at r=16 on q/k/v/o/gate/up/down, as the bench counted them on the GPU
RESULTS = (Path(__file__).resolve().parents[2] / "benchmarks/results_gpu1_ours.jsonl").read_text()
LORA_PARAMS = next(json.loads(line)["lora_params"] for line in RESULTS.splitlines() if '"lora_params"' in line)


def est(**kw):
    return estimate_training_memory("e2b", **{"seq_len": 8192, "load_in_4bit": True, **kw})


def test_adamw8bit_state_is_two_bytes_per_lora_parameter_instead_of_eight():
    full, small = est(), est(optimizer="adamw8bit")
    saved = (full["breakdown"]["lora_and_optimizer"] - small["breakdown"]["lora_and_optimizer"]) * GIB
    assert saved == pytest.approx(6 * LORA_PARAMS, rel=0.01)
    assert full["total_gib"] - small["total_gib"] == pytest.approx(6 * LORA_PARAMS / GIB, abs=0.002)


def test_activation_offload_keeps_only_the_layers_in_flight():
    on, off = est(activation_offload=True), est()
    assert off["breakdown"]["checkpointed_activations"] == pytest.approx(L * 8192 * H * 2 / GIB, abs=0.002)
    assert on["breakdown"]["checkpointed_activations"] == pytest.approx(2 * 8192 * H * 2 / GIB, abs=0.002)
    assert on["total_gib"] < off["total_gib"]


def test_tiled_mlp_shrinks_the_recompute_working_set_and_does_nothing_when_the_chunk_is_the_whole_sequence():
    from slimtune.kernels.flash_attention_stored_bwd import backward_bytes as stored_backward_bytes

    plain = est()["breakdown"]["layer_working_set"]
    tiled = est(mlp_chunk_size=1024)["breakdown"]["layer_working_set"]
    # E2B's widest MLP is double-wide on the KV-shared layers: 2 × intermediate_size. Tiling shrinks its 4 saved
    # N×I tensors to one chunk, and its 3 backward transients too, but then the attention backward's 3 q-sized
    # gradients (a full layer: 8 heads × 512) are the larger transient, so that is what remains.
    widest, n, chunk = 2 * E2B.intermediate_size, 8192, 1024
    q_dim = max(lay.q_dim for lay in read_model_shape("e2b").layers)
    saved = 4 * (n - chunk) * widest * 2
    # plus, during a full layer's backward, the stored attention backward's chunk buffers and fp32 dK/dV
    attention = 3 * n * q_dim * 2 + stored_backward_bytes(1, q_dim // 512, 1, n, 512)
    transient = 3 * n * widest * 2 - max(3 * chunk * widest * 2, attention)
    assert plain - tiled == pytest.approx((saved + transient) / GIB, rel=0.05)
    assert est(mlp_chunk_size=8192)["total_gib"] == est()["total_gib"]


def test_micro_batch_scales_activations():
    one, two = est(), est(batch_size=2)
    for term in ("checkpointed_activations", "per_layer_inputs"):
        assert two["breakdown"][term] == pytest.approx(2 * one["breakdown"][term], rel=0.01)
    assert two["breakdown"]["weights"] == one["breakdown"]["weights"]


def test_loss_chunk_is_one_chunk_of_fp32_logits_and_its_16bit_gradient():
    vocab = E2B.vocab_size
    at_1k = estimate_training_memory("e2b", seq_len=1024, load_in_4bit=True, loss_chunk_size=256)
    assert at_1k["phase"] == "loss"
    assert at_1k["breakdown"]["loss_chunk"] == pytest.approx(256 * vocab * 6 / GIB, abs=0.002)
    assert at_1k["total_gib"] < estimate_training_memory("e2b", seq_len=1024, load_in_4bit=True)["total_gib"]


def test_4bit_weights_and_the_ple_table_on_the_gpu():
    lora16, qlora = est(load_in_4bit=False), est()
    # the H200 bench measured the weights of both modes on the GPU (weights_gib, before the first step)
    measured = {json.loads(line)["mode"]: json.loads(line)["weights_gib"] for line in RESULTS.splitlines()
                if '"weights_gib"' in line and '"seq": 2048' in line}
    predicted = lora16["breakdown"]["weights"] - qlora["breakdown"]["weights"]
    assert predicted == pytest.approx(measured["lora16"] - measured["qlora"], rel=0.05)
    on_gpu = est(offload_ple=False)
    table = E2B.vocab_size_per_layer_input * L * E2B.hidden_size_per_layer_input
    assert on_gpu["breakdown"]["ple_table"] == pytest.approx(table * 2 / GIB, abs=0.002)


def test_without_checkpointing_every_layer_keeps_its_activations():
    assert est(gradient_checkpointing=False)["total_gib"] > 3 * est()["total_gib"]


def test_sdpa_keeps_a_dense_sliding_window_mask():
    at_32k = estimate_training_memory("e2b", seq_len=32768, attention="sdpa")
    assert at_32k["breakdown"]["attention_mask"] == pytest.approx(32768**2 / GIB, abs=0.002)
    assert estimate_training_memory("e2b", seq_len=32768)["breakdown"]["attention_mask"] == 0


@pytest.mark.parametrize("bad", [dict(seq_len=0), dict(seq_len=8192, batch_size=0),
                                 dict(seq_len=8192, optimizer="sgd"), dict(seq_len=8192, attention="flash"),
                                 dict(seq_len=8192, mlp_chunk_size=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError, match="memory estimate"):
        estimate_training_memory("e2b", **bad)


def test_unknown_model_says_what_it_accepts(tmp_path):
    with pytest.raises(ValueError, match="local model folder"):
        estimate_training_memory(str(tmp_path / "nope"), seq_len=128)



def test_compiled_layers_shrink_only_the_cuda_graph_pool():
    from slimtune.memory.estimate import CUDA_GRAPH_FIXED_BYTES

    graphs, compiled = est(cuda_graphs=True), est(cuda_graphs=True, compile_layers=True)
    copies = graphs["breakdown"]["cuda_graph_pool"] - compiled["breakdown"]["cuda_graph_pool"]
    assert copies * GIB == pytest.approx(15 * 8192 * H * 2, rel=0.01)
    assert compiled["breakdown"]["cuda_graph_pool"] * GIB == pytest.approx(CUDA_GRAPH_FIXED_BYTES, rel=0.02)
    assert graphs["total_gib"] - compiled["total_gib"] == pytest.approx(copies, abs=0.002)
    assert est(compile_layers=True) == est()  # without graphs compiling changes nothing in the estimate
