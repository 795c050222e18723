"""Data-parallel training under torchrun: process group set-up, DDP / FSDP2 wrapping and rank-0-only output.

Processes are started by torchrun (`torchrun --nproc-per-node N -m slimtune train …`, or `slimtune train
--nproc N`, which re-executes itself through torch.distributed.run); nothing here launches processes.

The loss is computed INSIDE the wrapped module's forward (`_LossModule`): slimtune's loss calls the decoder body
and the tied lm_head directly, and both DDP (which arms its gradient all-reduce in forward) and FSDP2 (which
all-gathers the root's parameters, including the tied embedding, in its forward hook) only work when their
forward is the one that runs.

Gradient sync happens once per optimizer window: DDP's `no_sync` and FSDP2's `set_requires_gradient_sync(False)`
on every micro-batch but the last. Both then AVERAGE over ranks; step.py multiplies each rank's loss by the world
size and divides by the all-reduced target-token count, so the result is the gradient of
sum_CE(all ranks, all micro-batches) / N_global exactly.

Captured steps (CUDA graphs) under data parallelism do not use the DDP wrapper: its reducer runs from Python
hooks a graph cannot replay. The captured step SUMS the gradients over ranks itself with one all-reduce of a flat
buffer inside the graph (`slimtune.train.rank_sum`), each rank's loss scaled by 1/N_global: the same gradient, and
the step replays as on one GPU. Why: eager DDP steps ran E4B QLoRA 8K on two H200s at 1.34x one graphed GPU,
captured ones at 1.99x (BENCHMARKS.md, sessions 12 and 13).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from slimtune.adapt.adapter_io import adapter_state_dict
from slimtune.errors import ConfigError
from slimtune.train.loss import loss_sum
from slimtune.train.rank_sum import RankSum


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes and whether it created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; start the run with "
                          "torchrun (or slimtune train --nproc N).") from exc


def init_distributed(device: str | None) -> tuple[DistInfo, str | None]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (info, the device this rank must use).

    nccl with device cuda:LOCAL_RANK on CUDA, gloo on CPU. A group that already exists (set up by the caller)
    is used as is and left for the caller to destroy.

    Raises:
        ConfigError: a device index was given (each process uses cuda:LOCAL_RANK), or torchrun's variables
            are missing.
    """
    if launched_world_size() <= 1:
        return DistInfo(), device
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} are not; start multi-process runs with "
                          "torchrun --nproc-per-node N -m slimtune train … (or slimtune train --nproc N).")
    if device is not None and ":" in device:
        raise ConfigError(f"device={device!r}: under torchrun each process uses cuda:LOCAL_RANK; give "
                          "device: cuda (or leave it unset) and choose GPUs with CUDA_VISIBLE_DEVICES.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    owns = not dist.is_initialized()
    if owns:
        if use_cuda:
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def shutdown_distributed(info: DistInfo) -> None:
    """Destroy the process group if init_distributed created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class _LossModule(nn.Module):
    """forward(batch) → summed CE: the module DDP / FSDP2 wrap, so their forward hooks run (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return loss_sum(self.model, batch)


def _is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (gathering DTensor shards: a collective, every rank must call it)."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach().to("cpu").contiguous()


class ParallelModel:
    """The model as the training step sees it: single process, DDP or FSDP2 behind one interface.

    Attributes:
        model: the plain (inner) model; under FSDP2 its parameters are DTensor shards.
        kind: "single", "ddp" or "fsdp".
    """

    def __init__(self, model: nn.Module, kind: str, info: DistInfo, device: torch.device, *,
                 captured: bool = False) -> None:
        """captured: the steps run as CUDA graphs that sum gradients themselves (`rank_sum`), so "ddp" does not
        wrap the model in DistributedDataParallel; the trainable parameters are broadcast from rank 0 instead."""
        if kind not in ("single", "ddp", "fsdp"):
            raise ConfigError(f"unknown parallel kind {kind!r}; use 'single', 'ddp' or 'fsdp'.")
        if captured and kind == "fsdp":
            raise ConfigError("cuda_graphs cannot capture FSDP2's sharded steps; use distributed: ddp (the model "
                              "must fit one GPU) or cuda_graphs: false.")
        self.model, self.kind, self.info = model, kind, info
        # host-side sums (token counts) over ranks; a collective, so every rank builds it here
        self.rank_sum = RankSum(device) if kind != "single" else None
        wrapper = _LossModule(model)
        if kind == "ddp" and captured:
            self.wrapped = wrapper
            self.rank_sum.broadcast_from_first([p.data for p in self.parameters()])
        elif kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

            # find_unused_parameters: LoRA layers that get no gradient on some rank (a vision tower on a
            # text-only micro-batch, MoE experts no token was routed to) must not leave the all-reduce
            # waiting. Non-reentrant checkpointing keeps the forward graph complete, so the search is exact.
            self.wrapped = DistributedDataParallel(
                wrapper, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True, **_no_buffer_sync_kwargs(DistributedDataParallel))
        elif kind == "fsdp":
            self.wrapped = _fully_shard(wrapper, model, device)
        else:
            self.wrapped = wrapper

    def parameters(self) -> list[nn.Parameter]:
        """The trainable (LoRA) parameters, in a fixed order every rank and process count shares."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, batch: dict) -> torch.Tensor:
        return self.wrapped(batch)

    def host_sum(self, values: list[float]) -> list[float]:
        """Numbers summed over ranks on the host (no wait for the GPU); as given in one process."""
        return self.rank_sum.host(values) if self.rank_sum is not None else [float(v) for v in values]

    def eval_loss(self, batch: dict) -> torch.Tensor:
        """Summed CE without gradients: through FSDP2's forward (it all-gathers), else the plain model (no
        collective at all, so ranks may skip batches without targets)."""
        return self.wrapped(batch) if self.kind == "fsdp" else loss_sum(self.model, batch)

    def sync(self, last: bool):
        """Context for one micro-batch's forward+backward: gradients are reduced over ranks only when `last`."""
        if self.kind == "ddp" and not last:
            return self.wrapped.no_sync()
        if self.kind == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Full PEFT-keyed LoRA tensors on the CPU; a collective under FSDP2 (call on every rank)."""
        if self.kind != "fsdp":
            return adapter_state_dict(self.model)
        from slimtune.adapt.adapter_io import adapter_parameters  # noqa: PLC0415

        return {key: _full(weight) for key, weight in adapter_parameters(self.model).items()}

    def optimizer_state(self, optimizer) -> dict:
        """optimizer.state_dict() with full (unsharded) CPU tensors: the same layout for any process count."""
        state = optimizer.state_dict()
        if self.kind != "fsdp":
            return state
        full = {idx: {k: (_full(v) if torch.is_tensor(v) and _is_dtensor(v) else v) for k, v in s.items()}
                for idx, s in sorted(state["state"].items())}
        return {"state": full, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Load a full optimizer state (see optimizer_state), sharding it like the parameters under FSDP2."""
        if self.kind == "fsdp":
            from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

            params = self.parameters()
            sharded = {}
            for idx, s in state["state"].items():
                p = params[int(idx)]
                sharded[idx] = {k: (distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                                    if torch.is_tensor(v) and v.shape == p.shape and k != "step" else v)
                                for k, v in s.items()}
            state = {"state": sharded, "param_groups": state["param_groups"]}
        optimizer.load_state_dict(state)


def _no_buffer_sync_kwargs(ddp_cls) -> dict:
    """Do not re-broadcast buffers (rotary tables, …) every forward: they are identical and never trained.
    Newer torch renamed broadcast_buffers to forward_sync_buffers and warns on the old name."""
    import inspect  # noqa: PLC0415

    params = inspect.signature(ddp_cls.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The text decoder's layers (Gemma4ForCausalLM: model.layers; multimodal: model.language_model.layers)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        inner = getattr(model, "model", None)
        layers = getattr(getattr(inner, "language_model", inner), "layers", None)
    if layers is None:
        raise ConfigError(f"distributed=fsdp: could not find the decoder layers of {type(model).__name__}; "
                          "use distributed: ddp for this model.")
    return list(layers)


def _is_nf4(p: nn.Parameter) -> bool:
    return type(p).__name__ == "Params4bit"  # by name: bitsandbytes is only imported for QLoRA runs


def _fully_shard(wrapper: nn.Module, model: nn.Module, device: torch.device):
    """FSDP2: one shard group per decoder layer (all-gathered just in time), the rest in the root.

    QLoRA: the NF4 weights behind a LoRA adapter are sharded too (uint8 codes, all-gathered like the rest); their
    quantisation state (absmax, ~3 % of the codes) stays whole on every rank as the module's ``quant_state``,
    bitsandbytes' own place for it under FSDP, where the fused LoRA node (slimtune.adapt.lora_matmul) reads it.
    NF4 linears without an adapter run bitsandbytes' forward, which re-wraps the gathered weight and would break
    FSDP's bookkeeping: those stay whole on every rank (`ignored_params`), as under DDP.
    """
    import inspect  # noqa: PLC0415

    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    from slimtune.adapt.lora import LoraLinear  # noqa: PLC0415

    behind_lora = {id(m.base_layer) for m in model.modules() if isinstance(m, LoraLinear)}
    kept_whole = set()
    for module in model.modules():
        if not _is_nf4(getattr(module, "weight", None)):
            continue
        if id(module) in behind_lora:  # read through slimtune.adapt.lora_matmul, which takes the module's state
            module.quant_state = module.weight.quant_state
        else:  # bitsandbytes' own forward would re-wrap the gathered weight behind FSDP's back: not sharded
            kept_whole.add(module.weight)
    if kept_whole and "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ConfigError("distributed=fsdp with load_in_4bit and NF4 linears without LoRA needs a torch whose "
                          "fully_shard accepts ignored_params (2.7 or newer); put LoRA on every linear "
                          "(target_modules all-linear), upgrade torch, or use distributed: ddp.")

    def ignoring(module: nn.Module) -> dict:
        return {"ignored_params": {p for p in module.parameters() if p in kept_whole}} if kept_whole else {}

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **ignoring(layer))
    root = fully_shard(wrapper, mesh=mesh, **ignoring(wrapper))
    if hasattr(root, "set_reduce_scatter_unused_params"):
        # A parameter one rank used and another did not (a tower on text-only data, an MoE expert) would make
        # the ranks' reduce-scatters disagree; zeros for the unused ones keep them matched (torch >= 2.9).
        root.set_reduce_scatter_unused_params(True)
    return root


