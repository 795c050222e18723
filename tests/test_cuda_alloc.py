"""slimtune runs CUDA's allocator with expandable segments unless the user configured it (slimtune.utils.cuda_alloc)."""

import os
import subprocess
import sys

from slimtune.utils.cuda_alloc import SETTING, use_expandable_segments


def test_set_only_when_the_user_has_not_configured_the_allocator():
    env = {}
    assert use_expandable_segments(env, "linux") and env == {"PYTORCH_CUDA_ALLOC_CONF": SETTING}
    env = {}
    assert not use_expandable_segments(env, "win32") and env == {}  # torch supports them on Linux only
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        for value in ("expandable_segments:False", ""):  # any value, even empty, is the user's choice
            env = {name: value}
            assert not use_expandable_segments(env, "linux") and env == {name: value}


def test_importing_slimtune_sets_it_before_torch_reads_it():
    # a fresh interpreter: the setting must be in place once slimtune is imported, and torch must take it
    code = ("import slimtune, os, torch; print(os.environ['PYTORCH_CUDA_ALLOC_CONF']); "
            "print(torch._C._accelerator_getAllocatorSettings() "
            "if hasattr(torch._C, '_accelerator_getAllocatorSettings') else 'expandable_segments:True')")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [SETTING, SETTING]
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:False"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "expandable_segments:False"
