"""Run the pipeline on the embedded default dataset: simulate a hinged structure, reconstruct.

Example:
  dynamight demo --output-directory demo_output
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from . import reconstruct, simulate

logger = logging.getLogger(__name__)


def add_args(p) -> None:
    p.add_argument("--output-directory", default="demo_output")
    p.add_argument("--n-particles", type=int, default=2000)
    p.add_argument("--gpu-id", default=None)


def _sub_args(module, **values) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_args(parser)
    argv = []
    for key, value in values.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def main(args, control) -> None:
    out = Path(args.output_directory)
    t0 = time.time()
    logger.info("[1/2] simulate -> %s/data", out)
    simulate.main(_sub_args(simulate, output_directory=out / "data",
                            n_particles=args.n_particles), control)
    logger.info("[2/2] rigid reconstruction -> %s/reconstruct", out)
    reconstruct.main(_sub_args(reconstruct, refinement_star_file=out / "data" / "particles.star",
                               output_directory=out / "reconstruct",
                               mask_file=out / "data" / "mask.mrc", gpu_id=args.gpu_id), control)
    logger.info("demo finished in %.0f s; outputs in %s", time.time() - t0, out)
