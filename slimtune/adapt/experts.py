"""Expert LoRA: a low-rank update on the fused 3-D expert tensors of a MoE block (Gemma 4 26B-A4B).

Gemma4TextExperts keeps its experts as two nn.Parameters, ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I),
not as nn.Linear modules, so `LoraLinear` cannot wrap them. PEFT 0.21 adapts such tensors with
``target_parameters`` (lora.ParamWrapper); we use exactly its parameterisation so adapters move both ways:

    W'[e] = W[e] + s · B_e @ A_e              for a parameter of shape (E, out, in)
    A: (r·E, in)   A_e = A.view(E, r, in)[e]            (expert-major rows)
    B: (out, r·E)  B_e = B.view(out, r, E)[:, :, e]     (rank-major columns: PEFT's layout, kept as is)
    s = alpha / r  (alpha / √r with rsLoRA); A ~ kaiming-uniform(a=√5) like nn.Linear, B = 0

PEFT computes W' for all E experts on every forward (a parametrization) — a second copy of the whole expert
stack per layer, which checkpointed backward would even keep alive. `LoraExperts` instead replaces the experts
module and applies the update on the activations of the tokens routed to each expert:
x·W[e]ᵀ + s·(x·A_eᵀ)·B_eᵀ. Same function, no delta and no fp32 copy of the base is ever materialised.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from slimtune.adapt.experts_grouped import capture_problem, grouped_experts_forward, use_grouped

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # definition order in Gemma4TextExperts = PEFT's nesting order


def is_experts_module(module: nn.Module) -> bool:
    """A fused-experts block we know how to adapt, unwrapped: transformers' Gemma4TextExperts, or its NF4 stand-in
    (slimtune.adapt.experts_nf4.NF4Experts, which imports this module: hence the name check)."""
    return type(module).__name__ in ("Gemma4TextExperts", "NF4Experts")


def expert_linear(x: torch.Tensor, weight, expert: int) -> torch.Tensor:
    """x · W[expert]ᵀ for a 3-D expert weight: a 16-bit (E, out, in) tensor, or an NF4 stack (experts_nf4), which
    dequantizes only that expert, inside its own autograd node."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight[expert])  # a view of the frozen weight; autocast casts only this slice
    return weight.linear(x, expert)


def route_to_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     num_experts: int, run_expert) -> torch.Tensor:
    """Σ_k top_k_weights[t, k] · run_expert(top_k_index[t, k], x_t) for every token t, expert by expert.

    Tokens are sorted by expert once; `run_expert(expert, x (n, H)) -> (n, H)` is called only for experts that
    received tokens, each on its own slice. Expert ids >= num_experts (expert-parallel sentinels) contribute
    nothing, as in transformers' eager path.
    """
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # One host sync per block for the group sizes (transformers' eager path syncs on nonzero the same way).
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts].tolist()
    routed = sum(counts)
    order = order[:routed]  # sentinel ids (>= E) sort last and are dropped
    token = order // top_k
    x = hidden_states[token]
    pieces, start = [], 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pieces.append(run_expert(expert, x[start:start + count]))
        start += count
    out = torch.zeros_like(hidden_states)
    if not pieces:
        return out
    y = torch.cat(pieces) * top_k_weights.reshape(-1)[order, None]
    return out.index_add_(0, token, y.to(out.dtype))


