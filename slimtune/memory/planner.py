"""The memory planner: the fastest settings whose predicted peak fits a GPU-memory budget.

Memory-saving techniques are tried in order of their cost to speed, cheapest first, each only where the user left
the setting unset: load_in_4bit, PLE host offload (always on on CUDA today), gradient checkpointing, activation
offload, tiled MLP (mlp_chunk_size, largest chunk first), a smaller loss chunk, a smaller micro-batch (grad_accum
raised to keep the effective batch; the training step normalises over the whole window, so the gradients are the
same), then 8-bit AdamW. The first combination that fits wins; graded settings taken further than needed are then
eased back. Predictions come from slimtune.memory.estimate (calibrated on H200 measurements, within ~10%).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimtune.errors import ConfigError
from slimtune.memory.distributed_plan import check_distributed, per_gpu_terms
from slimtune.memory.estimate import GIB, check_settings, training_terms
from slimtune.memory.model_shape import read_model_shape
from slimtune.memory.sizes import format_gib

# Order = cost to speed, cheapest first. First level = the fastest (what an unset setting starts at).
_STEPS = ("load_in_4bit", "offload_ple", "gradient_checkpointing", "activation_offload", "mlp_chunk_size",
          "loss_chunk_size", "batch_size", "optimizer")
_GRADED = ("mlp_chunk_size", "loss_chunk_size", "batch_size")
_MLP_CHUNKS = (0, 4096, 2048, 1024, 512)
_LOSS_CHUNKS = (0, 256, 128, 64)
_FIXED_DEFAULTS = {"grad_accum": 1, "lora_r": 16, "attention": "slimtune", "multimodal": False,
                   "text_only": False, "finetune_experts": False, "activation_bytes": 2, "cuda_graphs": False,
                   "recompute_norms": True, "compile_layers": False, "world_size": 1, "distributed": "auto",
                   "checkpoint_layers": None}
UNMEASURED_MARGIN = 0.85
"""Share of the budget a prediction may use where no H200 measurement backs the estimate yet (runs without
gradient checkpointing; partial checkpointing is measured): turning checkpointing off is a speed gain, not worth
an out-of-memory on a guess."""
FSDP_MARGIN = 0.95
"""Share of the budget a prediction may use under FSDP2 across several GPUs: the one measurement, 26B-A4B LoRA
16-bit 2K on two H200s, peaked 3 % above the estimate (30.00 GiB measured, 29.09 predicted; BENCHMARKS.md session
12). DDP's measurements peaked under it (E4B QLoRA 8K 7.18 vs 7.61, 31B 27.07 vs 28.16)."""
OFFLOAD_MARGIN = 0.95
"""Share of the budget a prediction may use where activations go to the host: at 50-67K tokens on E2B such runs
peaked 2-4.8 % above the estimate on the H200 (50,176 tokens: 8.08 GiB measured, 7.92 predicted; 53,248: 8.31 vs
7.98; 66,560: 9.91 vs 9.45), a residual the terms do not explain yet."""
PLANNED_SETTINGS = _STEPS
"""Settings the planner may choose (when the caller does not give them)."""


class MemoryBudgetError(ConfigError):
    """No combination of the allowed settings is predicted to fit the budget; `.plan` is the smallest one."""

    def __init__(self, message: str, plan: "Plan", longest_seq: int) -> None:
        super().__init__(message)
        self.plan = plan
        self.longest_seq = longest_seq


