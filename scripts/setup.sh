#!/usr/bin/env bash
# Create .venv and install slimtune into it (idempotent). On a machine without a GPU this takes the CPU build of
# torch 2.13.0; on a GPU machine install the torch build for your CUDA first, or set SLIMTUNE_TORCH to its spec.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "${SLIMTUNE_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[all${SLIMTUNE_EXTRAS:-}]"
