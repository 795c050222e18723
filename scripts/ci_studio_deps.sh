#!/usr/bin/env bash
# Install what the Studio tests need, idempotently: the Studio's Python packages (fastapi, uvicorn), the test
# clients (httpx, the playwright Python package) and Debian's Chromium for the headless end-to-end tests.
# Playwright's own browser download ("playwright install") is never used: the tests drive /usr/bin/chromium.
# Without Chromium the e2e tests skip themselves with a message; nothing else depends on it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3; fi

need=()
"$py" -c "import fastapi" 2>/dev/null || need+=("fastapi>=0.110")
"$py" -c "import uvicorn" 2>/dev/null || need+=("uvicorn>=0.29")
"$py" -c "import httpx" 2>/dev/null || need+=("httpx>=0.27")
"$py" -c "import playwright.sync_api" 2>/dev/null || need+=("playwright>=1.45")
if [ ${#need[@]} -gt 0 ]; then
  echo "ci_studio_deps: pip install ${need[*]}"
  "$py" -m pip install -q "${need[@]}"
fi

if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "ci_studio_deps: apt-get install chromium"
  if ! { $sudo apt-get update -qq && $sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
    echo "ci_studio_deps: could not install chromium; the Studio e2e tests will be skipped" >&2
  fi
fi
