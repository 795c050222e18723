"""Memory engine: host-offloaded embeddings, memory estimates and plans."""

from slimtune.memory.estimate import estimate_training_memory

__all__ = ["estimate_training_memory"]
