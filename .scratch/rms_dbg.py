import warnings, torch
warnings.simplefilter("always")
from slimtune.kernels import rms_norm as R
for shape, dt in [((2048, 1536), torch.bfloat16), ((64, 256), torch.float32), ((1, 1), torch.bfloat16)]:
    x = torch.randn(shape, device="cuda", dtype=dt).requires_grad_()
    w = (torch.randn(shape[-1], device="cuda") * .3 + 1).to(dt)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        y = R.rms_norm(x, w, 1e-6); dy = torch.randn_like(y)
        gx, = torch.autograd.grad(y, x, dy)
    print(shape, dt, [str(m.message)[:400] for m in ws])
    r = R._rstd(x.detach().reshape(-1, shape[-1]), 1e-6)
    ref = R.rms_norm_backward_reference(dy, x.detach(), w, r)
    print("err", float((gx.double()-ref.double()).norm()/ref.double().norm()), gx.flatten()[:4], ref.flatten()[:4])
