"""benchmarks/gpu/scaleout.py (issue 9's 1-vs-N-GPU measurement) runs end to end on a tiny geometry on CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scaleout_script_trains_and_reports(tmp_path):
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/scaleout.py"), "--geometry", "e2b", "--tiny",
                           "--device", "cpu", "--nproc", "1", "--seq", "64", "--steps", "2", "--work",
                           str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in rec, rec.get("error")
    assert rec["nproc"] == 1 and rec["steps"] == 2 and rec["tok_s"] > 0 and rec["speedup_vs_1"] == 1.0
    # the planner's prediction the trainer printed is recorded beside the measured peak (none on CPU)
    assert rec["predicted_for"] == "1 GPU" and rec["predicted_gib"] > 0


def test_scaleout_reads_the_per_gpu_prediction_line():
    sys.path.insert(0, str(ROOT / "benchmarks/gpu"))
    from scaleout import printed_prediction

    out = "data: …\nmemory: predicted peak per GPU (FSDP2, 2 GPUs): 22.40 GiB (8192 tokens × batch 1; …)\n"
    assert printed_prediction(out) == {"predicted_gib": 22.4, "predicted_for": "FSDP2, 2 GPUs"}
    assert printed_prediction("memory: predicted peak GPU memory 7.71 GiB (8192 tokens")["predicted_gib"] == 7.71
    assert printed_prediction("no prediction here") == {}
