"""The command lines RELION-5's DynaMight job runs parse with ``relion_dynamight``.

RELION-5 (``getCommandsDynaMightJob``) builds ``<exe> <command> ...`` with the reference
DynaMight's option names, appends the "additional arguments" after a space (so an empty field
leaves trailing blanks) and, because the executable's name contains ``relion_``,
``--pipeline-control <job>/`` (the python programs' dash spelling). Only parsing is checked here
(``build_parser().parse_args``); running the commands is tested elsewhere.
"""

from __future__ import annotations

import shlex

import pytest

from relion_external.cli import build_parser

JOB = "DynaMight/job012/"
CKPT = f"{JOB}forward_deformations/checkpoints/checkpoint_final.pth"
PARTS = "Refine3D/job010/run_data.star"
MAP = "Refine3D/job010/run_class001.mrc"

# (command line as RELION-5 writes it, expected values of the parsed arguments)
RELION5_COMMAND_LINES = [
    ((f"relion_dynamight optimize-deformations  --refinement-star-file {PARTS} "
      f"--output-directory {JOB} --initial-model {MAP} --n-gaussians 10000 "
      f"--regularization-factor 1 --n-threads 4 --gpu-id 0   --pipeline-control {JOB}"),
     {"command": "optimize-deformations", "refinement_star_file": PARTS,
      "output_directory": JOB, "initial_model": MAP, "n_gaussians": 10000,
      "regularization_factor": 1.0, "n_threads": 4, "gpu_id": "0", "preload_images": False,
      "initial_threshold": None, "pipeline_control": JOB}),
    ((f"relion_dynamight optimize-deformations  --refinement-star-file {PARTS} "
      f"--output-directory {JOB} --initial-model {MAP} --n-gaussians 30000 "
      f"--initial-threshold 0.012 --regularization-factor 0.5 --n-threads 12 --preload-images  "
      f"--gpu-id 1 --n-epochs 80  --pipeline-control {JOB}"),
     {"command": "optimize-deformations", "n_gaussians": 30000, "initial_threshold": 0.012,
      "regularization_factor": 0.5, "n_threads": 12, "preload_images": True, "gpu_id": "1",
      "n_epochs": 80}),
    # "Which GPU" left empty: no --gpu-id at all
    ((f"relion_dynamight optimize-deformations  --refinement-star-file {PARTS} "
      f"--output-directory {JOB} --initial-model {MAP} --n-gaussians 10000 "
      f"--regularization-factor 1 --n-threads 1  --pipeline-control {JOB}"),
     {"command": "optimize-deformations", "gpu_id": None}),
    ((f"relion_dynamight explore-latent-space {JOB} --half-set 1 --gpu-id 0  "
      f"--pipeline-control {JOB}"),
     {"command": "explore-latent-space", "output_directory": JOB, "half_set": 1,
      "checkpoint_file": None, "gpu_id": "0", "pipeline_control": JOB}),
    ((f"relion_dynamight explore-latent-space {JOB} --half-set 0 --checkpoint-file {CKPT} "
      f"--gpu-id 0  --pipeline-control {JOB}"),
     {"command": "explore-latent-space", "half_set": 0, "checkpoint_file": CKPT}),
    ((f"relion_dynamight optimize-inverse-deformations {JOB} --n-epochs 200 --gpu-id 0  "
      f"--pipeline-control {JOB}"),
     {"command": "optimize-inverse-deformations", "output_directory": JOB, "n_epochs": 200,
      "checkpoint_file": None, "save_deformations": False, "preload_images": False,
      "gpu_id": "0", "pipeline_control": JOB}),
    ((f"relion_dynamight optimize-inverse-deformations {JOB} --n-epochs 50 --checkpoint-file "
      f"{CKPT} --save-deformations  --preload-images --gpu-id 0  --pipeline-control {JOB}"),
     {"command": "optimize-inverse-deformations", "n_epochs": 50, "checkpoint_file": CKPT,
      "save_deformations": True, "preload_images": True}),
    ((f"relion_dynamight deformable-backprojection {JOB} --batch-size 10 --gpu-id 0  "
      f"--pipeline-control {JOB}"),
     {"command": "deformable-backprojection", "output_directory": JOB, "batch_size": 10,
      "checkpoint_file": None, "preload_images": False, "gpu_id": "0",
      "pipeline_control": JOB}),
    ((f"relion_dynamight deformable-backprojection {JOB} --batch-size 64 --checkpoint-file "
      f"{CKPT} --preload-images --gpu-id 0 --mask-file MaskCreate/job011/mask.mrc  "
      f"--pipeline-control {JOB}"),
     {"command": "deformable-backprojection", "batch_size": 64, "checkpoint_file": CKPT,
      "preload_images": True, "mask_file": "MaskCreate/job011/mask.mrc"}),
]


@pytest.mark.parametrize("line, expected", RELION5_COMMAND_LINES,
                         ids=[f"{i}-{c[1]['command']}" for i, c in
                              enumerate(RELION5_COMMAND_LINES)])
def test_relion5_command_line_parses(line, expected):
    argv = shlex.split(line)
    assert argv[0] == "relion_dynamight"
    args = build_parser().parse_args(argv[1:])
    parsed = {key: getattr(args, key, "<missing>") for key in expected}
    assert parsed == expected


def test_relion31_underscore_pipeline_control_is_accepted_too():
    args = build_parser().parse_args(
        ["deformable-backprojection", JOB, "--batch-size", "10", "--pipeline_control", JOB])
    assert args.pipeline_control == JOB