@dataclass
class Plan:
    """Settings and their predicted peak GPU memory (bytes; GiB in the breakdown)."""

    model: str
    seq_len: int
    settings: dict
    predicted_bytes: float
    breakdown: dict
    phase: str
    budget_bytes: int | None = None
    changes: dict = field(default_factory=dict)  # setting -> (start value, planned value)
    notes: list = field(default_factory=list)
    margin: float = 1.0  # share of the budget the prediction may use (UNMEASURED_MARGIN where uncalibrated)

    @property
    def predicted_gib(self) -> float:
        return self.predicted_bytes / GIB

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.predicted_bytes <= self.budget_bytes * self.margin

    @property
    def world_size(self) -> int:
        return self.settings.get("world_size", 1)

    def scope(self) -> str:
        """What the prediction is for: "GPU memory" (one process), else e.g. "per GPU (FSDP2, 2 GPUs):"."""
        if self.world_size == 1:
            return "GPU memory"
        kind = "FSDP2" if self.settings.get("distributed") == "fsdp" else "DDP"
        return f"per GPU ({kind}, {self.world_size} GPUs):"

    def main_terms(self, k: int = 4) -> list[tuple[str, float]]:
        """The k largest terms, (name, GiB)."""
        return sorted(self.breakdown.items(), key=lambda kv: -kv[1])[:k]

    def summary(self) -> str:
        """Human-readable lines: prediction, main terms, planned changes, notes."""
        terms = ", ".join(f"{name} {gib:.2f}" for name, gib in self.main_terms())
        head = f"memory: predicted peak {self.scope()} {format_gib(self.predicted_bytes)}"
        if self.budget_bytes is not None:
            head += f" of a {format_gib(self.budget_bytes)} budget" + (" per GPU" if self.world_size > 1 else "")
        lines = [f"{head} ({self.seq_len} tokens × batch {self.settings['batch_size']}; "
                 f"largest terms, GiB: {terms})"]
        if self.changes:
            lines.append("memory plan: " + ", ".join(f"{k}={v[1]}" for k, v in self.changes.items()))
        elif self.budget_bytes is not None:
            lines.append("memory plan: the fastest settings already fit; nothing changed")
        lines += [f"memory note: {n}" for n in self.notes]
        return "\n".join(lines)


def _levels(name: str, settings: dict) -> tuple:
    if name == "load_in_4bit":
        return (False, True)
    if name == "offload_ple":
        return (True,)  # the loader always offloads on CUDA; there is nothing faster to start from
    if name in ("gradient_checkpointing", "activation_offload"):
        return (False, True)
    if name == "mlp_chunk_size":
        return _MLP_CHUNKS
    if name == "loss_chunk_size":
        return _LOSS_CHUNKS
    if name == "batch_size":  # divisors of the effective micro-batch, largest first
        total = settings["batch_size"]
        return tuple(d for d in range(total, 0, -1) if total % d == 0)
    if name == "optimizer":
        return ("adamw", "adamw8bit")
    raise AssertionError(name)


