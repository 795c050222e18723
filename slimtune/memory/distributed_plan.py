"""Per-GPU peak memory of a multi-process run (torchrun: DDP or FSDP2), from the single-GPU terms of
slimtune.memory.estimate and the sharding slimtune.train.distributed applies.

Every process trains on its own micro-batch of `batch_size` sequences, so the activation terms (boundary, layer
working set, loss chunk) are the single-GPU ones. What changes is where the parameters, gradients and optimizer
state live:

DDP (``DistributedDataParallel(find_unused_parameters=True)``, bucket_cap_mb and gradient_as_bucket_view left at
their defaults): every GPU keeps the whole single-GPU footprint. The reducer also allocates, at construction and
for the whole run, one flat fp32 bucket per ~25 MiB of trainable parameters: together a second copy of every LoRA
gradient (``ddp_grad_buckets``, 4 B per LoRA parameter), because without gradient_as_bucket_view the ``.grad``
tensors are separate and are copied into the buckets for the all-reduce. Captured DDP steps (cuda_graphs, no
DDP wrapper) hold the same amount in their graph's pool: the flat fp32 buffer they all-reduce.

FSDP2 (``_fully_shard``: one unit per decoder layer, the rest (embeddings, final norm, towers, the PLE projection)
in the root unit):
  weights_sharded      every parameter FSDP2 shards, per GPU: dim 0 split into ceil(dim0 / N) rows (FSDP2 pads
                       the last rank's shard to the same size): 16-bit frozen weights, 16-bit MoE expert tensors,
                       the PLE table when it is not offloaded, and in QLoRA the uint8 NF4 codes of the linears
                       behind a LoRA adapter (a Params4bit is (ceil(numel / 2), 1)).
  weights_whole        what stays whole on every GPU: NF4 linears without LoRA (``ignored_params``), the quant
                       state (absmax) of the sharded NF4 linears (kept on the module), and the NF4 MoE expert stacks
                       (buffers: FSDP2 shards parameters only).
  fsdp_root_gathered   the root unit's all-gathered parameters: the root reshards only after the backward
                       (FSDP2 sets reshard_after_forward=False on the root), so the whole root is there all step.
  lora_and_optimizer   LoRA weights and optimizer state, sharded like the weights (padded rows).
  lora_grads           the sharded fp32 gradients; with grad_accum > 1 also the unsharded ones, which FSDP2 keeps
                       whole on every GPU between micro-batches that do not sync (set_requires_gradient_sync).
  fsdp_layers_gathered backward: the unsharded parameters of FSDP_GATHERED_LAYERS decoder layers, the one being
                       recomputed and differentiated and the one prefetched (its all-gather output, then copied out).
  fsdp_grad_buffers    backward: FSDP_GRAD_BUFFERS copies of the largest unit's LoRA gradients (autograd's unsharded
                       .grad, its reduce-scatter input, and the previous unit's input until its reduce-scatter ends).

Not modelled (bounded, below the step's peak, or small): DDP's one-time 250 MiB broadcast of the model at
construction; NCCL's own buffers (outside torch's allocator, like the CUDA context); autocast's 16-bit LoRA copies
are kept whole under FSDP2 (the cast of a gathered LoRA weight is cached for the whole forward).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from slimtune.memory.estimate import NF4_BYTES_PER_PARAM, OPTIMIZER_BYTES, assemble_terms

DISTRIBUTED_KINDS = ("auto", "ddp", "fsdp")
"""TrainConfig.distributed's values; auto means ddp (slimtune.train.loop.parallel_kind)."""
FSDP_GATHERED_LAYERS = 2
FSDP_GRAD_BUFFERS = 3
LORA_GRAD_BYTES = 4  # LoRA weights, and so their gradients, are fp32
ROOT = -1  # unit index of the root (everything outside the decoder layers)


@dataclass(frozen=True)
class Tensor:
    """One frozen parameter: its FSDP2 unit (decoder layer index, or ROOT), role and shape."""

    unit: int
    role: str  # linear | expert | ple | other
    adapted: bool  # a linear with a LoRA adapter (its NF4 codes are sharded; without one they stay whole)
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Inventory:
    """The model's frozen parameters and LoRA targets, per FSDP2 unit."""

    tensors: tuple[Tensor, ...]
    lora: tuple[tuple[int, int, int, int], ...]  # (unit, in, out, experts): factors A (r·E, in), B (out, r·E)


