"""Gemma 4 models: loading checkpoints, the variant geometry table and the tiny in-process test models."""