def predict(model: str, seq_len: int, **settings) -> Plan:
    """The predicted peak of exactly these settings (unset ones at the planner's starting values)."""
    unknown = set(settings) - set(_STEPS) - set(_FIXED_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown memory settings {sorted(unknown)}; known: {sorted((*_STEPS, *_FIXED_DEFAULTS))}")
    full = {**_FIXED_DEFAULTS, **{k: _levels(k, {"batch_size": 1})[0] for k in _STEPS}, **settings}
    full["gradient_checkpointing"] = settings.get("gradient_checkpointing", True)  # TrainConfig's default
    return _predict(str(model), seq_len, full)


def _predict(model: str, seq_len: int, s: dict, budget: int | None = None) -> Plan:
    check_settings(seq_len=seq_len, batch_size=s["batch_size"], lora_r=s["lora_r"], attention=s["attention"],
           optimizer=s["optimizer"], mlp_chunk_size=s["mlp_chunk_size"], loss_chunk_size=s["loss_chunk_size"])
    shape = read_model_shape(model, s["multimodal"], s["text_only"], s["finetune_experts"])
    args = {k: s[k] for k in ("batch_size", "load_in_4bit", "lora_r", "gradient_checkpointing", "offload_ple",
                              "attention", "activation_offload", "mlp_chunk_size", "loss_chunk_size", "optimizer",
                              "activation_bytes", "cuda_graphs", "recompute_norms", "compile_layers",
                              "checkpoint_layers")}
    check_distributed(s["world_size"], s["distributed"], s["cuda_graphs"])
    terms = training_terms(shape, seq_len=seq_len, **args)
    # under torchrun: one GPU's share (world_size 1 returns the single-GPU terms untouched)
    terms = per_gpu_terms(terms, model, world_size=s["world_size"], distributed=s["distributed"],
                          grad_accum=s["grad_accum"], multimodal=s["multimodal"], text_only=s["text_only"],
                          finetune_experts=s["finetune_experts"], load_in_4bit=s["load_in_4bit"],
                          offload_ple=s["offload_ple"], lora_r=s["lora_r"], optimizer=s["optimizer"],
                          activation_bytes=s["activation_bytes"])
    total = sum(terms["breakdown"].values())
    return Plan(model=model, seq_len=seq_len, settings=dict(s), predicted_bytes=total, phase=terms["phase"],
                breakdown={k: round(v / GIB, 3) for k, v in terms["breakdown"].items()}, budget_bytes=budget,
                margin=_margin(s))


def _margin(s: dict) -> float:
    # Partial checkpointing (checkpoint_layers) is calibrated: E2B QLoRA 2K on the H200 at k = 17, 8 and 0 peaked
    # 4.5-5.8 % under the estimate (results_gpu30_session8_callK). Checkpointing off is a code path never measured.
    if not s["gradient_checkpointing"]:
        return UNMEASURED_MARGIN
    if s["world_size"] > 1 and s["distributed"] == "fsdp":
        return min(FSDP_MARGIN, OFFLOAD_MARGIN if s["activation_offload"] else 1.0)
    return OFFLOAD_MARGIN if s["activation_offload"] else 1.0


def plan_memory(model, seq_len: int, budget_bytes: int, **user_settings) -> Plan:
    """The fastest settings predicted to fit `budget_bytes`; settings given here are kept as they are.

    Args:
        model: geometry name (e2b, e4b, 26b-a4b, 31b) or local model folder.
        seq_len: tokens per sequence (max_seq_length).
        budget_bytes: peak GPU memory allowed (allocated tensors; leave room for the CUDA context); with
            world_size > 1, per GPU.
        **user_settings: any of load_in_4bit, offload_ple, gradient_checkpointing, activation_offload,
            mlp_chunk_size, loss_chunk_size, batch_size, optimizer (kept fixed), plus grad_accum, lora_r,
            attention, multimodal, world_size and distributed (auto | ddp | fsdp: torchrun processes and how they
            share the model; slimtune.memory.distributed_plan). batch_size is the effective micro-batch (per
            process): it is split (grad_accum raised) unless grad_accum is given too.

    Raises:
        MemoryBudgetError: even the smallest allowed settings do not fit (message: the smallest prediction and
            the longest seq_len that would fit).
    """
    plan = _plan(str(model), seq_len, budget_bytes, user_settings)
    if plan.fits:
        return plan
    # a multiple of 128 tokens: the lengths people set, and the kernels' tile sizes
    longest = longest_context(model, budget_bytes, multiple_of=128 if seq_len >= 128 else 1, **user_settings)
    fixed = sorted(k for k in user_settings if k in _STEPS)
    raise MemoryBudgetError(
        f"no settings fit {format_gib(budget_bytes)} for {model} at {seq_len} tokens: the smallest predicted peak is "
        f"{format_gib(plan.predicted_bytes)} (with {_describe(plan.settings)})."
        + (f" The longest max_seq_length that fits is {longest}." if longest else
           " Not even the shortest sequence fits: the weights alone need more.")
        + (f" Settings you fixed, which the planner left alone: {', '.join(fixed)}." if fixed else ""),
        plan, longest)


def _describe(s: dict) -> str:
    return ", ".join(f"{k}={s[k]}" for k in _STEPS) + f", grad_accum={s['grad_accum']}"


def _plan(model: str, seq_len: int, budget: int, user: dict) -> Plan:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes (got {budget!r})")
    unknown = set(user) - set(_STEPS) - set(_FIXED_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown memory settings {sorted(unknown)}; known: {sorted((*_STEPS, *_FIXED_DEFAULTS))}")
    # batch_size alone is the effective batch (splittable); with grad_accum it pins the micro-batch too
    fixed = {k for k in user if k in _STEPS and not (k == "batch_size" and "grad_accum" not in user)}
    s = {**_FIXED_DEFAULTS, "batch_size": 1, **user}
    effective = s["batch_size"] * s["grad_accum"]
    levels = {k: _levels(k, s) for k in _STEPS}
    start = {k: (s[k] if k in fixed else levels[k][0]) for k in _STEPS}
    s.update(start)

    def attempt(name, value) -> Plan:
        trial = {**s, name: value}
        if name == "batch_size":
            trial["grad_accum"] = effective // value
        return _predict(model, seq_len, trial, budget)

    plan = _predict(model, seq_len, s, budget)
    used = []
    for name in _STEPS:
        if plan.fits:
            break
        if name in fixed:
            continue
        for value in levels[name][1:]:
            trial = attempt(name, value)
            if trial.predicted_bytes < plan.predicted_bytes or trial.fits:
                plan, s = trial, trial.settings
            if plan.fits:
                break
        used.append(name)
    if plan.fits:  # ease graded settings taken further than the final step needed (costliest first)
        for name in reversed(used[:-1]):
            if name in _GRADED:
                for value in levels[name]:
                    if value == s[name]:
                        break
                    trial = attempt(name, value)
                    if trial.fits:
                        plan, s = trial, trial.settings
                        break
    if plan.fits and used and used[-1] == "gradient_checkpointing" and "checkpoint_layers" not in user \
            and s["gradient_checkpointing"] and not s["activation_offload"]:
        plan, s = _fewest_checkpointed_layers(model, seq_len, budget, plan)
    plan.changes = {k: (start_value, s[k]) for k, start_value in
                    {**start, "grad_accum": effective // start["batch_size"]}.items() if s[k] != start_value}
    if s["checkpoint_layers"] is not None and "checkpoint_layers" not in user:
        plan.changes["checkpoint_layers"] = (None, s["checkpoint_layers"])
    plan.notes = _notes(plan, fixed)
    return plan


def _fewest_checkpointed_layers(model: str, seq_len: int, budget: int, plan: Plan) -> tuple[Plan, dict]:
    """Checkpointing was the last setting the budget needed: recompute only as many decoder layers as it needs
    (the first k; the rest keep their activations), the smallest k whose prediction fits. Memory falls as k
    grows, so a bisection finds it; k = all layers is the plan given."""
    s = plan.settings
    total = len(read_model_shape(model, s["multimodal"], s["text_only"], s["finetune_experts"]).layers)
    best, low, high = plan, 0, total  # the answer lies in [low, high]; k = total is known to fit
    while low < high:
        k = (low + high) // 2
        trial = _predict(model, seq_len, {**s, "checkpoint_layers": k}, budget)
        if trial.fits:
            best, high = trial, k
        else:
            low = k + 1
    return best, best.settings  # best stays `plan` (checkpoint_layers None: all) when no smaller k fits


def _notes(plan: Plan, fixed: set) -> list[str]:
    s = plan.settings
    notes = []
    if "batch_size" in plan.changes:
        notes.append(f"micro-batch {s['batch_size']} × grad_accum {s['grad_accum']}: the same effective batch "
                     "and the same gradients, in more, smaller passes")
    if not s["gradient_checkpointing"] and plan.budget_bytes is not None:
        notes.append(f"without gradient checkpointing (not yet measured on a GPU) the plan keeps "
                     f"{1 - UNMEASURED_MARGIN:.0%} of the budget free")
    elif s["checkpoint_layers"] is not None and plan.budget_bytes is not None:
        notes.append(f"only the first {s['checkpoint_layers']} decoder layers recompute (the rest keep their "
                     "activations: faster)")
    if s["activation_offload"] and not s["gradient_checkpointing"]:
        notes.append("activation_offload only acts on checkpointed layer inputs; it has no effect without "
                     "gradient checkpointing")
    if s["mlp_chunk_size"] and s["mlp_chunk_size"] >= plan.seq_len * s["batch_size"]:
        notes.append(f"mlp_chunk_size {s['mlp_chunk_size']} is not below the micro-batch's tokens: no effect")
    return notes


def longest_context(model, budget_bytes: int, *, multiple_of: int = 1, **settings) -> int:
    """The longest seq_len (a multiple of `multiple_of`) that the planner can fit in `budget_bytes`; 0 if none.

    Settings given are kept fixed, the others planned, as in plan_memory. Bounded by the model's position limit.
    """
    model = str(model)
    limit = read_model_shape(model, settings.get("multimodal", False),
                             settings.get("text_only", False),
                             settings.get("finetune_experts", False)).max_position or 2**20
    step = max(1, int(multiple_of))

    def fits(seq: int) -> bool:
        return _plan(model, seq, budget_bytes, settings).fits

    lo, hi = 0, limit // step  # invariant: lo·step fits (or lo == 0), hi·step + step does not / is past the limit
    if not fits(step):
        return 0
    lo = 1
    if fits(hi * step):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


def with_settings(plan: Plan, **changes) -> Plan:
    """A copy of `plan` re-predicted with some settings changed (for what-if tables)."""
    return _predict(plan.model, plan.seq_len, {**plan.settings, **changes}, plan.budget_bytes)


__all__ = ["MemoryBudgetError", "PLANNED_SETTINGS", "Plan", "longest_context", "plan_memory", "predict",
           "with_settings"]
