#!/usr/bin/env bash
# Install everything the tests need (RELION 3.1 from Debian, torch, the package with its dev
# extra) and run the default test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v relion_reconstruct >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[install] relion (Debian package, the independent reference for the tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion >/dev/null
  else
    echo "[install] cannot install RELION here (needs root and apt-get): RELION tests will skip"
  fi
fi
source scripts/_install.sh
"$PY" -m pip install -q -e ".[dev]"
exec "$PY" -m pytest "$@"