class ExpertLora(nn.Module):
    """LoRA factors for one 3-D expert parameter (E, out, in), in PEFT's ParamWrapper layout (see module doc)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, *, r: int, alpha: float,
                 use_rslora: bool = False, device=None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # fp32 like LoraLinear: optimizer updates are not lost to bf16 rounding; autocast still runs 16-bit matmuls
        self.lora_A = nn.Parameter(torch.empty(r * num_experts, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r * num_experts, device=device, dtype=torch.float32))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear(in, r·E)'s kaiming-uniform(a=√5), as PEFT inits it
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A.copy_(a)
        self.lora_B.zero_()

    def factors(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per-expert (A_e (r, in), B_e (out, r)) views. unbind, not indexing: its backward is one stack, while
        E separate index backwards would each allocate and add a zero tensor the size of the whole factor."""
        a = self.lora_A.view(self.num_experts, self.r, self.in_features).unbind(0)
        b = self.lora_B.view(self.out_features, self.r, self.num_experts).unbind(2)
        return a, b

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · B_e @ A_e for every expert, fp32, shape (E, out, in): what merging adds to the base parameter."""
        a = self.lora_A.view(self.num_experts, self.r, self.in_features)
        b = self.lora_B.view(self.out_features, self.r, self.num_experts).permute(2, 0, 1)
        return torch.bmm(b, a) * self.scaling

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, rslora={self.use_rslora}")


class LoraExperts(nn.Module):
    """A frozen Gemma4TextExperts or NF4Experts (``base_layer``) plus `ExpertLora` factors on some of its 3-D
    parameters.

    Same call signature and result as the base block: (hidden (T, H), top_k_index (T, k), top_k_weights (T, k))
    -> (T, H), computed by `route_to_experts`. On an NF4 base the base product uses the dequantized expert weight
    (one expert at a time, see experts_nf4); the LoRA term is the same. On CUDA in bf16 (or when forced), both
    projections and their LoRA terms run as grouped GEMMs over all experts instead (experts_grouped).
    """

    def __init__(self, base_layer: nn.Module, params: list[str], *, r: int | dict, alpha: float | dict,
                 use_rslora: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_experts = base_layer.num_experts
        self.adapters = nn.ModuleDict()
        for name in EXPERT_PARAMS:  # fixed order: it decides the PEFT key nesting (see adapter_io)
            if name not in params:
                continue
            weight = getattr(base_layer, name)
            num_experts, out_features, in_features = weight.shape
            self.adapters[name] = ExpertLora(
                num_experts, out_features, in_features, r=r[name] if isinstance(r, dict) else r,
                alpha=alpha[name] if isinstance(alpha, dict) else alpha, use_rslora=use_rslora,
                device=weight.device, generator=generator)

    def _project(self, x: torch.Tensor, name: str, expert: int, base_w, lora) -> torch.Tensor:
        if lora is None:
            return expert_linear(x, base_w, expert)
        adapter = self.adapters[name]
        a, b = lora
        if not torch.is_grad_enabled():
            # Inference: fold this one expert's delta, W[e] + s·B_e@A_e, and run one matmul. Nothing is kept for
            # backward, the temporary is one expert's weight, and the arithmetic is PEFT's (bit-equal logits).
            # An NF4 base gives its dequantized expert weight (a temporary as well).
            w = base_w[expert] if isinstance(base_w, torch.Tensor) else base_w.dequantize(expert, x.dtype)
            return F.linear(x, torch.addmm(w, b[expert].to(w.dtype), a[expert].to(w.dtype), alpha=adapter.scaling))
        # Training: the update on the activations. Backward keeps only x and x·A_eᵀ (r columns); a folded weight
        # would be saved for backward, i.e. every routed expert's full delta alive at once.
        out = expert_linear(x, base_w, expert)
        # Outside autocast fp32 factors would meet 16-bit activations: cast the adapter input (as LoraLinear does)
        lora_in = x if torch.is_autocast_enabled(x.device.type) else x.to(adapter.lora_A.dtype)
        update = F.linear(F.linear(lora_in, a[expert]), b[expert]) * adapter.scaling
        return out + update.to(out.dtype)

    def _grouped_widths(self) -> tuple[int, int] | None:
        """The widths the grouped path checks, or None where it cannot run (trained expert weights: it takes frozen
        experts only)."""
        base = self.base_layer
        if any(isinstance(w, torch.Tensor) and w.requires_grad for w in (base.gate_up_proj, base.down_proj)):
            return None
        return base.down_proj.shape[1], base.down_proj.shape[2]

    def capture_problem(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why a CUDA graph on `device` cannot capture this block (None: it can); see experts_grouped."""
        widths = self._grouped_widths()
        if widths is None:
            return "its expert weights are trained (the grouped path takes frozen experts)"
        return capture_problem(device, dtype, widths)

    # Compiled decoder layers (slimtune.adapt.compile) call this eagerly: the group sizes are Python ints that
    # change every batch, on which dynamo would specialise and recompile each step.
    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        gate_up, down = base.gate_up_proj, base.down_proj
        widths = self._grouped_widths()
        if widths is not None and use_grouped(hidden_states, widths):
            # one grouped GEMM per projection over all experts (experts_grouped); the loop below is the reference
            adapter = {n: self.adapters[n] if n in self.adapters else None for n in EXPERT_PARAMS}
            return grouped_experts_forward(hidden_states, top_k_index, top_k_weights, self.num_experts, base.act_fn,
                                           gate_up, down, adapter["gate_up_proj"], adapter["down_proj"])
        lora = {n: a.factors() for n, a in self.adapters.items()}

        def run_expert(expert: int, x: torch.Tensor) -> torch.Tensor:
            h = self._project(x, "gate_up_proj", expert, gate_up, lora.get("gate_up_proj"))
            gate, up = h.chunk(2, dim=-1)
            return self._project(base.act_fn(gate) * up, "down_proj", expert, down, lora.get("down_proj"))

        return route_to_experts(hidden_states, top_k_index, top_k_weights, self.num_experts, run_expert)