def check_distributed(world_size, distributed, cuda_graphs: bool = False) -> None:
    """Raises ValueError for a world size or mode the planner cannot predict."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"memory estimate: world_size must be an integer >= 1 (got {world_size!r})")
    if distributed not in DISTRIBUTED_KINDS:
        raise ValueError(f"memory estimate: distributed must be one of {DISTRIBUTED_KINDS} (got {distributed!r})")
    if world_size > 1 and cuda_graphs and distributed == "fsdp":
        raise ValueError("memory estimate: cuda_graphs cannot capture FSDP2's sharded steps (world_size="
                         f"{world_size}); use distributed ddp or cuda_graphs off")


def per_gpu_terms(terms: dict, model: str, *, world_size: int, distributed: str, grad_accum: int, multimodal: bool,
                  text_only: bool, finetune_experts: bool, load_in_4bit: bool, offload_ple: bool, lora_r: int,
                  optimizer: str, activation_bytes: int) -> dict:
    """training_terms' result for one GPU of `world_size` processes (the same dict layout, bytes)."""
    if world_size == 1:
        return terms
    if distributed in ("auto", "ddp"):
        static = {**terms["static"], "ddp_grad_buckets": _lora_numel(terms) * LORA_GRAD_BYTES}
        return assemble_terms(static, terms["boundary"], terms["loss_phase"], terms["backward_phase"])
    fsdp = fsdp_bytes(model, multimodal, text_only, finetune_experts, world_size, load_in_4bit, offload_ple,
                      lora_r, activation_bytes)
    single = terms["static"]
    static = {"weights_sharded": fsdp["weights_sharded"], "weights_whole": fsdp["weights_whole"],
              "fsdp_root_gathered": fsdp["root_gathered"],
              "lora_and_optimizer": fsdp["lora_shard_numel"] * (4 + OPTIMIZER_BYTES[optimizer]),
              **{k: v for k, v in single.items() if k not in ("weights", "ple_table", "lora_and_optimizer")}}
    grads = fsdp["lora_shard_numel"] * LORA_GRAD_BYTES
    if grad_accum > 1:  # micro-batches without sync accumulate unsharded gradients (FSDPParam.unsharded_grad)
        grads += _lora_numel(terms) * LORA_GRAD_BYTES
    backward = {"lora_grads": grads,
                "fsdp_layers_gathered": FSDP_GATHERED_LAYERS * fsdp["largest_layer_gathered"],
                "fsdp_grad_buffers": FSDP_GRAD_BUFFERS * fsdp["largest_unit_lora"] * LORA_GRAD_BYTES,
                **{k: v for k, v in terms["backward_phase"].items() if k != "lora_grads"}}
    return assemble_terms(static, terms["boundary"], terms["loss_phase"], backward)


def _lora_numel(terms: dict) -> float:
    """LoRA parameters of the single-GPU terms (its backward holds their fp32 gradients)."""
    return terms["backward_phase"]["lora_grads"] / LORA_GRAD_BYTES


