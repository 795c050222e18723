"""`slimtune train --nproc N`: re-run the same command under torchrun (torch.distributed.run), N processes.

slimtune never starts worker processes itself: torchrun does (rendezvous, environment, failure handling), and
`train()` joins the process group it set up.
"""

from __future__ import annotations

import os
import subprocess
import sys

from slimtune.errors import ConfigError

_FLAG = "--nproc"


def _is_nproc_flag(token: str) -> bool:
    # argparse accepts unambiguous prefixes ("--npr 2"); "--np" is the shortest one no other flag shares.
    name = token.split("=", 1)[0]
    return len(name) >= 4 and _FLAG.startswith(name)


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without --nproc N / --nproc=N (the relaunched processes must not relaunch again)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        if _is_nproc_flag(token):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """The torch.distributed.run command that runs `slimtune <argv minus --nproc>` in nproc processes.

    --standalone gives the job its own rendezvous on a free local port, so two runs on one machine do not
    collide on torchrun's default port.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "slimtune", *strip_nproc(argv)]


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run the command under torchrun and return its exit status.

    Raises:
        ConfigError: nproc < 1, or this process already runs under torchrun.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes (got {nproc}).")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--nproc was given inside a torchrun job (WORLD_SIZE is set): drop --nproc, torchrun "
                          "already started the processes.")
    print(f"starting {nproc} processes: torchrun --nproc-per-node {nproc} -m slimtune "
          f"{' '.join(strip_nproc(argv))}", flush=True)
    return subprocess.call(torchrun_argv(nproc, argv))
