"""Compile slimtune's attention kernels for Hopper (sm90) on a CPU-only machine and report their resources.

Needs only Triton (the GPU box runs 3.6.0: use the same wheel), not torch or a GPU. For each kernel variant it runs
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with the argument types and divisibility the launchers pass at
Gemma 4's shapes (bf16, head_dim 512/256, no key padding, fp32 split partials), then reads the cubin with the
``cuobjdump`` shipped in the Triton wheel: registers, stack (spill) bytes, shared memory, the HGMMA instruction shapes
and the LDL/STL (local-memory spill) instruction counts. One JSON line per variant.

Usage::

    /tmp/venv-tr36/bin/python benchmarks/kernels/compile_attention_sm90.py [--only dkdv] [--sass-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[2]


def _load_kernels():
    """Import the two Triton modules without running slimtune's package imports (no torch here)."""
    for name, path in (("slimtune", ROOT / "slimtune"), ("slimtune.kernels", ROOT / "slimtune" / "kernels")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
    mods = []
    for name in ("_flash_attention_triton", "_flash_attention_bwd_triton", "_flash_attention_stored_bwd_triton"):
        path = ROOT / "slimtune" / "kernels" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"slimtune.kernels.{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


_PTR = {"LSE": "*fp32", "DELTA": "*fp32", "SCR_ALPHA": "*fp32", "KVALID": "*fp32", "DSTART": "*i32", "DEND": "*i32",
        "DK": "*fp32", "DV": "*fp32", "OUT": "*fp32", "PARTS": "*fp32", "ACC": "*fp32"}
_FLOATS = {"qk_scale", "sm_scale"}
_SIZES = {"T", "H", "HK", "G", "HEADS_PER_SPLIT", "W", "N", "SPLIT", "ROW0", "RR", "RRP", "KR", "pds_half",
          "acc_half"}


def compile_one(fn, constexprs: dict, dtype: str = "bf16", num_warps: int = 8, num_stages: int = 1):
    names = fn.arg_names
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in _SIZES or n in _FLOATS:
            sig[n] = "fp32" if n in _FLOATS else "i32"  # sizes: do_not_specialize in the kernels
        elif n.isupper():
            sig[n] = _PTR.get(n, f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n.startswith("stride_"):
            sig[n] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]  # head_dim multiples at Gemma 4's shapes
        else:
            raise ValueError(f"unknown argument kind: {n}")
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps,
                                                                         "num_stages": num_stages})


def resources(kernel, sass_path: Path | None = None) -> dict:
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    if sass_path is not None:
        sass_path.write_text(sass)
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    shapes = collections.Counter(re.findall(r"HGMMA\.(\d+x\d+x\d+)", sass))
    return {"regs": int(reg.group(1)) if reg else None, "stack_bytes": int(stack.group(1)) if stack else None,
            "shared_kib": kernel.metadata.shared / 1024, "hgmma": dict(shapes),
            "ldl": len(re.findall(r"\bLDL\b", sass)), "stl": len(re.findall(r"\bSTL\b", sass)),
            "ttgir_async_copies": kernel.asm["ttgir"].count("async_copy_global_to_local")}


def variants(fwd, bwd, stored):
    """(name, kernel, constexprs, num_warps, num_stages) of the kernels worth checking at Gemma 4's shapes."""
    out = []
    for d, bm, bn, st, var in ((512, 64, 32, 1, 0), (512, 64, 32, 1, 2), (256, 64, 64, 2, 0), (256, 64, 64, 2, 2)):
        out.append((f"dkdv fused hd{d} ({bm},{bn},8,{st},T,2,v{var})", bwd._attn_bwd_dkdv_kernel,
                    dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, TRANSPOSED=True, HAS_KEY_MASK=False, SCRATCH=2,
                         QT_C=8 * d if var else 0, DOT_C=8 * d if var else 0), 8, st))
    for d, bm, bn, st in ((512, 64, 64, 1), (512, 64, 32, 1), (512, 32, 64, 1), (512, 32, 64, 2),
                          (256, 64, 64, 2), (256, 128, 64, 1), (256, 64, 128, 1)):
        for want_dk in (False, True):
            out.append((f"{'dk' if want_dk else 'dv'} split hd{d} ({bm},{bn},8,{st},T,2,v1)",
                        bwd._attn_bwd_dk_or_dv_kernel,
                        dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, WANT_DK=want_dk, HAS_KEY_MASK=False, SCRATCH=2,
                             STRIDE_QT=8 * d, STRIDE_DOT=d), 8,
                        st))
    for d, bm, bn, st, sc, var in ((512, 64, 32, 1, 2, 0), (512, 64, 32, 1, 2, 1), (512, 64, 64, 1, 2, 3),
                                   (512, 64, 32, 1, 2, 3), (256, 128, 32, 2, 0, 0), (256, 128, 32, 2, 0, 1),
                                   (256, 128, 64, 1, 0, 3)):
        out.append((f"dq hd{d} ({bm},{bn},8,{st},-,{sc},v{var})", fwd._attn_bwd_dq_kernel,
                    dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, HAS_KEY_MASK=False, SCRATCH=sc, FUSE_DELTA=bool(var & 1),
                         V_FIRST=bool(var & 2), KT_C=d if var & 2 else 0, VT_C=d if var & 2 else 0,
                         STORE_PDS=False, ZA=128), 8, st))
    out.append(("sum_splits", bwd._sum_splits_kernel, dict(BLOCK=1024), 4, 1))
    # the stored backward: dQ also writing P and dS, then dK/dV as products over them
    for var in (0, 1):
        out.append((f"dq+store hd512 (64,32,8,1,-,2,v{var | 4})", fwd._attn_bwd_dq_kernel,
                    dict(HEAD_DIM=512, BLOCK_M=64, BLOCK_N=32, HAS_KEY_MASK=False, SCRATCH=2, FUSE_DELTA=bool(var),
                         V_FIRST=False, KT_C=0, VT_C=0, STORE_PDS=True, ZA=128), 8, 1))
    for bk, bd, bq, warps, st in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                                  (128, 128, 32, 8, 4)):
        out.append((f"dkdv from P/dS hd512 ({bk},{bd},{bq},{warps},{st})", stored._dkdv_from_pds_kernel,
                    dict(HEAD_DIM=512, BLOCK_K=bk, BLOCK_D=bd, BLOCK_Q=bq), warps, st))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="substring filter on the variant names")
    ap.add_argument("--sass-dir", type=Path, help="also write each variant's SASS here")
    args = ap.parse_args()
    fwd, bwd, stored = _load_kernels()
    for name, fn, consts, warps, stages in variants(fwd, bwd, stored):
        if args.only not in name:
            continue
        row = {"variant": name, "triton": triton.__version__}
        try:
            k = compile_one(fn, consts, num_warps=warps, num_stages=stages)
            sass = args.sass_dir / (re.sub(r"[^A-Za-z0-9]+", "_", name) + ".sass") if args.sass_dir else None
            row.update(resources(k, sass))
        except Exception as e:  # noqa: BLE001 - report a variant that does not compile (e.g. too much shared memory)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
