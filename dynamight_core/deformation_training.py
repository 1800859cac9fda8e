"""The forward-deformation stage: both half sets trained epoch by epoch, stopped, checkpointed.

:class:`DeformationTraining` owns what a front end should not have to: the epoch loop over the
two :class:`~.half_set_trainer.HalfSetTrainer` objects, the held-out residual and early stopping
(:mod:`.early_stopping`, both halves stop together), checkpoint state (:mod:`.checkpoint`:
written every ``checkpoint_interval`` epochs, at the last epoch and when stopping early, the
newest ``keep_checkpoints`` kept), continuing from a checkpoint, the final latent codes and the
validation disagreement of the halves. A front end reads its files into a
:class:`~.particles.ParticleSet` and an initial Gaussian model, calls :meth:`start` or
:meth:`resume`, :meth:`run` and :meth:`finish`, and writes its own outputs from the epoch
reports and the returned trainers.

Several processes (:mod:`.distributed`): every process builds the same object with its
:class:`~.distributed.ProcessLayout`; a process trains only its half set, on its share of each
batch (:mod:`.batches`). Per epoch the world agrees on the losses and the stopping decision; checkpoints hold
both halves' whole state (gathered on rank 0, which alone writes files), so a run continues on
any number of processes. Abort requests are agreed on per batch within a half's processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batches import batches
from .checkpoint import (
    FINAL_NAME,
    epoch_checkpoint_name,
    prune_checkpoints,
    save_checkpoint,
)
from .deformation_model import Batch, deformation_error, split_validation
from .distributed import HALVES, SINGLE, Group, ProcessLayout
from .early_stopping import EarlyStopping
from .gaussian_model import GaussianModel
from .half_set_trainer import HalfSetTrainer, TrainerConfig
from .particles import ParticleSet

logger = logging.getLogger(__name__)

STAT_KEYS = ("data", "mse", "reg", "kl", "regularization_weight")


@dataclass
class Schedule:
    """How long to train, how to stop, when to checkpoint."""

    n_epochs: int = 50  # in total, warm-up included
    batch_size: int = 100  # particles per step (split between a half's processes)
    checkpoint_interval: int = 5
    keep_checkpoints: int = 3  # newest NNN.pth kept; 0 = all
    early_stopping_patience: int = 10  # joint epochs without improvement; 0 = never
    early_stopping_min_fraction: float = 0.05
    early_stopping_min_epochs: int = 15

    def stopping(self) -> EarlyStopping:
        return EarlyStopping(self.early_stopping_patience, self.early_stopping_min_fraction,
                             self.early_stopping_min_epochs)


@dataclass
class EpochReport:
    """What one epoch did, for the front end's log (given on rank 0)."""

    epoch: int
    n_epochs: int
    warmup: bool
    stats: dict[int, dict[str, float]]  # half -> per-particle means (STAT_KEYS)
    residual: float  # held-out residual, both halves (NaN in warm-up)
    particles_per_s: float
    seconds_left: float
    correlation_times: dict[int, float] | None  # temporal prior's τ per half
    stopped_early: bool
    stopping: EarlyStopping


