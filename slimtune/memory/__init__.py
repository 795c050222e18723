"""Memory engine: host-offloaded embeddings, the peak-memory estimate and the planner that fits a budget."""

from slimtune.memory.estimate import estimate_training_memory
from slimtune.memory.planner import MemoryBudgetError, Plan, longest_context, plan_memory, predict
from slimtune.memory.sizes import parse_memory_size

__all__ = ["MemoryBudgetError", "Plan", "estimate_training_memory", "longest_context", "parse_memory_size",
           "plan_memory", "predict"]
