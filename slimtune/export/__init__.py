"""Export fine-tuned Gemma 4 adapters: the adapter alone, merged HF checkpoints (16-bit, NF4) and GGUF.

Example::

    from slimtune.export import export, EXPORT_FORMATS
    export("runs/my-run", "merged-16bit", "exports/my-model")
"""

from slimtune.export.api import EXPORT_FORMATS, export

__all__ = ["EXPORT_FORMATS", "export"]
