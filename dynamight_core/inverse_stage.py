"""The inverse-deformation stage: each half's latent codes, the network method's epoch loop,
and the held-out accuracy of every available inverse.

A front end gives, per half set, the trained forward :class:`~.deformation_model.
DeformationModel` and the latent codes of its training and validation particles
(:class:`HalfCodes`, computed once); :class:`InverseTraining` trains the network inverses
(:mod:`.inverse_network`) epoch by epoch with progress callbacks, :func:`held_out_errors`
measures the network and fixed-point inverses (:mod:`.fixed_point_inverse`) on the validation
particles, and :func:`inverse_state` is the plain-data state the front end saves. The halves
never share anything.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .deformation_model import DeformationModel
from .distributed import HALVES
from .fixed_point_inverse import FixedPointInverse
from .inverse_network import InverseDeformationTrainer, InverseTrainerConfig
from .inversion_error import ErrorSummary, inversion_errors

logger = logging.getLogger(__name__)



class HalfCodes:
    """Mean latent codes of one half's training and validation particles, computed once from
    ``code_batches`` (an iterable of ``(b, d)`` codes for ``indices`` in order, ``indices`` =
    training particles then validation ones); rows of ``mu`` follow ``indices``."""

    def __init__(self, train: np.ndarray, validation: np.ndarray,
                 code_batches: Callable[[np.ndarray], Iterable[torch.Tensor]],
                 latent_dim: int, device: torch.device) -> None:
        self.train = np.asarray(train, dtype=np.int64)
        self.validation = np.asarray(validation, dtype=np.int64)
        self.indices = np.concatenate([self.train, self.validation])
        parts = list(code_batches(self.indices))
        self.mu = torch.cat(parts) if parts else torch.zeros(0, latent_dim, device=device)
        self._order = np.argsort(self.indices)

    def of(self, indices: np.ndarray) -> torch.Tensor:  # (b, d)
        rows = self._order[np.searchsorted(self.indices, indices, sorter=self._order)]
        return self.mu[torch.from_numpy(rows).to(self.mu.device)]


def decoded(model: DeformationModel, codes: HalfCodes, indices: np.ndarray, batch_size: int,
            check_abort: Callable[[], None] | None = None) -> Iterator[tuple]:
    """Batches ``(consensus (n_g, 3), displacements (b, n_g, 3), z (b, d), indices)``."""
    consensus = model.gaussians.positions.detach()
    for start in range(0, indices.shape[0], batch_size):
        if check_abort is not None:
            check_abort()
        idx = indices[start:start + batch_size]
        z = codes.of(idx)
        with torch.no_grad():
            d = model.displacements(z)
        yield consensus, d, z, idx  # outside no_grad: the consumer may train


def displacer(model: DeformationModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(gaussians (k,), z (b, d)) -> (b, k, 3)`` Å: the forward decoder on chosen Gaussians
    only (a mask-free copy of it, the movable mask applied to its output, which is what the
    decoder does with a mask)."""
    consensus = model.gaussians.positions.detach()
    mask = model.decoder.movable_mask
    free = copy.deepcopy(model.decoder)
    free.set_movable_mask(None)

    def displace(gaussians: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d = free(consensus[gaussians], z)
        return d if mask is None else d * mask[gaussians][None, :, None].to(d.dtype)
    return displace


@dataclass
class InverseEpochReport:
    epoch: int
    n_epochs: int
    stats: dict[int, dict[str, float]]  # half -> data, rms, smooth
    particles_per_s: float
    seconds_left: float


class InverseTraining:
    """The network inverses of both halves, trained epoch by epoch."""

    def __init__(self, models: dict[int, DeformationModel], codes: dict[int, HalfCodes],
                 trainers: dict[int, InverseDeformationTrainer], epoch: int = 0) -> None:
        self.models, self.codes, self.trainers, self.epoch = models, codes, trainers, epoch

    @classmethod
    def new(cls, models, codes, config: InverseTrainerConfig, device) -> InverseTraining:
        trainers = {h: InverseDeformationTrainer(h, config, codes[h].train, device)
                    for h in HALVES}
        return cls(models, codes, trainers)

    @classmethod
    def from_state(cls, models, codes, state: dict, device) -> InverseTraining:
        """Continue from :func:`inverse_state`; ``ValueError`` when a half was trained on
        other particles than ``codes`` holds."""
        trainers = {int(h): InverseDeformationTrainer.from_state_dict(s, device)
                    for h, s in state["halves"].items()}
        for half, trainer in trainers.items():
            if not np.array_equal(trainer.train_indices, codes[half].train):
                raise ValueError(f"half {half} was trained on other particles")
        return cls(models, codes, trainers, int(state["epoch"]))

    def run(self, n_epochs: int, batch_size: int, *,
            on_epoch: Callable[[InverseEpochReport], None] | None = None,
            check_abort: Callable[[], None] | None = None) -> int:
        """Train until ``n_epochs`` in total; ``on_epoch`` after each (e.g. to log and save
        :func:`inverse_state`). Returns the epochs completed."""
        n_train = sum(t.train_indices.shape[0] for t in self.trainers.values())
        displace = {h: displacer(self.models[h]) for h in self.trainers}
        t_start, first = time.time(), self.epoch
        while self.epoch < n_epochs:
            t0 = time.time()
            stats = {}
            for half, trainer in self.trainers.items():
                n = self.codes[half].train.shape[0]
                stats[half] = trainer.train_epoch(
                    self.codes[half].mu[:n], self.models[half].gaussians.positions.detach(),
                    displace[half], batch_size, check_abort=check_abort)
            self.epoch += 1
            if on_epoch is not None:
                left = (time.time() - t_start) / (self.epoch - first) * (n_epochs - self.epoch)
                on_epoch(InverseEpochReport(self.epoch, n_epochs, stats,
                                            n_train / max(time.time() - t0, 1e-9), left))
        return self.epoch


def held_out_errors(models: dict[int, DeformationModel], codes: dict[int, HalfCodes],
                    trainers: dict[int, InverseDeformationTrainer] | None, *, grid_size: int,
                    n_iterations: int, batch_size: int,
                    check_abort: Callable[[], None] | None = None) -> dict:
    """Held-out inversion error of each half (Å) for the fixed-point inverse and, with
    ``trainers``, the networks: ``{"1": {"displacement": ..., "fixed-point": {mean, p95, max,
    particles_per_s, ...}, "network": ...}, "2": ...}`` (:class:`.inversion_error.
    ErrorSummary`), logged as it goes."""
    result: dict = {}
    for half in HALVES:
        model, half_codes = models[half], codes[half]
        moved = ErrorSummary()
        for _, d, _, _ in decoded(model, half_codes, half_codes.validation, batch_size,
                                  check_abort):
            moved.add(d.norm(dim=-1))
        result[str(half)] = {"displacement": moved.as_dict()}
        if moved.n:
            logger.info("half %d: the validation particles' Gaussians move by %.3f Å on average "
                        "(95th percentile %.3f Å)", half, moved.mean, moved.percentile(95.0))
        methods: dict = {"fixed-point": None}
        if trainers:
            methods = {"network": trainers[half], **methods}
        for method, trainer in methods.items():
            summary, t0, n = ErrorSummary(), time.time(), 0
            for c, d, z, _ in decoded(model, half_codes, half_codes.validation, batch_size,
                                      check_abort):
                if trainer is not None:
                    def inverse(y, trainer=trainer, z=z):
                        return trainer.invert(y, z)
                else:
                    inverse = FixedPointInverse(c, d, model.box_size, model.pixel_size,
                                                grid_size=grid_size, n_iterations=n_iterations)
                summary.add(inversion_errors(inverse, c, d))
                n += int(z.shape[0])
            entry = summary.as_dict()
            entry["particles_per_s"] = n / max(time.time() - t0, 1e-9)
            result[str(half)][method] = entry
            if n:
                logger.info("held-out inversion error, half %d, %s (%d particles): mean %.3f Å, "
                            "95th percentile %.3f Å, max %.3f Å (%.0f particles/s)", half,
                            method, n, entry["mean"], entry["p95"], entry["max"],
                            entry["particles_per_s"])
            else:
                logger.info("half %d has no validation particles: no held-out error", half)
    return result


def inverse_state(method: str, epoch: int, settings: dict,
                  trainers: dict[int, InverseDeformationTrainer] | None, grid_size: int,
                  n_iterations: int, held_out: dict) -> dict:
    """The stage's plain-data state (:mod:`.inverse_checkpoint`)."""
    return {
        "method": method, "epoch": int(epoch), "config": settings,
        "halves": {str(h): (trainers[h].state_dict() if trainers else
                            {"half": h, "method": method, "grid_size": int(grid_size),
                             "n_iterations": int(n_iterations)})
                   for h in HALVES},
        "held_out": held_out}


__all__ = ["HalfCodes", "InverseEpochReport", "InverseTraining", "decoded", "displacer",
           "held_out_errors", "inverse_state"]
