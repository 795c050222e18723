"""benchmarks/kernels/bench_flash_attention.py's sweep logic end to end on CPU (Triton interpreter, tiny shapes):
a wrong candidate is reported and never picked, a compile failure is reported, and the fwd+bwd rows run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_sweep_reports_wrong_and_failed_candidates_and_times_fwd_bwd():
    pytest.importorskip("triton")
    env = dict(os.environ, SMOKE_WRONG="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/kernels/smoke_sweep_cpu.py"), str(REPO)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    status = {(r.get("kind"), tuple(r["config"])): r["status"] for r in rows if r["event"] == "candidate"}
    assert status[("dkdv", (16, 16, 4, 1, True, 2, 1, 0))] == "WRONG"
    assert status[("dkdv", (16, 32, 4, 1, True, 0, 1, 0))] == "compile_failed"
    fwd_bwd = [r for r in rows if r["event"] == "fwd_bwd"]
    assert [r["status"] for r in fwd_bwd] == ["ok", "ok"], fwd_bwd
    best = next(r for r in rows if r["event"] == "best_per_kernel")["best"]["16"]
    assert best["dkdv"]["config"] != [16, 16, 4, 1, True, 2, 1, 0]
