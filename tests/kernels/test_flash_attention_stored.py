"""The stored attention backward (slimtune.kernels.flash_attention_stored_bwd) on CPU: the Triton kernels under the
interpreter (subprocess with TRITON_INTERPRET=1, fp16) against the fp64 reference, and how chunks are sized. Its
CUDA tests are the "stored" variant in test_flash_attention_gpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

_STORED_SCRIPT = r"""
import sys
import torch
from slimtune.kernels import flash_attention_stored_bwd as stored
from slimtune.kernels.flash_attention import flash_attention, KernelConfig
from slimtune.kernels.attention_reference import attention_reference
from _attention_checks import rel_error as rel

stored.KEY_TILE = int(sys.argv[1])
stored.WAVES = 1  # chunks of one "wave" of the interpreter's 8 SMs: several chunks per case
stored.POISON_BUFFERS = True  # a value the dK/dV products read but the dQ kernel never wrote turns into NaN
ran = []
run = stored.backward_stored
stored.backward_stored = lambda *a, **kw: ran.append(1) or run(*a, **kw)

torch.manual_seed(0)
cases = [  # (batch, q heads, kv heads, seq, documents, key padding, dQ rows per block); the interpreter's 8 "SMs"
    (1, 2, 1, 40, None, None, 16),  # give chunks of 64-256 rows: most cases run several chunks
    (1, 4, 1, 150, None, None, 16),
    (2, 4, 2, 131, [[0] * 30 + [1] + [2] * 70 + [3] * 30, [0] * 131], None, 16),
    (2, 2, 1, 129, None, [[0] * 5 + [1] * 124, [1] * 100 + [0] * 29], 16),
    (1, 4, 1, 1, None, None, 16),
    (1, 2, 1, 300, [[0] * 100 + [1] * 3 + [2] * 150 + [3] * 47], None, 64),  # 64-row blocks: unmasked row tiles
    (1, 4, 2, 200, None, [[0] * 3 + [1] * 197], 64),
]
for b, hq, hk, t, docs, pad, bm in cases:
    q = torch.randn(b, hq, t, 16, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(b, hk, t, 16, dtype=torch.float16, requires_grad=True) for _ in range(2))
    docs = torch.tensor(docs) if docs else None
    pad = torch.tensor(pad, dtype=torch.bool) if pad else None
    cfg = {"fwd": KernelConfig(32, 16, 4, 1), "dq": KernelConfig(bm, 16, 4, 1, False, 0, 5)}
    out = flash_attention(q, k, v, scale=0.3, doc_ids=docs, key_padding_mask=pad, _configs=cfg)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attention_reference(*ref_in, scale=0.3, doc_ids=docs, key_padding_mask=pad)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    errs = [rel(g, r) for g, r in zip(grads, ref_grads)]
    assert all(torch.isfinite(x).all() for x in grads), (t, docs, pad)
    assert max(errs) < 5e-3, (t, errs)
assert len(ran) == len(cases), ran
print("INTERPRETER_OK")
"""


@pytest.mark.parametrize("key_tile", [16, 128])
def test_stored_backward_under_interpreter(key_tile):
    """dQ storing P and dS per chunk of rows, dK/dV as products over them (flash_attention_stored_bwd): equal to the
    fp64 reference with several chunks, packed documents, padding and GQA; with key tiles smaller than a row tile
    (masked row tiles) and the default 128 (whole row tiles read, relying on the dQ kernel's zero fill)."""
    pytest.importorskip("triton")
    path = os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", _STORED_SCRIPT, str(key_tile)], env=env, capture_output=True,
                          text=True, check=False, timeout=600)
    assert proc.returncode == 0 and "INTERPRETER_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_stored_backward_chunk_rows(monkeypatch):
    """Chunks fill whole waves of dQ programs (one program per SM), within the buffer budget; one chunk when the
    sequence fits; None (the fused kernels) when not even one wave fits."""
    from slimtune.kernels import flash_attention_stored_bwd as stored

    # default budget (4 × Q): E2B's 8 heads on 132 SMs take 16 blocks of 64 rows = 128 programs per chunk, not 17
    # (136 programs: a second, almost empty wave; 2.5× slower on the H200)
    assert stored.chunk_rows(1, 8, 8192, 64, 132) == 1024
    assert stored.chunk_rows(1, 8, 2048, 64, 132) == 2048  # fits whole: one chunk
    assert stored.chunk_rows(1, 8, 100, 64, 132) == 128
    monkeypatch.setattr(stored, "BUFFER_BUDGET_BYTES", 5 << 30)
    assert stored.chunk_rows(1, 8, 8192, 64, 132) == 4224  # 4 waves: 66 blocks × 8 heads = 528 = 4 × 132
    assert stored.chunk_rows(1, 32, 8192, 64, 132) == 1024  # 31B's 32 heads: 4 waves of 4 blocks
    monkeypatch.setattr(stored, "BUFFER_BUDGET_BYTES", 64 << 30)
    monkeypatch.setattr(stored, "WAVES", 8)
    rows = stored.chunk_rows(1, 8, 32768, 64, 132)  # 8 waves would be 8,448 rows: keys × 8 × rows passes 2^31
    assert rows is not None and 32768 * 8 * rows < 2**31
    monkeypatch.setattr(stored, "WAVES", 4)
    monkeypatch.setattr(stored, "BUFFER_BUDGET_BYTES", 64 << 20)
    assert stored.chunk_rows(1, 8, 32768, 64, 132) is None  # 64 rows fit, a wave needs 1024
    monkeypatch.setattr(stored, "BUFFER_BUDGET_BYTES", 1 << 30)
    rows = stored.chunk_rows(1, 8, 32768, 64, 132)
    assert rows == 1024 and 4 * 8 * 32768 * rows <= 1 << 30
