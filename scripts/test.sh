#!/usr/bin/env bash
# Set up .venv with the test extras and run the CPU test suite (GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
SLIMTUNE_EXTRAS=",dev" bash scripts/setup.sh
[ -f scripts/ci_studio_deps.sh ] && bash scripts/ci_studio_deps.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
