"""Launch shapes of slimtune's attention kernels: the tuned defaults, and smaller ones for GPUs that need them.

`KernelConfig` describes one kernel launch. `_config` picks the default for a head_dim (H200-tuned), `_fitting` runs
a launch with the first shape this GPU's shared memory can hold, and `_encode_configs`/`_decode_configs` carry the
three kernels' shapes through the registered torch ops as a flat int list.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from slimtune.errors import KernelUnavailableError

try:
    from triton.runtime.errors import OutOfResources as _OutOfResources
except ImportError:  # pragma: no cover - no Triton (nothing to catch) or a version without it
    _OutOfResources = ()


class KernelConfig(NamedTuple):
    """Launch shape of one kernel: rows per query block, keys per key block, warps, pipeline stages.

    ``transposed`` (dK/dV kernel only) accumulates dKᵀ/dVᵀ with the head dim as rows (see ``_dkdv_loop``);
    ``scratch`` cuts the def-use chain between the S/dP products and the next product (see ``_cut``): 0 off,
    1 through a per-program global scratch slot, 2 through an always-taken branch.
    ``variant`` picks a kernel structure: for "dq", bit 1 computes δ = rowsum(dO·O) inside the dQ kernel (no separate
    delta launch) and bit 2 loads V (for dP) before K so both share one shared-memory tile (BLOCK_N 64 fits at head_dim
    512); for "dkdv", 1 runs two kernels, one for dV and one for dK (one accumulator each, so BLOCK_N can be
    64 at head_dim 512: ``_flash_attention_bwd_triton``), 2 runs the single kernel with compile-time Q/dO row strides.
    For "dq", bit 4 selects the stored backward for layers without a window: the dQ kernel also writes P and dS
    (chunks of query rows), and dK/dV are products over them (``flash_attention_stored_bwd``; the "dkdv" config is
    then unused).
    0 (default) is the original single kernel in both cases.
    ``max_split`` ("dkdv" only) caps how many programs share one KV head's query heads (0: automatic, up to G when the
    key blocks alone do not fill the GPU). 1 never splits: no fp32 partials and no summing launch, which suits
    windowed layers whose key blocks all carry the same small amount of work.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    transposed: bool = False
    scratch: int = 0
    variant: int = 0
    max_split: int = 0


# Chosen per head_dim for the H200 (see benchmarks/kernels/ATTENTION_NOTES.md for the reasoning and the measurements).
# head_dim 512: a 64×512 fp32 accumulator is 128 KiB of registers, so 8 warps (128 registers each) and BLOCK_M=64;
# Q (64 KiB bf16) stays in shared memory and K/V tiles stream through the rest of the 227 KiB.
# dq variant 5 at head_dim 512: δ inside the dQ kernel, and the stored backward on layers without a window (dK/dV as
# products over the P and dS tiles the dQ kernel writes; H200, E2B full layer fwd+bwd 8K 10.91 → 9.41 ms with the
# default buffer budget, 32K 177.5 → 139.8 ms: results_gpu55_session13_K2_stored_bwd.log).
_CONFIGS: dict[int, dict[str, KernelConfig]] = {
    512: {"fwd": KernelConfig(64, 32, 8, 2, False, 2), "dq": KernelConfig(64, 32, 8, 1, False, 2, 5),
          "dkdv": KernelConfig(64, 32, 8, 1, True, 2)},
    256: {"fwd": KernelConfig(128, 64, 8, 2), "dq": KernelConfig(128, 32, 8, 2),
          "dkdv": KernelConfig(64, 64, 8, 2, True, 2)},
}
# Sliding-window layers at head_dim 256: compile-time Q/dO strides and no query-head split in dK/dV (every key block
# carries the same small amount of work). H200 sweep, E2B shape, window 512, T 8,192 (2026-11-29,
# results_gpu17_session5_attention_sweep.jsonl): dK/dV 0.340 → 0.230 ms, forward + backward 1.38 → 0.83 ms.
_WINDOWED: dict[int, dict[str, KernelConfig]] = {256: {"dkdv": KernelConfig(64, 64, 8, 2, True, 2, 2, 1)}}
_SMALL = {"fwd": KernelConfig(64, 64, 4, 2), "dq": KernelConfig(64, 64, 4, 2), "dkdv": KernelConfig(64, 64, 4, 2)}


