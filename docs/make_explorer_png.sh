#!/usr/bin/env bash
# Re-make docs/explorer.png (the README's picture of the latent-space explorer) from a run like
# `dynamight demo`: the demo dataset, optimize-deformations as the demo runs it, then a
# screenshot (under Xvfb) of half set 1 with the map of a point of large motion.
# Needs the gui extra and xvfb-run; about 5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
dynamight simulate --output-directory "$work/data" --n-particles 2000
dynamight optimize-deformations --refinement-star-file "$work/data/particles.star" \
    --initial-model "$work/data/consensus_map.mrc" --output-directory "$work/dynamight" \
    --n-gaussians 3000 --n-epochs 20 --n-warmup-epochs 2 --n-threads 2
xvfb-run -a -s "-screen 0 2600x1200x24" python - "$work/dynamight" docs/explorer.png <<'PY'
import sys

import numpy as np

from relion_external.cli import configure_logging
from relion_external.latent_explorer import open_session
from relion_external.latent_explorer.viewer import save_screenshot

configure_logging()
session = open_session(sys.argv[1], 1)
amount = session.colouring("amount of motion")
save_screenshot(session, sys.argv[2], point=session.coords[np.argsort(amount)[-20]])
PY
