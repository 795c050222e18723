"""The training loss: summed next-token cross-entropy over target tokens, without materialising full logits.

The decoder body (`model.model`) returns hidden states; the tied lm_head and Gemma 4's logit softcap are applied
chunk by chunk inside `linear_cross_entropy`. Returning a SUM lets the loop divide by the token count of the
whole accumulation window (and all ranks) exactly once.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.kernels.linear_cross_entropy import linear_cross_entropy

_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_position_ids", "input_features",
                 "input_features_mask", "mm_token_type_ids", "position_ids")


def softcap_of(model: nn.Module) -> float | None:
    """Final-logit softcap of the text model (30 on Gemma 4), or None."""
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states (B, T, H) of the decoder for a batch (no cache: training)."""
    inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
    return model.model(**inputs, use_cache=False).last_hidden_state


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) over the batch's target tokens."""
    hidden = hidden_states(model, batch)
    weight = model.get_output_embeddings().weight
    # slimtune_static_loss: set by CUDA-graph steps (slimtune.train.cuda_graph), which cannot drop ignored rows
    return linear_cross_entropy(hidden, weight, batch["targets"].to(hidden.device), softcap=softcap_of(model),
                                chunk_size=getattr(model, "slimtune_loss_chunk_size", None),
                                static_shapes=getattr(model, "slimtune_static_loss", False))
