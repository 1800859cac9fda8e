#!/usr/bin/env bash
# Install dynamight-relion and run the pipeline on the embedded default dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
"$PY" -m pip install -q -e .
"$PY" -m relion_external.cli demo --output-directory "${1:-demo_output}"
