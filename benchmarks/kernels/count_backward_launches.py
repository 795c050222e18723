"""Count the Triton launches and aten ops (allocations, sums, casts) of one attention backward (interpreter, CPU).

The aten counts include the interpreter's own argument copies (empty/set_/copy_); compare ``sum``/``to`` and the
launches. Usage::

    python benchmarks/kernels/count_backward_launches.py REPO_ROOT '{"dq": C(16, 16, 4, 1, False, 0, 1)}'
"""
import collections
import os
import sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from slimtune.kernels import flash_attention as fa
from slimtune.kernels.flash_attention import KernelConfig as C

launches = collections.Counter()
for mod in [m for m in (getattr(fa, "_k", None), getattr(fa, "_kb", None)) if m is not None]:
    for name in dir(mod):
        obj = getattr(mod, name)
        if name.startswith("_attn") or name.startswith("_sum"):
            class Wrap:
                def __init__(self, f, n): self.f, self.n = f, n
                def __getitem__(self, grid):
                    launches[self.n] += 1
                    return self.f[grid]
                def __getattr__(self, a): return getattr(self.f, a)
            setattr(mod, name, Wrap(obj, name))

class Ops(TorchDispatchMode):
    def __init__(self): super().__init__(); self.c = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.c[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

cfg = eval(sys.argv[2]) if len(sys.argv) > 2 else None
torch.manual_seed(0)
t, d = 128, 16
q = torch.randn(1, t, 8, d, dtype=torch.float16).transpose(1, 2).requires_grad_()
k, v = (torch.randn(1, t, 1, d, dtype=torch.float16).transpose(1, 2).requires_grad_() for _ in range(2))
out = fa.flash_attention(q, k, v, scale=1.0, window=32, _configs=cfg)
do = torch.randn_like(out)
launches.clear()
m = Ops()
inner = fa._backward
def traced(*a, **kw):
    with m:
        return inner(*a, **kw)
fa._backward = traced
torch.autograd.grad(out, (q, k, v), do)
print({"launches": dict(launches), "n_launches": sum(launches.values()), "aten": dict(m.c)})
