"""Shared by the attention tests (CPU and GPU files)."""

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; when ref is ~0 (e.g. dq of a 1-token row) the absolute norm."""
    out, ref = out.double(), ref.double()
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 1e-6 else 1.0)