class DeformationTraining:
    """Both halves' training (module docstring)."""

    def __init__(self, particles: ParticleSet, device: torch.device, schedule: Schedule,
                 settings: dict, *, layout: ProcessLayout = SINGLE,
                 checkpoint_folder: str | Path | None = None,
                 check_abort: Callable[[], None] | None = None) -> None:
        self.particles = particles
        self.device = torch.device(device)
        self.schedule = schedule
        self.settings = dict(settings)  # the front end's settings, stored in checkpoints
        self.layout = layout
        self.checkpoint_folder = None if checkpoint_folder is None else Path(checkpoint_folder)
        self._check_abort = check_abort or (lambda: None)
        self.trainers: dict[int, HalfSetTrainer] = {}  # the halves of this process
        self.validation = torch.zeros(len(particles), dtype=torch.bool)
        self.epoch = 0
        self.stopping = schedule.stopping()
        self.stopped_early = False
        self.latents_final = False  # the stored final codes belong to the current models

    # -- setting up -----------------------------------------------------------------------
    def start(self, gaussians: GaussianModel, config: TrainerConfig, *,
              movable: torch.Tensor | None = None, validation_fraction: float = 0.1,
              seed: int = 0, tracks: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """A new run: validation particles drawn per half (whole tracks with ``tracks``), both
        halves from ``gaussians`` (rank 0's copy on every process), noise from the consensus."""
        layout = self.layout
        if layout.parallel:  # every process starts from rank 0's model
            shared = layout.broadcast_object({
                "gaussians": {k: v.cpu() for k, v in gaussians.state_dict().items()},
                "movable": None if movable is None else movable.cpu()})
            gaussians.load_state_dict(shared["gaussians"])
            movable = shared["movable"]
        self.validation = split_validation(self.particles.half_set, validation_fraction, seed,
                                           groups=None if tracks is None else tracks[0])
        half_set = self.particles.half_set.numpy()
        for half in layout.halves:
            members = half_set == half
            train = np.flatnonzero(members & ~self.validation.numpy())
            held = np.flatnonzero(members & self.validation.numpy())
            trainer = HalfSetTrainer(half, config, gaussians, train, self.device, movable, held)
            if tracks is not None:
                trainer.set_tracks(*tracks)
            self._join(trainer)
            trainer.initialise_noise(self._batches(half, train[:512]))
            self.trainers[half] = trainer
        self.epoch = 0

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint's ``state`` (:func:`.checkpoint.load_checkpoint`), made
        by any number of processes. The half sets are the checkpoint's."""
        self.particles = self.particles.with_half_set(state["half_set"].long())
        self.validation = state["validation"].bool()
        self.epoch = int(state["epoch"])
        for half in self.layout.halves:
            trainer = HalfSetTrainer.from_state_dict(state["halves"][str(half)], self.device)
            self._join(trainer)
            self.trainers[half] = trainer
        torch.set_rng_state(state["global_rng"])  # unused by training; restored for completeness
        if "early_stopping" in state:  # the rule's settings are this run's
            self.stopping.load_state_dict({
                k: v for k, v in state["early_stopping"].items()
                if k not in ("patience", "min_fraction", "min_epochs")})
        self.stopped_early = (bool(state.get("stopped_early", False))
                              and self.schedule.early_stopping_patience > 0)
        # codes finalised for exactly these models (a finished run run again): kept
        self.latents_final = all(t.final_latents is not None for t in self.trainers.values()) \
            and (self.stopped_early or self.epoch >= self.schedule.n_epochs)
        if self.stopped_early:
            logger.info("training stopped early at epoch %d (held-out residual best at epoch "
                        "%d); not training further (--early-stopping-patience 0 continues to "
                        "--n-epochs)", self.epoch, self.stopping.best_epoch)

    def _join(self, trainer: HalfSetTrainer) -> None:
        group = self.layout.groups[trainer.half]
        if group.parallel:
            n = trainer.train_indices.shape[0]
            if min(n, self.schedule.batch_size) < group.size:
                raise ValueError(f"half set {trainer.half}: {n} training particles and batches "
                                 f"of {self.schedule.batch_size} cannot be shared by "
                                 f"{group.size} processes")
            trainer.set_group(group)

    # -- batches --------------------------------------------------------------------------
    def _batches(self, half: int, indices: np.ndarray, *, share: bool = True
                 ) -> Iterator[Batch]:
        """Batches of ``indices`` (``batch_size`` each, the last smaller), this process's share
        of each when the half trains on several (``share``), polling for an abort first."""
        return batches(self.particles, indices, self.schedule.batch_size, self.device,
                       group=self.layout.groups[half] if share else Group(),
                       check_abort=self._check_abort)

    def _held_out(self, half: int) -> np.ndarray:
        return np.flatnonzero(self.validation.numpy()
                              & (self.particles.half_set.numpy() == half))

    # -- training -------------------------------------------------------------------------
    @property
    def n_training_particles(self) -> int:
        """Training particles of both halves."""
        half_set = self.particles.half_set.numpy()
        return int(((half_set == 1) | (half_set == 2)).sum() - self.validation.sum())

    def run(self, on_epoch: Callable[[EpochReport], None] | None = None,
            on_checkpoint: Callable[[int, dict[int, GaussianModel]], None] | None = None
            ) -> None:
        """Train until ``n_epochs`` or early stopping; ``on_epoch`` gets each epoch's report
        and ``on_checkpoint`` both halves' consensus Gaussians at each checkpoint (rank 0)."""
        layout, schedule = self.layout, self.schedule
        t_start, first_epoch = time.time(), self.epoch
        n_train = self.n_training_particles
        while self.epoch < schedule.n_epochs and not self.stopped_early:
            t0 = time.time()
            local = {}
            for half, trainer in self.trainers.items():
                if trainer.needs_decoder_start:
                    trainer.start_decoder_from_modes(
                        self._batches(half, trainer.train_indices),
                        self._batches(half, trainer.known_indices))
                order = trainer.epoch_order()
                local[half] = trainer.train_epoch(self._batches(half, order), order)
            warmup = bool(next(iter(local.values()))["warmup"])
            residuals = {}
            if not warmup:
                residuals = {h: t.evaluate(self._batches(h, self._held_out(h)))
                             for h, t in self.trainers.items()}
            self.epoch += 1
            stats, residual, taus = self._agree(local, residuals, warmup)
            if not warmup:
                self.stopped_early = self.stopping.update(self.epoch, residual)
            rate = n_train / max(time.time() - t0, 1e-9)
            left = ((time.time() - t_start) / (self.epoch - first_epoch)
                    * (schedule.n_epochs - self.epoch))
            if layout.is_main and on_epoch is not None:
                on_epoch(EpochReport(self.epoch, schedule.n_epochs, warmup, stats, residual,
                                     rate, left, taus, self.stopped_early, self.stopping))
            if (self.epoch % max(1, schedule.checkpoint_interval) == 0
                    or self.epoch == schedule.n_epochs or self.stopped_early):
                states = self._gather_states()
                if states is not None:
                    self._save(epoch_checkpoint_name(self.epoch), states)
                    if self.checkpoint_folder is not None:
                        prune_checkpoints(self.checkpoint_folder, schedule.keep_checkpoints)
                    if on_checkpoint is not None:
                        on_checkpoint(self.epoch, _gaussians_of(states))

    def _agree(self, local: dict, residuals: dict, warmup: bool):
        """Both halves' statistics, the summed held-out residual and τ on every process."""
        layout = self.layout
        width = len(STAT_KEYS) + 3
        values = [0.0] * (2 * width)
        for half, stats in local.items():
            if not layout.is_leader(half):
                continue
            trainer = self.trainers[half]
            row = [stats[k] for k in STAT_KEYS] + [
                residuals.get(half, 0.0), 1.0,
                trainer.temporal.correlation_time if trainer.temporal is not None else 0.0]
            values[(half - 1) * width:half * width] = row
        values = layout.sum_numbers(values)
        stats, taus, residual = {}, {}, 0.0
        for half in HALVES:
            row = values[(half - 1) * width:half * width]
            stats[half] = dict(zip(STAT_KEYS, row[:len(STAT_KEYS)], strict=True))
            residual += row[len(STAT_KEYS)]
            taus[half] = row[len(STAT_KEYS) + 2]
        temporal = any(t.temporal is not None for t in self.trainers.values())
        return stats, float("nan") if warmup else residual, taus if temporal else None

    # -- checkpoints ------------------------------------------------------------------------
    def _gather_states(self) -> dict[int, dict] | None:
        """Both halves' ``state_dict`` on rank 0 (None elsewhere)."""
        return self.layout.gather_halves({h: t.state_dict() for h, t in self.trainers.items()})

    def checkpoint_state(self, states: dict[int, dict]) -> dict:
        """The checkpoint (:mod:`.checkpoint`) of both halves' ``states``."""
        halves = {str(h): dict(states[h]) for h in HALVES}
        first, second = halves["1"]["initial_positions"], halves["2"]["initial_positions"]
        if torch.equal(first, second):  # the common initial model: saved once
            halves["2"]["initial_positions"] = first
        return {"epoch": self.epoch, "config": self.settings,
                "half_set": self.particles.half_set.to(torch.int8),
                "validation": self.validation.clone(), "global_rng": torch.get_rng_state(),
                "early_stopping": self.stopping.state_dict(),
                "stopped_early": self.stopped_early, "halves": halves}

    def _save(self, name: str, states: dict[int, dict]) -> None:
        if self.checkpoint_folder is not None:
            save_checkpoint(self.checkpoint_folder / name, self.checkpoint_state(states))

    # -- the end ----------------------------------------------------------------------------
    def finish(self) -> dict[int, HalfSetTrainer] | None:
        """Final latent codes of every particle under its half's final model (two damped
        Gauss-Newton steps from the stored ones, unless already final), the final checkpoint,
        and on rank 0 both halves' trainers (None on the other processes)."""
        if not self.latents_final:
            t0 = time.time()
            half_set = self.particles.half_set.numpy()
            for half, trainer in self.trainers.items():
                trainer.finalise_latents(self._batches(half, np.flatnonzero(half_set == half)))
            logger.info("latent codes of all %d particles under the final models (%.0f s)",
                        len(self.particles), time.time() - t0)
            self.latents_final = True
        states = self._gather_states()
        if states is None:
            return None
        self._save(FINAL_NAME, states)
        trainers = dict(self.trainers)
        for half in HALVES:
            if half not in trainers:
                trainers[half] = HalfSetTrainer.from_state_dict(states[half], self.device)
        _log_consensus_agreement(trainers)
        return trainers

    def validation_error(self, trainers: dict[int, HalfSetTrainer]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Both halves' models applied to the validation particles (rank 0, after
        :meth:`finish`): per-particle mean ``|d1 - d2|`` (Å), its particle indices, and the
        per-Gaussian mean (:func:`.deformation_model.deformation_error`)."""
        held = np.flatnonzero(self.validation.numpy())
        return deformation_error(trainers[1].model, trainers[2].model, trainers[1].latents_for,
                                 trainers[2].latents_for, self._batches(1, held, share=False))


def _gaussians_of(states: dict[int, dict]) -> dict[int, GaussianModel]:
    models = {}
    for half, state in states.items():
        config = state["config"]
        model = GaussianModel.from_config({"n_gaussians": config["n_gaussians"],
                                           "n_classes": config["n_classes"]})
        model.load_state_dict(state["gaussians"])
        models[half] = model
    return models


def _log_consensus_agreement(trainers: dict[int, HalfSetTrainer]) -> None:
    """How far apart the two halves' consensus models are (they start identical and are kept
    in the same conformation by the anchored consensus update)."""
    with torch.no_grad():
        p1, p2 = (trainers[h].model.gaussians.positions.detach().cpu() for h in HALVES)
        gap = (p1 - p2).norm(dim=-1)
    logger.info("consensus models of the two halves differ by %.3f Å on average "
                "(95th percentile %.3f Å)", float(gap.mean()), float(gap.quantile(0.95)))


__all__ = ["DeformationTraining", "EpochReport", "Schedule"]
