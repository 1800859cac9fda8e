# Sourced by demo.sh and test.sh: install torch (CPU build where that is what the machine
# offers, the normal build elsewhere) before the package, so pip does not pull CUDA wheels.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch"
  "$PY" -m pip install -q torch==2.13.0 || "$PY" -m pip install -q torch
fi
