"""The 8-bit AdamW: bitsandbytes' optimizer, minus its device-wide sync after every parameter."""

import pytest
import torch

from slimtune.train.optimizer import make_optimizer

bnb = pytest.importorskip("bitsandbytes")
bnb_optimizer = pytest.importorskip("bitsandbytes.optim.optimizer")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 128), (16, 4096), (8, 8), (32, 256)]  # (8, 8) is under bitsandbytes' 4096-value 8-bit minimum
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _run(opt, params, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(params):
            # the third parameter sits out the second step: its state must neither move nor break the loop
            p.grad = None if (i == 2 and step == 1) else torch.randn(p.shape, generator=g).to(p.device)
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_steps_exactly_like_bitsandbytes_without_its_syncs(device, monkeypatch):
    syncs = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: syncs.append(t))
    ours_p, theirs_p = _params(device), _params(device)
    ours = make_optimizer(ours_p, name="adamw8bit", lr=1e-2, weight_decay=0.01)
    theirs = bnb.optim.AdamW8bit(theirs_p, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    _run(ours, ours_p)
    assert syncs == []
    _run(theirs, theirs_p)
    assert len(syncs) >= 11  # bitsandbytes: one per updated parameter (what made 26B-A4B steps host-bound)
    assert isinstance(ours, bnb.optim.AdamW8bit)
    for a, b in zip(ours_p, theirs_p, strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(ours.state[a][k], theirs.state[b][k]) for k in theirs.state[b]
                   if isinstance(theirs.state[b][k], torch.Tensor))
    assert ours.state[ours_p[0]]["state1"].dtype == torch.uint8


def test_a_bitsandbytes_state_dict_continues_the_same_run():
    first, second = _params("cpu"), _params("cpu")
    theirs = bnb.optim.AdamW8bit(first, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)
    _run(theirs, first, steps=2)
    with torch.no_grad():
        for a, b in zip(second, first, strict=True):
            a.copy_(b)
    ours = make_optimizer(second, name="adamw8bit", lr=1e-2)
    ours.load_state_dict(theirs.state_dict())  # a checkpoint written before this optimizer existed
    _run(theirs, first, steps=2, seed=5)
    _run(ours, second, steps=2, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
