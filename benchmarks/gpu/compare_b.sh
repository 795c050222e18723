#!/usr/bin/env bash
# GPU call B: the Unsloth anchor on the same E2B-text random checkpoint geometry.
set -uo pipefail
export PYTHONPATH=$PWD/.gpu-site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ANCHOR_OUT=$OUT
timeout 560 python3 .anchors/probe_unsloth.py 2>&1 | grep '"probe"' | cut -c1-400