def rank_rng_states(info: DistInfo, device: torch.device) -> list | None:
    """Every rank's (CPU, own-GPU) RNG state, gathered on every rank; None when not distributed.

    A collective. Stored in checkpoints so a resume with the SAME number of processes gives each rank its own
    dropout stream back (rank 0's is also stored the single-process way, for any other count).
    """
    if not info.enabled:
        return None
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    states: list = [None] * info.world_size
    dist.all_gather_object(states, mine)
    return states


def restore_rank_rng(states: list | None, info: DistInfo, device: torch.device, fallback_seed: int) -> bool:
    """Put this rank's RNG back from rank_rng_states; returns False (after seeding with fallback_seed) when
    the checkpoint came from another number of processes, so this rank's stream cannot be continued."""
    if not states or len(states) != info.world_size:
        torch.manual_seed(fallback_seed)
        return False
    cpu, gpu = states[info.rank]
    torch.set_rng_state(cpu)
    if gpu is not None and device.type == "cuda":
        torch.cuda.set_rng_state(gpu, device)
    return True


def grad_norm_value(norm) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP2: reduced over the shards first)."""
    return float(norm.full_tensor() if _is_dtensor(norm) else norm)


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (a collective; `flag` itself when not distributed). For decisions
    each rank makes from its own GPU, such as cuda_graphs auto's memory headroom, that all ranks must share: a
    captured rank and an eager one would wait on different collectives."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] == (dist.get_world_size() if dist.is_initialized()
                                                                  else 1)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum numbers over ranks in one collective, before a ParallelModel (and its host-side sums) exists; as given
    when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()
