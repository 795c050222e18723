"""benchmarks/gpu/unpacked_run.py (issue 6's unpacked default path, eager vs buckets vs packed) runs end to end on a
tiny checkpoint on CPU and reports what the GPU run will."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_unpacked_run_script_trains_each_variant_and_reports(tiny_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/unpacked_run.py"), "--model",
                           str(tiny_dir("e2b", text_only=True)), "--device", "cpu", "--seq", "160", "--steps", "4",
                           "--lora16", "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"eager", "buckets", "auto", "packed"}
    for r in records.values():
        assert "error" not in r, r.get("error")
        assert r["steps"] == 4 and r["tok_s"] > 0 and r["tokens_per_step"] > 0
    # the buckets run asked for graphs (on CPU its steps run eagerly, and the log says so)
    assert any("no CUDA device" in line for line in records["buckets"]["graphs_log"]), records["buckets"]
    # packing fills each row with several samples
    assert records["packed"]["tokens_per_step"] > records["eager"]["tokens_per_step"]