def graph_capture_problems(model: nn.Module, dtype: torch.dtype, device: torch.device) -> list[str]:
    """Why a CUDA graph on `device` cannot capture the model's MoE blocks, one line per kind of problem (empty: it
    can, or there are none). Ours run sync-free on the grouped path (experts_grouped.capture_problem); transformers'
    own experts block reads which experts were hit on the host."""
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, LoraExperts)}
    problems: dict[str, str] = {}
    for name, module in model.named_modules():
        if id(module) in wrapped or not (isinstance(module, LoraExperts) or is_experts_module(module)):
            continue
        if hasattr(module, "capture_problem"):  # slimtune's blocks (LoraExperts, NF4Experts)
            why = module.capture_problem(device, dtype)
        else:
            why = ("transformers' experts block finds the experts hit on the host (16-bit experts without expert "
                   "LoRA; --finetune-experts or 4-bit loading gives slimtune's grouped blocks)")
        if why:
            problems.setdefault(why, f"MoE experts ({name}): {why}")
    return list(problems.values())


def experts_modules(model: nn.Module) -> dict[str, LoraExperts]:
    """All adapted expert blocks of a model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraExperts)}


def expert_targets(model: nn.Module, layers: set[int] | None, language_prefixes: tuple[str, ...]) -> list[str]:
    """Names of the plain expert blocks of the decoder layers (all, or those in `layers`)."""
    names = []
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        prefix = next((p for p in language_prefixes if name.startswith(p)), None)
        if prefix is None:
            continue
        if layers is not None and int(name[len(prefix):].split(".")[0]) not in layers:
            continue
        names.append(name)
    return names


def inject_expert_lora(model: nn.Module, targets: dict[str, list[str]], *, r: int, alpha: float,
                       use_rslora: bool, seed: int | None = 0, ranks: dict[str, int] | None = None,
                       alphas: dict[str, float] | None = None) -> None:
    """Swap each named experts block for a LoraExperts adapting the listed parameters.

    ranks / alphas are keyed by full parameter name (``<block>.gate_up_proj``), as adapter files pattern them.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, params in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        for p in base.parameters():
            p.requires_grad_(False)
        r_by = {p: (ranks or {}).get(f"{name}.{p}", r) for p in params}
        alpha_by = {p: (alphas or {}).get(f"{name}.{p}", alpha) for p in params}
        setattr(parent, child, LoraExperts(base, params, r=r_by, alpha=alpha_by, use_rslora=use_rslora,
                                           generator=generator))