# GPUs with less shared memory per block than the H200's 227 KiB (A100 163, RTX 30xx/40xx/L4 99): when a kernel
# does not fit (Triton raises OutOfResources before launching), the next of these smaller launch shapes is tried,
# and the one that fits is remembered per device. Shared memory at head_dim 512 (Triton 3.6, offline compile for
# sm89 in KiB; sm90 is the tuned default): forward 132 (default) / 100 / 98 / 66 / 32.5; dQ 192 / 128 / 96 / 64;
# dK/dV 136 / 104 / 80. So a 99 KiB card runs forward (32,32,4,2), dQ (32,16,4,1), dK/dV (16,16,4,1).
_SMALLER: dict[str, tuple[KernelConfig, ...]] = {
    "fwd": (KernelConfig(64, 32, 8, 1, False, 2), KernelConfig(32, 32, 4, 2), KernelConfig(32, 32, 4, 1),
            KernelConfig(16, 16, 4, 1)),
    "dq": (KernelConfig(64, 32, 8, 1, False, 2), KernelConfig(32, 32, 4, 1), KernelConfig(32, 16, 4, 1),
           KernelConfig(16, 16, 4, 1)),
    "dkdv": (KernelConfig(32, 32, 4, 1, True), KernelConfig(16, 32, 4, 1, True), KernelConfig(16, 16, 4, 1)),
}
_fitted: dict[tuple, KernelConfig] = {}


def _fitting(kind: str, cfg, q: torch.Tensor, run, smaller=None):
    """``run(config)`` with ``cfg`` or, where it needs more shared memory than this GPU has, the first of `smaller`
    (default: `_SMALLER[kind]`) that fits, remembered per device, head_dim, dtype and requested config."""
    key = (q.device, q.dtype, q.shape[-1], kind, cfg)
    fitted = _fitted.get(key)
    if fitted is not None:
        return run(fitted)
    if smaller is None:  # dQ's fused-delta bit must survive: _backward decided from it whether δ is computed first
        smaller = [c._replace(variant=cfg.variant & 1, max_split=cfg.max_split) if kind == "dq" else
                   c._replace(max_split=cfg.max_split) for c in _SMALLER[kind]]
    problems = []
    for candidate in (cfg, *smaller):
        try:
            out = run(candidate)
        except _OutOfResources as exc:
            problems.append(f"{tuple(candidate)[:4]}: {exc}")
            continue
        _fitted[key] = candidate
        return out
    raise KernelUnavailableError(
        f"slimtune attention: no {kind} kernel for head_dim {q.shape[-1]} fits this GPU's shared memory "
        f"({'; '.join(problems)[:600]}). Load the model with attention='sdpa' instead.")


def _config(head_dim: int, kind: str, override: dict[str, KernelConfig] | None, windowed: bool = False) -> KernelConfig:
    if override is not None and kind in override:
        return override[kind]
    if windowed and kind in _WINDOWED.get(head_dim, {}):
        return _WINDOWED[head_dim][kind]
    return _CONFIGS.get(head_dim, _SMALL)[kind]


_KINDS = ("fwd", "dq", "dkdv")


def _encode_configs(head_dim: int, override: dict[str, KernelConfig] | None, windowed: bool = False) -> list[int]:
    """The three kernels' launch shapes as the flat int list the registered ops take (8 ints per kernel)."""
    out: list[int] = []
    for kind in _KINDS:
        c = _config(head_dim, kind, override, windowed)
        out += [c.block_m, c.block_n, c.num_warps, c.num_stages, int(c.transposed), c.scratch, c.variant,
                c.max_split]
    return out


def _decode_configs(flat: list[int]) -> dict[str, KernelConfig]:
    return {kind: KernelConfig(*flat[8 * i: 8 * i + 4], bool(flat[8 * i + 4]), *flat[8 * i + 5: 8 * i + 8])
            for i, kind in enumerate(_KINDS)}
