"""Fused kernels for Gemma 4 fine-tuning.

Each kernel lives in its own module, with a pure-torch reference next to it that tests use as ground truth and
the library falls back to on CPU or without Triton; Triton code sits in separate modules so that importing
slimtune never requires Triton. For example, ``linear_cross_entropy`` (chunked lm_head + softcapped
cross-entropy that never materialises the full ``(tokens, vocab)`` logits) runs its per-chunk elementwise part
in ``softcap_cross_entropy_triton`` on CUDA.
"""
