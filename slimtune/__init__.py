"""slimtune: fine-tune Gemma 4 with LoRA and QLoRA — load → adapt → train → export.

    >>> import slimtune
    >>> model, tok = slimtune.load_model("path/to/gemma-4-E2B-it", load_in_4bit=True)
    >>> model = slimtune.add_lora(model, r=16, alpha=16)
    >>> slimtune.save_adapter(model, "my-adapter")

Public names are imported lazily so `slimtune --help` starts without importing torch.
"""

from __future__ import annotations

import importlib

from slimtune.utils.cuda_alloc import use_expandable_segments

use_expandable_segments()  # before torch starts CUDA's allocator; see slimtune/utils/cuda_alloc.py for why

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "slimtune.models.loader",
    "add_lora": "slimtune.adapt.inject",
    "save_adapter": "slimtune.adapt.adapter_io",
    "load_adapter": "slimtune.adapt.adapter_io",
    "TrainConfig": "slimtune.train.config",
    "train": "slimtune.train.run",
    "generate": "slimtune.infer.generate",
    "export": "slimtune.export",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")
