"""The estimate against every peak measured on the H200 (benchmarks/results_gpu*.jsonl): within 10% each.

The measured records are read from the files, so a new measurement (benchmarks/gpu/planner_calibration.sh) is
checked as soon as its JSON lines are committed.
"""

import json
from pathlib import Path

import pytest

from slimtune.memory.estimate import estimate_training_memory

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.10


def measured_records() -> list[dict]:
    """slimtune bench records with a measured peak and the options they ran with."""
    out = []
    for path in sorted((ROOT / "benchmarks").glob("results_gpu*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            # "invalid": a run whose settings did not take effect (the record says which and where it was redone)
            if rec.get("probe") == "slimtune" and "peak_gib" in rec and "options" in rec and "invalid" not in rec:
                out.append({**rec, "source": f"{path.name}:{n}"})
    return out


RECORDS = measured_records()


def _stored_backward_budget(rec: dict) -> int | None:
    """Records measured before session 13 (results_gpu < 56) ran the fused attention backward: no chunk buffers."""
    number = int(rec["source"].split("_")[1].removeprefix("gpu"))
    return 0 if number < 56 else None


def predict(rec: dict, monkeypatch) -> float:
    from slimtune.kernels import flash_attention_stored_bwd

    monkeypatch.setattr(flash_attention_stored_bwd, "BUFFER_BUDGET_BYTES", _stored_backward_budget(rec))
    opts = rec["options"]
    return estimate_training_memory(
        rec["variant"], seq_len=rec["seq"], load_in_4bit=rec["mode"] == "qlora",
        gradient_checkpointing=opts.get("gradient_checkpointing", True), offload_ple=opts.get("offload_ple", True),
        attention=opts.get("attention", "sdpa"), loss_chunk_size=opts.get("loss_chunk_size", 0),
        activation_offload=opts.get("activation_offload", False), mlp_chunk_size=opts.get("mlp_chunk_size", 0),
        optimizer=opts.get("optimizer", "adamw"), multimodal=rec.get("multimodal", False),
        cuda_graphs=opts.get("cuda_graphs", False), recompute_norms=opts.get("recompute_norms", False),
        finetune_experts=opts.get("finetune_experts", False),
        compile_layers=opts.get("compile_layers", False), checkpoint_layers=opts.get("checkpoint_layers"))["total_gib"]


# Measured configurations the estimate is known to miss by more than the tolerance, with what was seen. They stay
# listed (strict xfail: fixing the model makes these fail until removed) instead of being dropped silently.
KNOWN_MISSES = {
    # activation offload + tiled MLP + adamw8bit together at 8K: measured 3.629, estimated 3.191 (-12%). Each
    # technique alone is within 4% (4.156 vs 4.31; 4.175 vs 4.099): their savings do not add up on the GPU, and
    # which term then sets the peak is not understood yet.
    ("results_gpu6_session2.jsonl", "e2b", "qlora", 8192, True, 2048, "adamw8bit", False),
    # Measured before RMSNormFunction worked in row chunks: its backward's fp32 temporaries of the whole (T, q_dim)
    # input were unplanned (at 67K: 13.619 measured vs 7.99 planned then). Chunked since (bounded temporaries, a
    # planner term) and re-measured at 66,560 tokens (results_gpu13: 9.905, within 5 % of today's estimate).
    ("results_gpu12_session4_call2_ours.jsonl", "e2b", "qlora", 67584, True, 1024, "adamw8bit", False),
    # Same bug, 8K with graphs, compiled layers, tiled MLP 2048 and recomputed norms: 4.891 measured then; the same
    # configuration re-measured after the fix (results_gpu14_session5_call1, 4.179) is within 3 % of the estimate.
    ("results_gpu12_session4_call2_ours.jsonl", "e2b", "qlora", 8192, False, 2048, "adamw", True),
}


def _key(rec):
    o = rec["options"]
    return (rec["source"].split(":")[0], rec["variant"], rec["mode"], rec["seq"], o.get("activation_offload", False),
            o.get("mlp_chunk_size", 0), o.get("optimizer", "adamw"), o.get("compile_layers", False))


def test_there_are_measurements_to_check():
    assert len(RECORDS) >= 4, "benchmarks/results_gpu*.jsonl should hold the H200 measurements"


@pytest.mark.parametrize("rec", [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason="known miss"))
                                 if _key(r) in KNOWN_MISSES else r for r in RECORDS],
                         ids=[f"{r['source']}-{r['variant']}-{r['mode']}-{r['seq']}-"
                              f"{r['options'].get('attention')}" for r in RECORDS])
def test_estimate_within_ten_percent_of_the_measured_peak(rec, monkeypatch):
    predicted = predict(rec, monkeypatch)
    error = predicted / rec["peak_gib"] - 1
    assert abs(error) <= TOLERANCE, (f"{rec['source']}: predicted {predicted:.3f} GiB, measured "
                                     f"{rec['peak_gib']:.3f} GiB ({error:+.1%})")
