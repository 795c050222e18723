"""The CUDA allocator setting slimtune runs with: expandable segments, unless the user configured the allocator.

Why: a captured training step (CUDA graphs, on by default) allocates from its own memory pool, and while a capture
is under way the allocator cannot give cached blocks back to the driver. Blocks cached by the eager warm-up steps,
in segments that gradients or optimizer states keep partly in use, then sit idle beside the graph's pool. On an
H200 capped to a 24 GB card's 22.5 GiB, 31B QLoRA with graphs and 8-bit AdamW ran out of memory at capture with
1.95 GiB reserved but unused; with expandable segments (segments that map and unmap pages as they grow and shrink)
it trained at 20.24 GiB peak and 21.52 reserved. E2B's graphed step ran at the same speed (17,530 against 17,500
tokens/s) with 0.34 GiB less reserved (BENCHMARKS.md, session 11, calls Y and Y2).

torch reads the setting when CUDA's allocator starts, so it is set when slimtune is imported: `import slimtune`
before any CUDA work (the CLI, Studio and torchrun workers always do, since they inherit the environment).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

ENV_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.9 reads either; older ones the second
SETTING = "expandable_segments:True"


def use_expandable_segments(environ: MutableMapping[str, str] = os.environ, platform: str = sys.platform) -> bool:
    """Set PYTORCH_CUDA_ALLOC_CONF to expandable segments unless either allocator variable is already set (any
    value, even empty, is the user's choice). Linux only: elsewhere torch does not support them and would warn.
    Returns whether it set it."""
    if platform != "linux" or any(name in environ for name in ENV_NAMES):
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = SETTING
    return True
