"""CPU smoke test of ``bench_flash_attention.sweep`` (no GPU): the whole sweep logic under the Triton interpreter.

Tiny fp16 shapes (head_dim 16), timing by wall clock, a pretend compile failure for the last candidate and, with
``SMOKE_WRONG=1``, a pretend wrong result for one candidate (it must be reported as WRONG and not picked);
``SMOKE_BUDGET=0`` checks that an exhausted budget skips everything. Usage::

    SMOKE_WRONG=1 python benchmarks/kernels/smoke_sweep_cpu.py .
"""
import importlib.util
import os
import sys
import time
os.environ["TRITON_INTERPRET"] = "1"
import torch
root = sys.argv[1]
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location("bench", f"{root}/benchmarks/kernels/bench_flash_attention.py")
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
C = bench.KernelConfig
bench.DEVICE, bench.DTYPE, bench.CHECK_T = "cpu", torch.float16, 37
bench.SWEEP = {16: {"fwd": [C(32, 16, 4, 1)], "dq": [C(16, 16, 4, 1), C(16, 16, 4, 1, False, 0, 1)],
                    "dkdv": [C(16, 16, 4, 1, True), C(16, 16, 4, 1, True, 2, 1), C(16, 32, 4, 1, True, 0, 1)]}}
bench.SWEEP_WINDOW = {16: 5}
bench.SHAPES = [("tiny", 16, 5, [40])]
bench.compile_in_parallel = lambda jobs, workers: {jobs[-1]: "RuntimeError: pretend compile failure"}
real_check = bench.check_candidate
def check(kind, cfg, d, window):
    err = real_check(kind, cfg, d, window)
    return float("nan") if cfg == C(16, 16, 4, 1, True, 2, 1) and os.environ.get("SMOKE_WRONG") else err
bench.check_candidate = check
def fake_time(fn, long):
    t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e3
bench._time = fake_time
for name in ("synchronize", "reset_peak_memory_stats"):
    setattr(torch.cuda, name, lambda *a, **k: None)
torch.cuda.memory_allocated = torch.cuda.max_memory_allocated = lambda *a, **k: 0
chosen, rows = bench.sweep(40, 1, budget_s=float(os.environ.get("SMOKE_BUDGET", 1e9)), t0=time.monotonic(), long_seq=0)
print("CHOSEN", chosen)
