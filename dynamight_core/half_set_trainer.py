"""Training of one half set's deformation model; one independent object per half set.

Independence: a trainer owns its Gaussian model (a copy of the common initial model), decoder,
the latent codes of its own particles, optimiser, noise estimate and two generators
(``shuffle`` on the CPU for the data order, ``sample`` on the device for the posterior draws).
It never touches the other half's tensors, so the two trainers could sit on different GPUs or
processes. Everything random comes from those generators (network initialisation uses
``torch.random.fork_rng`` with a seed derived from ``config.seed`` and the half), so a run
restored from :meth:`state_dict` continues exactly.

Latent codes (:mod:`dynamight_core.latent_inference`): every particle the trainer knows (its
training particles and, when given, its validation particles) has a code ``z`` in a table,
starting at the prior mean 0. Each time a training particle is visited, one Gauss-Newton step
through the current model (the decoder's forward-mode derivatives and one extra render per
latent dimension in use; no backward pass) moves its stored code towards the posterior mode, and the
decoder trains on a draw from the new Gaussian posterior ``N(z, H⁻¹)`` (its precision ``H``
comes from that step and is not stored, except for the temporal prior's fit: the next visit
computes it afresh): variational
EM with a Laplace posterior instead of an encoder network. Codes of validation
particles (never trained on) and of particles the trainer does not know are inferred with the
model fixed (:meth:`HalfSetTrainer.infer`: damped Gauss-Newton steps, ``inference_steps`` from
0). With :meth:`HalfSetTrainer.set_tracks` (time series), the prior of a tracked particle's
code is its temporal prior given the stored codes of its neighbours in time
(:mod:`dynamight_core.temporal_prior`), and the correlation time is refitted after every joint
epoch from the training particles' posteriors.

Schedule (epochs counted from 0):

- ``epoch < n_warmup_epochs``: warm-up. Only the Gaussian parameters (positions, widths,
  masses) train against the images; the decoder is not evaluated (zero displacement).
- afterwards: joint training of decoder and Gaussian parameters (positions included: the
  decoder is anchored at ``z = 0``, so the consensus positions are the conformation at the
  centre of the latent distribution and sharpen there, where the consensus map had the moving
  parts blurred over their range of motion), latent codes inferred as above. Before the first
  joint epoch, with ``decoder_start = "motion-modes"`` (the command's default), the decoder is
  fitted to the half set's leading motion modes and the codes start at their posterior means
  along them (:meth:`HalfSetTrainer.start_decoder_from_modes`, :mod:`.motion_modes`), so
  training starts from a latent space that already carries the largest motions. A dimension
  beyond the first whose mode is within the noise (:func:`.motion_modes.significant_modes`) is
  not used for the rest of the run: its code sees no data (``active_dims``), stays 0 and its
  draws are 0. With
  ``"zero"`` the freshly built decoder outputs zero, so on the first joint epoch it learns from
  draws of the prior (random codes that break the symmetry; from then on inference and decoder
  sharpen each other; at low SNR this bootstrap takes tens of epochs).
- λ (the regularisation weight) is set once per epoch, on the epoch's first batch, from the
  gradient-norm ratio of the data and regularisation terms over the decoder parameters times
  ``regularization_factor`` (:func:`.regularization.gradient_norm_ratio_lambda`, or its signal
  part, :func:`.regularization.signal_ratio_lambda`). With ``lambda_smoothing`` the two terms
  are running averages over the epochs' first batches: one batch's estimate of the signal is
  noisy at low SNR (at SNR 0.02 a fifth of single-batch estimates are 0).
- the neighbour graph's edges are those of the starting model (``initial_positions``, the same
  in both halves) for the whole run, their rest lengths the current consensus's, taken at
  every epoch start. A graph rebuilt from the drifting consensus gained a few edges across the
  moving interface, whose length the motion itself changes: at SNR 0.02 one rebuild raised the
  regulariser 4.5-fold before any step, and the epoch that followed blew up (regulariser ×400,
  held-out residual worse than at the start; ``benchmarks/RESULTS.md``, *Blow-ups in the
  middle of training*). The repulsion pairs are found from the consensus at every epoch start.
- consensus update, after every ``consensus_update_interval``-th joint epoch: the latent code
  of every training particle seen in the epoch is decoded; the
  ``consensus_update_fraction`` of particles whose deformed model lies closest (mean distance
  per Gaussian) to the *initial* model, the one both halves started from, are taken and the
  consensus positions are replaced by the mean of their deformed positions
  (``consensus + mean d``). Anchoring the choice to the common starting model keeps the two
  halves' consensus models in the same conformation (the one of the data nearest the consensus
  refinement) without either half seeing the other's particles; choosing the particles least
  displaced from the *current* consensus would let each half drift on its own. The decoder is
  left as is (its displacements are small for those particles, so the shift of its inputs is
  small too).
- :meth:`evaluate` gives the data term on held-out particles at their inferred codes (no
  sampling, no gradients; the decoder never trains on them): the early-stopping signal of the
  command.
- the noise spectrum used in an epoch is estimated from the previous epoch's residuals
  (or from :meth:`initialise_noise` before the first epoch).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.profiler import record_function

from .decoder import DeformationDecoder
from .deformation_model import Batch, DeformationModel, negative_log_likelihood, noise_normalisation
from .device import adam, load_adam_state
from .distributed import Group
from .gaussian_model import GaussianModel
from .latent_inference import (
    gauss_newton_step,
    gauss_newton_system,
    infer_latents,
    likelihood_pixel_weights,
    posterior_kl,
    sample_posterior,
)
from .motion_modes import (
    MODE_SIGNIFICANCE,
    default_cluster_count,
    fit_decoder_to_modes,
    motion_modes,
    significant_modes,
)
from .noise_model import RadialNoiseEstimate
from .regularization import (
    build_neighbour_graph,
    distance_preservation_loss,
    gradient_ratio_terms,
    mean_neighbour_distance,
    repulsion_candidate_pairs,
    repulsion_loss,
    rest_lengths,
    signal_ratio_terms,
    smoothed_lambda,
)
from .temporal_prior import TemporalPrior, TrackLayout

# labels of the parts of a training step, for torch.profiler (benchmarks/
# bench_optimize_deformations.py --profile); "dm::data" is the wait for the next batch
PROFILE_LABELS = ("dm::data", "dm::codes", "dm::forward", "dm::loss", "dm::backward",
                  "dm::optimiser", "dm::statistics")


def _labelled(batches: Iterable[Batch]):
    """``batches``, each fetched inside a ``dm::data`` profiler range."""
    iterator = iter(batches)
    while True:
        with record_function("dm::data"):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch

logger = logging.getLogger(__name__)


@dataclass
class TrainerConfig:
    """Plain settings of a half-set trainer (stored in checkpoints as a dict)."""

    box_size: int
    pixel_size: float
    n_gaussians: int
    n_classes: int = 1
    latent_dim: int = 2
    n_positional_encoding_dimensions: int = 10
    n_linear_layers: int = 2
    n_neurons_per_layer: int = 32
    n_warmup_epochs: int = 0
    regularization_factor: float = 1.0
    # "gradient-ratio": λ from the data gradient's norm; "signal-ratio": from the norm of its
    # part common to both halves of the batch (the noise part averages out), an experiment
    regularization_rule: str = "gradient-ratio"
    # λ's terms (squared data-gradient size, regulariser-gradient norm) are averaged over the
    # epochs: each epoch's first batch gives new terms, weighted 1 - lambda_smoothing against the
    # running average (0: each epoch's λ from its first batch alone)
    lambda_smoothing: float = 0.0
    beta: float = 0.1  # KL weight: E(z) = NLL / beta + |z|² / 2
    consensus_update_interval: int = 5
    consensus_update_fraction: float = 0.1
    learning_rate: float = 3e-3
    gaussian_learning_rate: float = 1e-2
    repulsion_distance: float = 0.0  # Å; 0 = half the mean neighbour distance of the start
    decoder_precision: str = "float32"  # or "bfloat16" (autocast; see device.py)
    inference_steps: int = 5  # Gauss-Newton steps for a code inferred from the prior mean
    max_latent_step: float = 1.0  # longest Gauss-Newton step, latent units
    # "motion-modes": before the first joint epoch the decoder is fitted to the half set's
    # leading motion modes (:mod:`.motion_modes`); "zero": it starts outputting nothing
    decoder_start: str = "zero"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class HalfSetTrainer:
    """Training of one half set's deformation model and latent codes (module docstring)."""

    def __init__(self, half: int, config: TrainerConfig, initial_gaussians: GaussianModel,
                 train_indices: np.ndarray, device: torch.device,
                 movable_mask: torch.Tensor | None = None,
                 validation_indices: np.ndarray | None = None) -> None:
        self.half = int(half)
        self.config = config
        self.device = torch.device(device)
        self.train_indices = np.sort(np.asarray(train_indices, dtype=np.int64))
        held = (np.zeros(0, dtype=np.int64) if validation_indices is None
                else np.asarray(validation_indices, dtype=np.int64))
        if np.intersect1d(self.train_indices, held).size:
            raise ValueError("validation particles must not be training particles")
        # particles with a stored code: sorted, training and validation ones
        self.known_indices = np.sort(np.concatenate([self.train_indices, held]))
        c = config
        seed = c.seed * 1000 + self.half
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decoder = DeformationDecoder(c.box_size, c.pixel_size, c.latent_dim,
                                         c.n_neurons_per_layer, c.n_linear_layers,
                                         c.n_positional_encoding_dimensions, movable_mask)
        gaussians = copy.deepcopy(initial_gaussians).cpu()
        self.initial_positions = gaussians.positions.detach().clone().to(self.device)
        self._start_edges: torch.Tensor | None = None  # of initial_positions, found when needed
        self.model = DeformationModel(gaussians, decoder, c.box_size,
                                      c.pixel_size).to(self.device)
        self.latents = torch.zeros(self.known_indices.shape[0], c.latent_dim,
                                   device=self.device)
        self.final_latents: torch.Tensor | None = None  # see finalise_latents
        # latent dimensions in use: one whose motion mode is within the noise sees no data
        # (its code stays at the prior mean 0; start_decoder_from_modes decides)
        self.active_dims = torch.ones(c.latent_dim, dtype=torch.bool, device=self.device)
        self.model.decoder_dtype = {"float32": torch.float32,
                                    "bfloat16": torch.bfloat16}[c.decoder_precision]
        if c.repulsion_distance <= 0:
            c.repulsion_distance = 0.5 * mean_neighbour_distance(gaussians.positions)
        g = self.model.gaussians
        mass_scale = float(g.amplitudes.detach().abs().mean().clamp_min(1e-12))
        self.optimiser = adam([
            {"params": [g.positions], "lr": c.gaussian_learning_rate * c.pixel_size},
            {"params": [g.log_sigmas], "lr": c.gaussian_learning_rate},
            {"params": [g.amplitudes], "lr": c.gaussian_learning_rate * mass_scale},
            {"params": list(self.model.decoder.parameters()), "lr": c.learning_rate},
        ], self.device)
        self.noise = RadialNoiseEstimate(c.box_size, device=self.device)
        self.noise_weights = self.noise.weights()
        self.noise_norm = 1.0
        self.pixel_weights = likelihood_pixel_weights(self.noise_weights, self.noise_norm)
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.sample_generator = torch.Generator(device=self.device).manual_seed(seed)
        self.epoch = 0
        self.regularization_weight = 0.0
        self._lambda_terms: tuple[float, float] | None = None  # running average (config)
        self.temporal: TemporalPrior | None = None  # see set_tracks
        self._tracks: tuple[np.ndarray, np.ndarray] | None = None
        # Gauss-Newton precisions of the stored codes: kept only for the temporal prior's fit
        self.latent_precision: torch.Tensor | None = None
        self.group = Group()  # see set_group
        self._touched: torch.Tensor | None = None  # code rows changed here (data parallel)

    def set_group(self, group: Group) -> None:
        """Train data parallel with the other processes of ``group`` (:mod:`.distributed`):
        each gets a share of every batch (:attr:`Batch.offset`, :attr:`Batch.total`), and
        gradients, noise sums, losses and changed codes are summed over the group after each
        batch or epoch, so the replicas stay identical. The temporal prior is not supported
        data parallel (a code's prior reads its neighbours' codes during the epoch)."""
        if group.parallel and self.temporal is not None:
            raise ValueError("the temporal prior trains with one process per half set")
        self.group = group
        group.broadcast_module(self.model)

    @property
    def active_dims(self) -> torch.Tensor:  # (d,) bool
        """The latent dimensions in use (:meth:`start_decoder_from_modes` decides)."""
        return self._active_dims

    @active_dims.setter
    def active_dims(self, active: torch.Tensor) -> None:
        self._active_dims = active
        # the codes' Jacobian is rendered along the dimensions in use only (one render and one
        # tangent chain less per unused dimension); None: all of them. Set once, so the index
        # is read here, not per batch
        self._jacobian_dims = None if bool(active.all()) else torch.nonzero(active)[:, 0]

    # -- schedule -------------------------------------------------------------------------
    @property
    def in_warmup(self) -> bool:
        return self.epoch < self.config.n_warmup_epochs

    def epoch_order(self) -> np.ndarray:
        """This epoch's order of the training particles (from the saved shuffle generator)."""
        perm = torch.randperm(self.train_indices.shape[0], generator=self.shuffle_generator)
        return self.train_indices[perm.numpy()]

    def _set_trainable(self, warmup: bool) -> None:
        for p in self.model.decoder.parameters():
            p.requires_grad_(not warmup)

    @property
    def needs_decoder_start(self) -> bool:
        """Whether the decoder is to be started from the motion modes now (before the first
        joint epoch, :class:`TrainerConfig` ``decoder_start``)."""
        return (self.config.decoder_start == "motion-modes"
                and self.epoch == self.config.n_warmup_epochs)

    def start_decoder_from_modes(self, batches: Iterable[Batch],
                                 known_batches: Iterable[Batch]) -> dict:
        """Fit the decoder to the leading motion modes of the training particles (``batches``
        over them; :mod:`.motion_modes`) and start the stored codes of the particles of
        ``known_batches`` (training and validation ones) at their posterior means along the
        modes; returns a summary. Deterministic (its own generator from the seed), so a resumed
        run repeats it."""
        c = self.config
        generator = torch.Generator(device=self.device).manual_seed(
            c.seed * 1000 + self.half + 500)
        self._set_trainable(False)
        self.model.eval()
        train = self.train_indices
        fields, summary, coefficients = motion_modes(
            self.model, batches, known_batches, self.pixel_weights, c.latent_dim,
            default_cluster_count(train.shape[0]), self.model.decoder.movable_mask, generator,
            self.group, is_training=lambda indices: np.isin(indices, train))
        # a latent dimension whose mode is within the noise is not used: decoder output and
        # codes 0 along it, and no data reaches its code (started from noise, at beta < 1 it
        # learnt a deformation the particles do not have; benchmarks/RESULTS.md)
        keep = torch.tensor(significant_modes(summary["eigenvalues"], summary["noise_edge"][0]),
                            device=fields.device)
        self.active_dims = keep.clone()
        fields = fields * keep[:, None, None].to(fields.dtype)
        summary["started"] = [float(k) for k in keep.tolist()]
        # the fit costs about as much as an epoch over min(n, 2,000) particles would: a start
        # that small datasets (tests, tiny jobs) do not wait for; from 2,000 training particles
        # on (the benchmark's 2,700) it is the measured 2,000 steps
        steps = int(min(2000, max(200, train.shape[0])))
        summary["fit_error"] = [round(fit_decoder_to_modes(self.model, fields, generator,
                                                           n_steps=steps), 4)]
        self.group.broadcast_module(self.model.decoder)
        for indices, a, variance in coefficients:
            rows, pick = self._known_part(*self._rows(indices))
            # posterior mean of a unit-prior code given a ~ N(z, variance) at weight 1 / beta
            codes = (a / (1.0 + c.beta * variance)).to(self.latents.dtype) * keep
            self.latents[rows] = codes if pick is None else codes.index_select(0, pick)
            self._touch(rows)
        self._sync_codes()
        logger.info("half %d: decoder started from %d of %d motion modes (generalised "
                    "eigenvalues %s; noise alone up to about %.2f; a latent dimension beyond "
                    "the first is used only if its mode is above %.2f; amplitudes %s Å RMS; "
                    "fit error %.3f)",
                    self.half, int(keep.sum()), c.latent_dim, summary["eigenvalues"],
                    summary["noise_edge"][0], MODE_SIGNIFICANCE * summary["noise_edge"][0],
                    summary["amplitude_angstrom"], summary["fit_error"][0])
        return summary

    # -- temporal prior -------------------------------------------------------------------
    def set_tracks(self, track: np.ndarray, time: np.ndarray,
                   correlation_time: float | None = None) -> None:
        """Use the temporal prior (:mod:`.temporal_prior`) for tracked particles: ``track`` and
        ``time`` (one per particle of the whole data set, indexed like the particle indices;
        track ``< 0`` = untracked, standard prior). Tracks must not mix training and
        validation particles (the caller splits by track). ``correlation_time`` starts the
        learnt τ (default: 5 median time steps)."""
        track = np.asarray(track, dtype=np.int64)[self.known_indices]
        time = np.asarray(time, dtype=np.float64)[self.known_indices]
        layout = TrackLayout.from_tracks(track, time)
        if correlation_time is None:
            steps = layout.dt_previous[layout.previous >= 0]
            correlation_time = 5.0 * (float(np.median(steps)) if steps.size else 1.0)
        if self.group.parallel:
            raise ValueError("the temporal prior trains with one process per half set")
        self._tracks = (track, time)
        self.temporal = TemporalPrior(layout, correlation_time, self.device)
        self.latent_precision = torch.eye(self.config.latent_dim, device=self.device).repeat(
            self.known_indices.shape[0], 1, 1)

    def _prior(self, rows: torch.Tensor, known: torch.Tensor | None = None):
        """The ``prior`` of :mod:`.latent_inference` for code-table ``rows`` (None: N(0, I)),
        standard for particles without a stored code (``known`` False)."""
        if self.temporal is None:
            return None
        mean, precision = self.temporal.conditional(rows, self.latents)
        if known is not None:
            mean = torch.where(known[:, None], mean, torch.zeros_like(mean))
            precision = torch.where(known, precision, torch.ones_like(precision))
        return mean, precision

    def _fit_temporal(self) -> None:
        if self.temporal is None:
            return
        use = np.isin(self.known_indices, self.train_indices)
        tau = self.temporal.fit(self.latents, self.latent_precision, use,
                                likelihood_scale=self.config.beta)
        logger.debug("half %d: temporal correlation time %.3g", self.half, tau)

    # -- latent codes ------------------------------------------------------------------------
    def _rows(self, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Rows of ``indices`` in the code table (on the device) and whether each particle has
        one (on the host: decisions on it read nothing back from a GPU)."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.searchsorted(self.known_indices, indices)
        rows = np.minimum(rows, max(self.known_indices.shape[0] - 1, 0))
        known = (self.known_indices[rows] == indices) if self.known_indices.size else \
            np.zeros(indices.shape[0], dtype=bool)
        return self._to_device(rows), known

    def _known_part(self, rows: torch.Tensor, known: np.ndarray
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows of the particles that have a code, and their positions in the batch (None:
        all of them), by index: a boolean mask on the device would read its count back."""
        if known.all():
            return rows, None
        pick = self._to_device(np.flatnonzero(known))
        return rows.index_select(0, pick), pick

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the device without a GPU synchronisation: a copy from pageable
        memory makes CUDA wait for the stream first (once per batch here), so on a GPU it goes
        through page-locked memory, asynchronously."""
        tensor = torch.from_numpy(array)
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def infer(self, batch: Batch, n_steps: int = 1, *, store: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:  # mean (b, d), precision (b, d, d)
        """Posterior of the codes of ``batch`` under the current model, without training
        anything: stored codes refined by ``n_steps`` damped Gauss-Newton steps, particles
        without a stored code from 0 by ``inference_steps`` (at least ``n_steps``); the result
        is stored for known particles when ``store``."""
        c = self.config
        rows, on_host = self._rows(batch.indices)
        known = self._to_device(on_host)
        z0 = torch.where(known[:, None], self.latents[rows], torch.zeros_like(self.latents[rows]))
        steps = n_steps if on_host.all() else max(n_steps, c.inference_steps)
        mean, precision = infer_latents(
            lambda z: self.model.linearise(batch, z, self._jacobian_dims), z0,
            batch.images_rfft(), self.pixel_weights, steps, beta=c.beta,
            max_step=c.max_latent_step, prior=self._prior(rows, known), active=self.active_dims,
            dims=self._jacobian_dims)
        if store and on_host.any():
            rows, pick = self._known_part(rows, on_host)
            self.latents[rows] = mean if pick is None else mean.index_select(0, pick)
            self._touch(rows)
            if self.latent_precision is not None:
                self.latent_precision[rows] = (precision if pick is None
                                               else precision.index_select(0, pick))
        return mean, precision

    def _touch(self, rows: torch.Tensor) -> None:
        if self.group.parallel:
            if self._touched is None:
                self._touched = torch.zeros(self.latents.shape[0], dtype=torch.bool,
                                            device=self.device)
            self._touched[rows] = True

    def _sync_codes(self, table: torch.Tensor | None = None) -> None:
        """Data parallel: every replica gets the codes the others changed since the last
        call (each particle is handled by one process)."""
        if not self.group.parallel:
            return
        touched = self._touched
        if touched is None:
            touched = torch.zeros(self.latents.shape[0], dtype=torch.bool, device=self.device)
        self.group.sync_rows(self.latents if table is None else table, touched)
        self._touched = None

    @property
    def _codes(self) -> torch.Tensor:
        return self.latents if self.final_latents is None else self.final_latents

    @torch.no_grad()
    def latents_for(self, batch: Batch) -> torch.Tensor:  # (b, d)
        """Codes of ``batch`` without changing anything: the stored ones of known particles
        (the final ones once :meth:`finalise_latents` ran), inferred from 0
        (``inference_steps``) for the others."""
        rows, known = self._rows(batch.indices)
        if known.all():
            return self._codes[rows].clone()
        inferred = self.infer(batch, self.config.inference_steps, store=False)[0]
        return torch.where(self._to_device(known)[:, None], self._codes[rows], inferred)

    def stored_latents(self, indices: np.ndarray) -> torch.Tensor:  # (m, d)
        """The stored codes of ``indices`` (final ones once :meth:`finalise_latents` ran; all
        must be known to this trainer)."""
        rows, known = self._rows(indices)
        if not known.all():
            raise KeyError(f"half {self.half} has no code for some of these particles")
        return self._codes[rows]

    def _regularisation(self, deformed: torch.Tensor) -> torch.Tensor:  # (b,)
        return (distance_preservation_loss(deformed, self._edges, self._rest_lengths)
                + repulsion_loss(deformed, self.config.repulsion_distance, self._repulsion_pairs))

    @torch.no_grad()
    def initialise_noise(self, batches: Iterable[Batch]) -> None:
        """Noise spectrum from the residuals of the consensus projection."""
        self.noise.reset()
        for batch in batches:
            if len(batch):
                out = self.model(batch)
                self.noise.accumulate(out["image_rfft"] - out["model_rfft"])
        self._refresh_noise(gathered=False)

    def _refresh_noise(self, gathered: bool = True) -> None:
        """New noise weights from the sums; ``gathered=False``: the sums are this process's
        share and are first added over the data-parallel group."""
        if not gathered:
            self.group.all_reduce(self.noise.power_sum)
            self.group.all_reduce(self.noise.count)
        self.noise_weights = self.noise.weights()
        self.noise_norm = noise_normalisation(self.noise)
        self.pixel_weights = likelihood_pixel_weights(self.noise_weights, self.noise_norm)

    # -- training ---------------------------------------------------------------------------
    def train_epoch(self, batches: Iterable[Batch],
                    order: np.ndarray | None = None) -> dict[str, float]:
        """One pass over ``batches``; returns per-particle means as plain floats. ``order``:
        the particle indices of the whole epoch in visiting order (needed data parallel, where
        ``batches`` are this process's shares)."""
        c = self.config
        warmup = self.in_warmup
        self.final_latents = None  # the model changes: final codes no longer hold
        self._set_trainable(warmup)
        consensus = self.model.gaussians.positions.detach()
        # the edges of the starting model, the rest lengths of the current consensus (module
        # docstring); on the device once per epoch: a per-batch copy from pageable memory
        # synchronises
        if self._start_edges is None:  # a constant of the run
            self._start_edges = build_neighbour_graph(self.initial_positions)[0].to(self.device)
        self._edges = self._start_edges
        self._rest_lengths = rest_lengths(consensus, self._edges)
        self._repulsion_pairs = repulsion_candidate_pairs(consensus, c.repulsion_distance).to(
            self.device)
        self.noise.reset()
        # per-epoch sums stay on the device (no host synchronisation per batch): data, mse,
        # kl, reg; each batch's float32 sum is added in float64
        keys = ("data", "mse", "kl", "reg")
        sums = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        n_seen, mus, first = 0, [], True
        parallel = self.group.parallel
        reduce = self.group.all_reduce if parallel else None
        params = [p for group in self.optimiser.param_groups for p in group["params"]]
        self.model.train()
        for batch in _labelled(batches):
            self.optimiser.zero_grad(set_to_none=True)
            if len(batch):
                nll, mse, reg, mean, precision, prior = self._batch_terms(batch, warmup)
                total = batch.global_size
                # data parallel: each share adds its part of the batch mean
                with record_function("dm::loss"):
                    data = nll.mean() if total == len(batch) else nll.sum() / total
                    loss = data
                    if not warmup:
                        reg_mean = reg.mean() if total == len(batch) else reg.sum() / total
                        if first:
                            self.regularization_weight = self._lambda(
                                nll, data, reg_mean, batch, reduce)
                        loss = loss + self.regularization_weight * reg_mean
                        sums[2] += posterior_kl(mean, precision, prior).sum().double()
                        sums[3] += reg.detach().sum().double()
                        mus.append(mean)
                with record_function("dm::backward"):
                    loss.backward()
                sums[0] += nll.detach().sum().double()
                sums[1] += mse.detach().sum().double()
                n_seen += len(batch)
            elif not parallel:
                continue
            first = False
            with record_function("dm::optimiser"):
                self.group.all_reduce_gradients(params)
                self.optimiser.step()
                with torch.no_grad():
                    g = self.model.gaussians
                    g.log_sigmas.clamp_(min=math.log(0.5 * c.pixel_size))
        sums = dict(zip(keys, sums.tolist(), strict=True))  # the epoch's one read-back
        if parallel:
            totals = self.group.all_reduce_numbers([*sums.values(), float(n_seen)])
            sums = dict(zip(sums, totals[:-1], strict=True))
            n_seen = int(totals[-1])
        self._refresh_noise(gathered=False)
        self.epoch += 1
        if parallel and not warmup:
            self._sync_codes()
            if order is None:
                raise ValueError("data parallel training needs the epoch's order")
            mus = [self.latents[self._rows(order)[0]]]
        if not warmup:
            self._fit_temporal()
        joint_epochs = self.epoch - c.n_warmup_epochs
        if (mus and c.consensus_update_interval > 0
                and joint_epochs % c.consensus_update_interval == 0):
            self.update_consensus(torch.cat(mus))
        stats = {key: value / max(n_seen, 1) for key, value in sums.items()}
        stats.update(n_particles=float(n_seen), regularization_weight=self.regularization_weight,
                     warmup=float(warmup))
        return stats

    def _lambda(self, nll: torch.Tensor, data: torch.Tensor, reg_mean: torch.Tensor,
                batch: Batch, reduce) -> float:
        """This epoch's λ (:class:`TrainerConfig` ``regularization_rule``)."""
        c = self.config
        params = self.model.decoder.parameters()
        if c.regularization_rule == "gradient-ratio":
            terms = gradient_ratio_terms(data, reg_mean, params, reduce)
        elif c.regularization_rule == "signal-ratio":
            terms = signal_ratio_terms(nll, reg_mean, params, offset=batch.offset,
                                       total=batch.global_size, reduce=reduce)
        else:
            raise ValueError(f"unknown regularization rule {c.regularization_rule!r}")
        weight, self._lambda_terms = smoothed_lambda(self._lambda_terms, terms,
                                                     c.lambda_smoothing, c.regularization_factor)
        return weight

    def _batch_terms(self, batch: Batch, warmup: bool):
        """Forward pass of a training batch: per-particle NLL, MSE and regulariser (None in
        warm-up), the codes' posterior and prior; the noise sums take the residuals."""
        mean = precision = prior = reg = None
        z = None
        if not warmup:
            with record_function("dm::codes"):
                mean, precision, prior = self._refine_codes(batch)
                # the batch's draws, of which a data-parallel share takes its rows
                noise = torch.randn((batch.global_size, mean.shape[-1]),
                                    generator=self.sample_generator, device=mean.device,
                                    dtype=mean.dtype)[batch.offset:batch.offset + len(batch)]
                # a dimension not in use carries nothing: its draw is 0 too
                z = sample_posterior(mean, precision, noise=noise) * self.active_dims
        with record_function("dm::forward"):
            out = self.model(batch) if warmup else self.model(batch, z)
        with record_function("dm::loss"):
            nll, mse = negative_log_likelihood(out["model_rfft"], out["image_rfft"],
                                               self.noise_weights, self.noise_norm)
            if not warmup:
                reg = self._regularisation(out["deformed"])
        with record_function("dm::statistics"), torch.no_grad():
            self.noise.accumulate(out["image_rfft"] - out["model_rfft"].detach())
        return nll, mse, reg, mean, precision, prior

    @torch.no_grad()
    def _refine_codes(self, batch: Batch):
        """One Gauss-Newton step for the stored codes of a training batch under the current
        model; the new posterior (mean, precision) is stored and returned with the prior it
        was computed under (None: N(0, I))."""
        rows = self._rows(batch.indices)[0]
        z = self.latents[rows]
        prior = self._prior(rows)
        model, jacobian = self.model.linearise(batch, z, self._jacobian_dims)
        descent, precision = gauss_newton_system(model, jacobian, z, batch.images_rfft(),
                                                 self.pixel_weights, self.config.beta, prior,
                                                 self.active_dims, self._jacobian_dims)
        mean = gauss_newton_step(z, descent, precision, self.config.max_latent_step)
        self.latents[rows] = mean
        self._touch(rows)
        if self.latent_precision is not None:
            self.latent_precision[rows] = precision
        return mean, precision, prior

    @torch.no_grad()
    def update_consensus(self, mu: torch.Tensor, chunk: int = 256) -> float:
        """Consensus update (module docstring); returns the mean shift of the Gaussians, Å."""
        self.model.eval()
        mean_norm, mean_d = [], []
        offset = self.model.gaussians.positions.detach() - self.initial_positions  # (n_g, 3)
        for start in range(0, mu.shape[0], chunk):
            d = self.model.displacements(mu[start:start + chunk])
            mean_norm.append((d + offset).norm(dim=-1).mean(dim=1))
            mean_d.append(d)
        norms = torch.cat(mean_norm)  # distance of each deformed model from the initial one
        n_keep = max(1, round(self.config.consensus_update_fraction * norms.shape[0]))
        keep = torch.argsort(norms)[:n_keep]
        d_all = torch.cat(mean_d)[keep]
        shift = d_all.mean(dim=0)
        self.model.gaussians.positions.add_(shift)
        moved = float(shift.norm(dim=-1).mean())
        logger.info("half %d: consensus update from %d particles, mean shift %.3f Å",
                    self.half, n_keep, moved)
        return moved

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Mean residual power per Fourier pixel within Nyquist (unweighted, so epochs compare
        whatever the noise estimate does) of ``batches`` under the current model at their
        inferred codes (:meth:`infer`, stored for known particles); nothing is trained. NaN
        without particles."""
        self.model.eval()
        flat = torch.ones_like(self.noise_weights) * (self.noise_weights > 0)
        # summed on the device in float64 (as the float sums were), read once at the end
        summed, n = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for batch in batches:
            if not len(batch):
                continue
            z = None if self.in_warmup else self.infer(batch)[0]
            out = self.model(batch, z)
            _, mse = negative_log_likelihood(out["model_rfft"], out["image_rfft"], flat, 1.0)
            summed += mse.sum().double()
            n += len(batch)
        total = float(summed)
        if self.group.parallel:
            total, n = self.group.all_reduce_numbers([total, float(n)])
            self._sync_codes()
        return total / n if n else float("nan")

    @torch.no_grad()
    def finalise_latents(self, batches: Iterable[Batch], n_steps: int = 2) -> None:
        """The codes of the known particles in ``batches`` under the final model (``n_steps``
        damped Gauss-Newton steps from the stored ones), kept apart from the training table (so
        that training can be continued exactly) and returned by :meth:`latents_for` and
        :meth:`stored_latents` from now on. Training again discards them."""
        self.model.eval()
        if self.final_latents is None:
            self.final_latents = self.latents.clone()
        touched = torch.zeros(self.latents.shape[0], dtype=torch.bool, device=self.device)
        for batch in batches:
            if not len(batch):
                continue
            rows, pick = self._known_part(*self._rows(batch.indices))
            mean = self.infer(batch, n_steps, store=False)[0]
            self.final_latents[rows] = mean if pick is None else mean.index_select(0, pick)
            touched[rows] = True
        self.group.sync_rows(self.final_latents, touched)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors, numbers and plain dicts only (loadable with ``weights_only=True``), nothing
        that can be recomputed: particle indices as int32, the training particles as a mask
        over the known ones, Gaussian classes as int16."""
        gaussians = self.model.gaussians.state_dict()
        gaussians["class_index"] = gaussians["class_index"].to(torch.int16)
        return {
            "half": self.half, "epoch": self.epoch, "config": self.config.to_dict(),
            "gaussians": gaussians,
            "decoder": self.model.decoder.state_dict(),
            "latents": self.latents.cpu(),
            **({} if self.final_latents is None else {"final_latents": self.final_latents.cpu()}),
            "known_indices": torch.from_numpy(self.known_indices.astype(np.int32)),
            "is_training": torch.from_numpy(np.isin(self.known_indices, self.train_indices)),
            "optimiser": self.optimiser.state_dict(),
            "noise_power_sum": self.noise.power_sum.cpu(), "noise_count": self.noise.count.cpu(),
            "shuffle_rng": self.shuffle_generator.get_state(),
            "sample_rng": self.sample_generator.get_state(),
            "regularization_weight": self.regularization_weight,
            **({} if self._lambda_terms is None else {"lambda_terms": list(self._lambda_terms)}),
            "initial_positions": self.initial_positions.cpu(),
            "active_dims": self.active_dims.cpu(),
            **({} if self.temporal is None else {"temporal": {
                "track": torch.from_numpy(self._tracks[0]),
                "time": torch.from_numpy(self._tracks[1]),
                "correlation_time": self.temporal.correlation_time,
                "latent_precision": self.latent_precision.cpu()}}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (also the layout of format version 2: int64
        ``train_indices`` and a ``latent_precision`` table, which is not needed)."""
        if "latents" not in state:
            raise ValueError("checkpoint of an earlier version (image encoder): its training "
                             "cannot be continued by this one; start a new run")
        self.epoch = int(state["epoch"])
        self.model.gaussians.load_state_dict(state["gaussians"])
        self.model.decoder.load_state_dict(state["decoder"])
        self.known_indices = state["known_indices"].numpy().astype(np.int64)
        self.latents = state["latents"].to(self.device)
        final = state.get("final_latents")
        self.final_latents = None if final is None else final.to(self.device)
        self.model.to(self.device)
        load_adam_state(self.optimiser, state["optimiser"])
        self.noise.power_sum.copy_(state["noise_power_sum"])
        self.noise.count.copy_(state["noise_count"])
        self._refresh_noise()
        if "is_training" in state:
            self.train_indices = self.known_indices[state["is_training"].numpy()]
        else:
            self.train_indices = state["train_indices"].numpy().astype(np.int64)
        self.shuffle_generator.set_state(state["shuffle_rng"])
        self.sample_generator.set_state(state["sample_rng"])
        self.regularization_weight = float(state["regularization_weight"])
        terms = state.get("lambda_terms")  # absent before lambda_smoothing
        self._lambda_terms = None if terms is None else (float(terms[0]), float(terms[1]))
        # a copy: the halves' checkpoint may hold one tensor for both (same initial model)
        self.initial_positions = state["initial_positions"].to(self.device, copy=True)
        self._start_edges = None
        active = state.get("active_dims")  # absent before: every dimension in use
        self.active_dims = (torch.ones(self.config.latent_dim, dtype=torch.bool)
                            if active is None else active.to(torch.bool)).to(self.device)
        temporal = state.get("temporal")
        if temporal is None:
            self.temporal, self._tracks, self.latent_precision = None, None, None
        else:
            track, time = temporal["track"].numpy(), temporal["time"].numpy()
            self._tracks = (track, time)
            self.temporal = TemporalPrior(TrackLayout.from_tracks(track, time),
                                          float(temporal["correlation_time"]), self.device)
            self.latent_precision = temporal["latent_precision"].to(self.device)

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> HalfSetTrainer:
        """Rebuild a trainer (shapes from the stored config) and load ``state`` into it."""
        config = TrainerConfig(**{k: v for k, v in state["config"].items()
                                  if k in TrainerConfig.__dataclass_fields__})
        gaussians = GaussianModel.from_config(
            {"n_gaussians": config.n_gaussians, "n_classes": config.n_classes})
        gaussians.load_state_dict(state["gaussians"])
        known = state["known_indices"].numpy().astype(np.int64)
        train = (known[state["is_training"].numpy()] if "is_training" in state
                 else state["train_indices"].numpy())
        trainer = cls(int(state["half"]), config, gaussians, train, device)
        trainer.load_state_dict(state)
        return trainer


__all__ = ["HalfSetTrainer", "TrainerConfig"]