def _rows(dim0: int, world: int) -> int:
    """Rows of one rank's FSDP2 shard: dim 0 split evenly, the last rank padded up to the same size."""
    return -(-dim0 // world)


@functools.lru_cache(maxsize=64)
def fsdp_bytes(model: str, multimodal: bool, text_only: bool, finetune_experts: bool, world: int,
               load_in_4bit: bool, offload_ple: bool, lora_r: int, a: int) -> dict:
    """Per-GPU parameter bytes under FSDP2 with `world` ranks (see the module docstring for each key).

    Returns: weights_sharded, weights_whole, root_gathered, largest_layer_gathered (bytes), lora_shard_numel and
    largest_unit_lora (LoRA parameters per rank, and the most any one unit all-gathers).
    """
    inv = read_inventory(model, multimodal, text_only, finetune_experts)
    sharded = whole = 0.0
    gathered: dict[int, float] = {}
    for t in inv.tensors:
        numel = math.prod(t.shape)
        if t.role == "ple" and offload_ple:  # a host tensor, not a parameter: FSDP2 never sees it
            continue
        if load_in_4bit and t.role in ("linear", "expert"):
            if t.role == "expert" or not t.adapted:  # expert buffers / ignored_params: whole on every GPU
                whole += numel * NF4_BYTES_PER_PARAM
                continue
            whole += numel * (NF4_BYTES_PER_PARAM - 0.5)  # quant state, kept on the module
            dim0, rest, size = -(-numel // 2), 1, 1  # Params4bit: (ceil(numel / 2), 1) uint8
        else:
            dim0, rest, size = t.shape[0], numel // t.shape[0], a
        rows = _rows(dim0, world)
        sharded += rows * rest * size
        gathered[t.unit] = gathered.get(t.unit, 0.0) + rows * world * rest * size
    lora_shard = 0
    lora_units: dict[int, int] = {}
    for unit, fan_in, fan_out, experts in inv.lora:
        k = lora_r * experts
        rows_a, rows_b = _rows(k, world), _rows(fan_out, world)
        lora_shard += rows_a * fan_in + rows_b * k
        unit_numel = (rows_a * fan_in + rows_b * k) * world
        lora_units[unit] = lora_units.get(unit, 0) + unit_numel
        gathered[unit] = gathered.get(unit, 0.0) + unit_numel * 4  # fp32 LoRA weights are gathered with the unit
    layers = [v for u, v in gathered.items() if u != ROOT]
    return {"weights_sharded": sharded, "weights_whole": whole, "root_gathered": gathered.get(ROOT, 0.0),
            "largest_layer_gathered": max(layers, default=0.0), "lora_shard_numel": lora_shard,
            "largest_unit_lora": max(lora_units.values(), default=0)}


@functools.lru_cache(maxsize=16)
def read_inventory(model: str, multimodal: bool = False, text_only: bool = False,
                   finetune_experts: bool = False) -> Inventory:
    """Every frozen parameter and LoRA target of the model with the FSDP2 unit `_fully_shard` puts it in.

    Units come from slimtune.train.distributed.decoder_layers, the function `_fully_shard` wraps by; the LoRA
    targets from select_lora_targets' defaults (all-linear on the language layers), as the single-GPU estimate.
    """
    from slimtune.adapt.inject import select_lora_targets  # noqa: PLC0415
    from slimtune.adapt.quantize import nf4_module_names  # noqa: PLC0415
    from slimtune.memory.model_shape import build_meta_model  # noqa: PLC0415
    from slimtune.models.registry import family_of  # noqa: PLC0415
    from slimtune.train.distributed import decoder_layers  # noqa: PLC0415

    m, _, _ = build_meta_model(model, multimodal, text_only)
    unit_of = {id(p): i for i, layer in enumerate(decoder_layers(m)) for p in layer.parameters()}
    owners = dict(m.named_modules())
    quant = set(nf4_module_names(m, family_of(m)))
    targets = set(select_lora_targets(m))
    tensors, seen = [], set()
    for name, p in m.named_parameters():
        if id(p) in seen:  # the tied lm_head is the embedding
            continue
        seen.add(id(p))
        owner = name.rsplit(".", 1)[0]
        if "embed_tokens_per_layer" in name:
            role = "ple"
        elif owner in quant:
            role = "expert" if type(owners[owner]).__name__ == "Gemma4TextExperts" else "linear"
        else:
            role = "other"
        tensors.append(Tensor(unit_of.get(id(p), ROOT), role, owner in targets, tuple(p.shape)))
    lora = [(unit_of.get(id(m.get_submodule(n).weight), ROOT), m.get_submodule(n).in_features,
             m.get_submodule(n).out_features, 1) for n in sorted(targets)]
    if finetune_experts:  # LoraExperts on a (E, out, in) tensor: A (r·E, in), B (out, r·E)
        lora += [(unit_of.get(id(w), ROOT), w.shape[2], w.shape[1], w.shape[0]) for name, w in m.named_parameters()
                 if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    return Inventory(tuple(tensors), tuple(lora))
