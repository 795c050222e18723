"""Inference helpers: chat generation with the model's own chat template, streaming, stop strings, media."""

from slimtune.infer.generate import generate, validate_sampling

__all__ = ["generate", "validate_sampling"]
