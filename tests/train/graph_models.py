"""What the CUDA-graph step tests share: the tiny model they train (E2B text, PLE rows on the host, LoRA with
non-zero B so the adapters matter from the first step, checkpointed, in training mode), the standard eager
training they compare against, and the graph-step runner they compare."""

import torch

import slimtune
from slimtune.adapt.inject import trainable_parameters
from slimtune.adapt.lora import lora_modules
from slimtune.memory.host_embedding import offload_per_layer_embeddings
from slimtune.train.cuda_graph import GraphedTrainStep
from slimtune.train.run import enable_checkpointing
from slimtune.train.step import accumulate_gradients, clip_and_step


def tiny_lora_model(tiny_dir, device, dtype):
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), dtype=dtype, device=device,
                                   offload_embeddings=False)
    offload_per_layer_embeddings(model)  # the graph steps bind these rows as static inputs
    slimtune.add_lora(model, r=4, alpha=8, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            w = layer.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    enable_checkpointing(model)
    model.train()
    return model


def sgd(params):
    # SGD on CPU: Adam would turn rounding noise on near-zero gradients into full-size steps
    return torch.optim.SGD(params, lr=0.05)


def train_standard(model, windows, device, dtype, make_opt=sgd) -> list[float]:
    """The standard eager step over `windows` (lists of micro-batches; a batch alone is a window of one), with the
    graph tests' schedule and clipping; returns the losses."""
    params = trainable_parameters(model)
    opt = make_opt(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    losses = []
    for window in windows:
        loss, _ = accumulate_gradients(model, window if isinstance(window, list) else [window], device=device,
                                       dtype=dtype)
        clip_and_step(params, opt, sched, max_grad_norm=1.0)
        losses.append(loss)
    return losses


def run_graphed(model, steps, device, dtype, make_opt=sgd, **step_kw) -> tuple[list[float], GraphedTrainStep]:
    """A GraphedTrainStep (`step_kw`: its options) over `steps` (batches, or windows of micro-batches), with the
    standard runner's schedule and clipping; returns the losses and the step, still open (its graphs and optimizer
    can be inspected): the caller closes it."""
    params = trainable_parameters(model)
    opt = make_opt(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    first = steps[0] if isinstance(steps[0], dict) else steps[0][0]
    step = GraphedTrainStep(model, params, opt, first, device=device, dtype=dtype, max_grad_norm=1.0, **step_kw)
    losses = []
    for b in steps:
        loss, _, _ = step(b)
        sched.step()
        losses.append(float(loss))
    return losses, step
