"""Adapt a loaded model: NF4 quantization, LoRA injection, adapter save/load."""

from slimtune.adapt.adapter_io import load_adapter, save_adapter
from slimtune.adapt.experts import LoraExperts, experts_modules
from slimtune.adapt.experts_nf4 import NF4Experts
from slimtune.adapt.inject import add_lora, select_lora_targets, trainable_parameters
from slimtune.adapt.lora import LoraLinear, lora_modules

__all__ = ["LoraExperts", "LoraLinear", "NF4Experts", "add_lora", "experts_modules", "load_adapter", "lora_modules",
           "save_adapter", "select_lora_targets", "trainable_parameters"]
