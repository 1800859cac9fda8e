"""The result of ``optimize-deformations``, loaded back for the stages that follow it.

``optimize-inverse-deformations``, ``deformable-backprojection`` and ``explore-latent-space``
are given only the output directory (RELION-5's DynaMight job calls them that way), so
everything they need comes from the forward checkpoint: both halves' models, the half sets and
validation flags, and the command's settings, among them the particles STAR file and the
project directory its image names are relative to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from dynamight_core.batch_prefetch import prefetch_batches
from dynamight_core.checkpoint import FINAL_NAME, latest_checkpoint, load_checkpoint
from dynamight_core.checkpoint_file import CheckpointError
from dynamight_core.deformation_model import Batch, DeformationModel
from dynamight_core.half_set_trainer import HalfSetTrainer
from dynamight_core.particles import ParticleSet

from .errors import InputError
from .particles_adapter import load_particle_set
from .star_io import RelionParticles

logger = logging.getLogger(__name__)

FORWARD_CHECKPOINTS = Path("forward_deformations") / "checkpoints"


@dataclass
class ForwardRun:
    """Both halves' trained models and the particles they were trained on."""

    output_directory: Path
    checkpoint_path: Path
    epoch: int  # epochs the checkpoint completed
    config: dict  # the optimize-deformations settings (plain values)
    trainers: dict[int, HalfSetTrainer]  # half (1, 2) -> trained state, model in eval mode
    particles: ParticleSet  # half sets as in the checkpoint
    star: RelionParticles  # the particles STAR file as read (all columns)
    validation: torch.Tensor  # (n,) bool, held out from training of both halves
    device: torch.device

    @property
    def models(self) -> dict[int, DeformationModel]:  # half -> model, eval mode, on the device
        return {half: trainer.model for half, trainer in self.trainers.items()}

    @property
    def half_set(self) -> np.ndarray:  # (n,) 1 or 2
        return self.particles.half_set.numpy()

    def members(self, half: int, *, include_validation: bool = True) -> np.ndarray:
        """0-based indices of the particles of ``half`` (optionally without validation ones)."""
        keep = self.half_set == half
        if not include_validation:
            keep &= ~self.validation.numpy()
        return np.flatnonzero(keep)

    def batches(self, indices: np.ndarray, batch_size: int, control=None) -> Iterator[Batch]:
        """Batches of exactly ``batch_size`` particles (the last one may be smaller, never
        dropped), polling ``control.check_abort()`` before each; read ahead in a background
        thread (:func:`dynamight_core.batch_prefetch.prefetch_batches`: the batches of
        ``make_batch``)."""
        indices = np.asarray(indices, dtype=np.int64)
        chunks = [indices[start:start + batch_size]
                  for start in range(0, indices.shape[0], batch_size)]
        yield from prefetch_batches(self.particles, chunks, self.device,
                                    before_each=None if control is None else control.check_abort)

    @torch.no_grad()
    def latents(self, half: int, batch: Batch) -> torch.Tensor:  # (b, d)
        """Latent code of each particle of ``batch`` under ``half``'s model: the one training
        stored for the half's own particles (as in particles.star), inferred through the model
        for any other particle."""
        return self.trainers[half].latents_for(batch)


def find_forward_checkpoint(output_directory: str | PathLike,
                            checkpoint_file: str | PathLike | None = None) -> Path:
    """``checkpoint_file`` if given, else ``checkpoint_final.pth`` (or the latest ``NNN.pth``)
    of ``output_directory``; :class:`InputError` when there is none."""
    out = Path(output_directory)
    if checkpoint_file:
        path = Path(checkpoint_file)
        if not path.is_file():
            raise InputError(path, "--checkpoint-file", "does not exist",
                             "Give a checkpoint written by optimize-deformations "
                             "(forward_deformations/checkpoints/*.pth).")
        return path
    final = out / FORWARD_CHECKPOINTS / FINAL_NAME
    if final.is_file():
        return final
    latest = latest_checkpoint(out / FORWARD_CHECKPOINTS)
    if latest is None:
        raise InputError(out, "forward_deformations/checkpoints",
                         "holds no checkpoint of optimize-deformations",
                         "Run `dynamight optimize-deformations --output-directory "
                         f"{out}` first, or pass --checkpoint-file.")
    logger.warning("%s has no checkpoint_final.pth (training did not finish): using %s",
                   out, latest)
    return latest


def load_forward_run(
    output_directory: str | PathLike,
    *,
    checkpoint_file: str | PathLike | None = None,
    device: torch.device | str = "cpu",
    preload_images: bool = False,
) -> ForwardRun:
    """Load the forward checkpoint and its particles (see module docstring)."""
    out = Path(output_directory)
    path = find_forward_checkpoint(out, checkpoint_file)
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise InputError(path, "checkpoint", err.problem,
                         "Give an intact checkpoint of optimize-deformations with "
                         "--checkpoint-file, or run optimize-deformations again (it continues "
                         "from its last intact checkpoint).") from err
    config = dict(state["config"])
    device = torch.device(device)
    star_path = _particles_star(out, path, config)
    project = config.get("project_directory")
    particles, star = load_particle_set(star_path, project_dir=project,
                                        random_split=bool(config.get("random_half_sets")),
                                        seed=int(config.get("seed", 0)), preload=preload_images)
    half_set = state["half_set"].long()
    if half_set.shape[0] != len(particles):
        raise InputError(star_path, "data_particles",
                         f"has {len(particles)} particles, the checkpoint {path} was trained "
                         f"on {half_set.shape[0]}",
                         "Use the particles STAR file the deformations were trained on.")
    particles = particles.with_half_set(half_set)
    trainers = {}
    for half, half_state in sorted(state["halves"].items()):
        try:
            trainer = HalfSetTrainer.from_state_dict(half_state, device)
        except ValueError as err:
            raise InputError(path, "checkpoint", str(err),
                             "Run optimize-deformations again with this version.") from err
        trainer.model.eval()
        trainers[int(half)] = trainer
    logger.info("loaded %s (epoch %d): %d particles, latent dimension %d", path,
                int(state["epoch"]), len(particles), trainers[1].config.latent_dim)
    return ForwardRun(output_directory=out, checkpoint_path=path, epoch=int(state["epoch"]),
                      config=config, trainers=trainers, particles=particles, star=star,
                      validation=state["validation"].bool(), device=device)


def _particles_star(out: Path, checkpoint: Path, config: dict) -> Path:
    given = config.get("refinement_star_file")
    if given and Path(given).is_file():
        return Path(given)
    ours = out / "particles.star"
    if ours.is_file():
        return ours
    raise InputError(Path(given) if given else checkpoint, "refinement_star_file",
                     "the particles STAR file the deformations were trained on is missing",
                     "Run from the RELION project directory the training ran in, or restore "
                     "the file.")


__all__ = ["ForwardRun", "find_forward_checkpoint", "load_forward_run"]
