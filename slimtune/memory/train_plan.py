"""The planner applied to a TrainConfig: print the prediction before training and, with max_memory, choose the
settings the user left unset.

Which settings count as "set by the user": the keys of the YAML file and the flags (`resolve_config` records them
as `cfg.explicit_keys`); for a TrainConfig built in Python, every field whose value differs from its default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from slimtune.errors import ConfigError
from slimtune.memory.planner import MemoryBudgetError, Plan, longest_context, plan_memory, predict
from slimtune.memory.sizes import format_gib, parse_memory_size

# TrainConfig field -> planner setting of the same name
_PLANNED_FIELDS = ("load_in_4bit", "gradient_checkpointing", "activation_offload", "mlp_chunk_size",
                   "loss_chunk_size", "batch_size", "optimizer", "checkpoint_layers")


def explicit_fields(cfg) -> set[str]:
    """Fields the user set: recorded by resolve_config, else those that differ from the dataclass default."""
    keys = getattr(cfg, "explicit_keys", None)
    if keys is not None:
        return set(keys)
    return {f.name for f in dataclasses.fields(cfg)
            if f.default is not dataclasses.MISSING and getattr(cfg, f.name) != f.default}


def model_ref(name: str) -> str:
    """Something read_model_shape can read: a geometry (also as ``random:<geometry>``, the random-weights
    loader's spec), a local folder, or a hub id's config.json fetched into the HF cache.

    Raises:
        ValueError: neither (no folder, and the hub config cannot be fetched).
    """
    from slimtune.models.geometry import RANDOM_PREFIX, VARIANTS  # noqa: PLC0415

    if name.startswith(RANDOM_PREFIX) and name[len(RANDOM_PREFIX):] in VARIANTS:
        return name[len(RANDOM_PREFIX):]
    if name in VARIANTS or (Path(name).expanduser() / "config.json").is_file():
        return name
    try:
        from huggingface_hub import hf_hub_download  # noqa: PLC0415

        return str(Path(hf_hub_download(name, "config.json")).parent)
    except Exception as exc:  # offline, gated, not a repo: say why the planner cannot see the model
        raise ValueError(f"cannot read the config of {name!r} to predict its memory ({type(exc).__name__})") from exc


def _context(cfg, world_size: int | None = None) -> dict:
    """Settings the planner needs that TrainConfig does not choose. world_size: the processes sharing the run
    (None: torchrun's WORLD_SIZE, 1 outside torchrun); the prediction and a budget are then per GPU."""
    import torch  # noqa: PLC0415

    if world_size is None:
        from slimtune.train.distributed import launched_world_size  # noqa: PLC0415

        world_size = launched_world_size()
    cuda = cfg.device == "cuda" or (cfg.device is None and torch.cuda.is_available())
    return {"lora_r": cfg.lora_r, "attention": "slimtune" if cuda else "sdpa", "text_only": bool(cfg.text_only),
            "finetune_experts": bool(cfg.finetune_experts), "cuda_graphs": _graphs_likely(cfg, cuda, world_size),
            "recompute_norms": bool(cfg.recompute_norms), "compile_layers": bool(cfg.compile_layers),
            "activation_bytes": 4 if cfg.dtype in ("float32", "fp32") else 2,
            "world_size": world_size, "distributed": cfg.distributed}


def _graphs_likely(cfg, cuda: bool, world_size: int) -> bool:
    """Whether the run will capture CUDA graphs, for the prediction: forced on, or "auto" with nothing in the
    settings against it (auto's model and headroom checks come later: counting a graph that auto then leaves off
    over-predicts by its pool)."""
    if cfg.cuda_graphs == "auto":
        from slimtune.train.auto_graphs import config_blockers  # noqa: PLC0415

        return not config_blockers(cfg, cuda=cuda, sharded=world_size > 1 and cfg.distributed == "fsdp")
    return cfg.cuda_graphs is True


def graph_fixed_settings(cfg) -> dict:
    """Planner settings that cuda_graphs forced on fixes: a captured step cannot offload activations. (Under
    "auto" the planner may still offload; auto then stays eager.)"""
    return {"activation_offload": False} if cfg.cuda_graphs is True else {}


def plan_for_config(cfg, world_size: int | None = None) -> Plan:
    """The plan for cfg.max_memory (or, without one, the prediction of cfg's own settings), per GPU of
    `world_size` processes (None: torchrun's WORLD_SIZE; max_memory is then each GPU's budget).

    Raises:
        MemoryBudgetError: nothing fits the budget (message: smallest peak and the longest max_seq_length).
        ValueError: the model's config cannot be read.
    """
    ref = model_ref(cfg.model)
    explicit = explicit_fields(cfg)
    if cfg.max_memory is None:
        return predict(ref, cfg.max_seq_length, **{k: getattr(cfg, k) for k in _PLANNED_FIELDS},
                       grad_accum=cfg.grad_accum, **_context(cfg, world_size))
    user = {k: getattr(cfg, k) for k in _PLANNED_FIELDS if k in explicit}
    if "grad_accum" in explicit:
        user["grad_accum"] = cfg.grad_accum
    user.update(graph_fixed_settings(cfg))
    return plan_memory(ref, cfg.max_seq_length, parse_memory_size(cfg.max_memory), **user,
                       **_context(cfg, world_size))


def plan_changes(cfg, plan: Plan) -> dict:
    """The settings the plan changes in cfg (not `plan.changes`, which compares with the planner's fastest start:
    a budget that fits without checkpointing turns it off, a change to the run although none to the planner)."""
    return {k: plan.settings[k] for k in (*_PLANNED_FIELDS, "grad_accum") if getattr(cfg, k) != plan.settings[k]}


def report_lines(cfg, plan: Plan) -> list[str]:
    """What the trainer prints before it starts (the Studio shows the same lines)."""
    lines = [line for line in plan.summary().splitlines() if not line.startswith("memory plan:")]
    if cfg.max_memory is not None:
        changes = plan_changes(cfg, plan)
        lines.insert(1, "memory plan: " + (", ".join(f"{k}={v} (was {getattr(cfg, k)})" for k, v in changes.items())
                                           if changes else "your settings already fit; nothing changed"))
    return lines


def apply_memory_plan(cfg, log=print, world_size: int | None = None):
    """Print the memory prediction; with max_memory, return cfg with the planned settings (else cfg itself).

    world_size: processes of a torchrun job (the trainer passes its process group's size; None reads
    WORLD_SIZE). Above 1, the prediction and max_memory are per GPU, for cfg.distributed's DDP or FSDP2.

    Raises:
        ConfigError: max_memory is set and nothing fits it, or the model cannot be read to plan.
    """
    try:
        plan = plan_for_config(cfg, world_size)
    except MemoryBudgetError:
        raise
    except ValueError as exc:
        if cfg.max_memory is not None:
            raise ConfigError(f"max_memory={cfg.max_memory!r} needs the model's config to plan: {exc}") from exc
        log(f"memory: no prediction ({exc})")
        return cfg
    for line in report_lines(cfg, plan):
        log(line)
    if cfg.max_memory is None:
        _warn_if_over_gpu(cfg, plan, log, world_size)
        return cfg
    changes = plan_changes(cfg, plan)
    if not changes:
        return cfg
    planned = dataclasses.replace(cfg, **changes)
    planned.explicit_keys = frozenset(explicit_fields(cfg))  # planned values stay "defaults" for a later re-plan
    return planned


def _warn_if_over_gpu(cfg, plan: Plan, log, world_size: int | None = None) -> None:
    """Without a budget: say so when the prediction exceeds the GPU, with the longest context that would fit."""
    import torch  # noqa: PLC0415

    if not (cfg.device in (None, "cuda") and torch.cuda.is_available()):
        return
    total = torch.cuda.mem_get_info()[1]
    if plan.predicted_bytes <= total:
        return
    longest = longest_context(plan.model, total, multiple_of=128, **_context(cfg, world_size),
                              **{k: plan.settings[k] for k in _PLANNED_FIELDS})
    log(f"memory warning: the prediction exceeds this GPU's {format_gib(total)}; with these settings the longest "
        f"max_seq_length that fits is {longest}. Add --max-memory {total / 2**30:.0f}GiB to let the planner choose "
        "the settings you left unset.")
