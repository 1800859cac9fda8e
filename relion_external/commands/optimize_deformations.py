"""Learn per-particle deformations of a Gaussian model: two independent half-set VAEs.

A Gaussian pseudo-atomic model is fitted to the consensus map (--initial-model); both half sets
start from this same model and are then trained independently (own networks, optimiser, noise
spectrum and random generators). A held-out validation subset (--validation-fraction, from both
halves, fixed by --seed) is used by neither half for training; after training both halves'
models infer its latent codes and the disagreement of their deformations |d1 - d2| (Å) is
reported.

Outputs (in --output-directory): forward_deformations/checkpoints/NNN.pth (every
--checkpoint-interval epochs, the newest --keep-checkpoints kept) and checkpoint_final.pth,
forward_deformations/volumes/volume_half{1,2}_NNN.mrc (each half's consensus Gaussians
rendered), forward_deformations/loss_log.txt (one line per epoch), and particles.star: the input
particles plus rlnDynaMightLatent1..d (mean latent code from the particle's own half),
rlnDynaMightHalfSet, rlnDynaMightValidation (0/1) and rlnDynaMightDeformationError (Å, -1 for
training particles). Every file is written under a temporary name and renamed when complete,
so a full disk or an unwritable folder ends the run with a one-line error naming the path and
leaves no half-written file.
Under RELION (--pipeline-control), particles.star is declared as an output node (particles) in
RELION_OUTPUT_NODES.star, so that later jobs can select it.
Training stops after --n-epochs, or earlier when the residual of the validation particles has
not improved for --early-stopping-patience joint epochs (both halves stop together). Running the
same command again continues from the latest checkpoint of the output directory (or from
--checkpoint-file) with everything restored; --n-epochs is the total. A damaged latest
checkpoint (e.g. truncated by a crash) is skipped with a warning and the previous intact one is
used. Model settings come from the checkpoint then; options that differ from it are listed in a
warning.

Example:
  dynamight optimize-deformations --refinement-star-file Refine3D/job010/run_data.star \\
      --initial-model Refine3D/job010/run_class001.mrc --output-directory DynaMight/ \\
      --n-gaussians 10000 --n-epochs 100 --gpu-id 0
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from dynamight_core.checkpoint import load_checkpoint, load_latest_checkpoint
from dynamight_core.deformation_training import DeformationTraining, EpochReport, Schedule
from dynamight_core.device import DECODER_PRECISIONS, choose_device, resolve_decoder_precision
from dynamight_core.distributed import (
    join_processes,
    leave_processes,
    local_rank_from_environment,
)
from dynamight_core.fourier_crop import crop_particle_set, fourier_crop_volume, training_box
from dynamight_core.gaussian_model import fit_gaussians_to_map, init_gaussians_from_map
from dynamight_core.gaussian_projection import render_gaussians_3d
from dynamight_core.half_set_trainer import TrainerConfig

from .. import launch
from .._atomic import append_text, make_folder
from ..errors import InputError
from ..map_io import read_map, write_map
from ..output_nodes import PARTICLES, OutputNode, node_name, write_output_nodes
from ..particles_adapter import check_map_matches, load_particle_set
from ..refinement_resolution import consensus_resolution
from ..star_io import write_particles_star
from ..track_plot import write_track_latents_plot
from ..tracks import half_sets_by_track, read_tracks

logger = logging.getLogger(__name__)


def add_args(p) -> None:
    p.add_argument("--refinement-star-file", required=True,
                   help="particles STAR of a consensus refinement (RELION 3.1+)")
    p.add_argument("--output-directory", required=True)
    p.add_argument("--initial-model", default=None,
                   help="consensus map the Gaussian model is fitted to (required unless resuming)")
    p.add_argument("--initial-threshold", type=float, default=None,
                   help="map threshold for placing Gaussians (default: automatic, Otsu)")
    p.add_argument("--mask-file", default=None,
                   help="only Gaussians inside this mask (value > 0.5) may move")
    p.add_argument("--checkpoint-file", default=None, help="continue from this checkpoint")
    p.add_argument("--n-gaussians", type=int, default=10000)
    p.add_argument("--n-gaussian-widths", type=int, default=1)
    p.add_argument("--n-latent-dimensions", type=int, default=2)
    p.add_argument("--n-positional-encoding-dimensions", type=int, default=10)
    p.add_argument("--n-linear-layers", type=int, default=2)
    p.add_argument("--n-neurons-per-layer", type=int, default=32)
    p.add_argument("--n-warmup-epochs", type=int, default=0)
    p.add_argument("--regularization-factor", type=float, default=1.0)
    p.add_argument("--regularization-rule", choices=("gradient-ratio", "signal-ratio"),
                   default="signal-ratio",
                   help="λ per epoch: factor × the data gradient's signal part / |regulariser "
                        "gradient|, the signal part being sqrt(g1 · g2) of the gradients of the "
                        "two halves of a batch (signal-ratio, measured better at low SNR: "
                        "benchmarks/RESULTS.md), or factor × |data gradient| / |regulariser "
                        "gradient| (gradient-ratio, as the reference DynaMight)"),
    p.add_argument("--lambda-smoothing", type=float, default=0.0, metavar="W",
                   help="λ's two gradient terms as running averages over the epochs: each "
                        "epoch's first batch weighs 1 - W against the average so far (0: each "
                        "epoch's λ from its first batch alone)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--training-box", type=int, default=0, metavar="N",
                   help="train on the particles Fourier-cropped to N pixels (pixel size scaled; "
                        "poses, shifts and CTF unchanged); 0 = the smallest even box whose "
                        "Nyquist reaches the consensus resolution (_rlnCurrentResolution of "
                        "<prefix>_model.star beside a <prefix>_data.star), at least 64; without "
                        "it at most 256. The later stages use the full box")
    p.add_argument("--gpu-id", default=None,
                   help="GPU(s) to use (default: CPU); a list such as 0,1 runs one process "
                        "per GPU (see --n-processes)")
    launch.add_args(p)
    p.add_argument("--n-epochs", type=int, default=50,
                   help="most epochs in total (including warm-up); training may stop earlier, "
                        "see --early-stopping-patience")
    p.add_argument("--early-stopping-patience", type=int, default=10,
                   help="stop when the held-out (validation) residual has not improved for this "
                        "many joint epochs; 0 = always run --n-epochs")
    p.add_argument("--early-stopping-min-epochs", type=int, default=15,
                   help="never stop early before this many joint epochs")
    p.add_argument("--early-stopping-min-fraction", type=float, default=0.05,
                   help="an epoch improves when it beats the best held-out residual by more "
                        "than this fraction of the total improvement so far")
    p.add_argument("--n-threads", type=int, default=4)
    p.add_argument("--decoder-precision", choices=DECODER_PRECISIONS, default="auto",
                   help="arithmetic of the deformation decoder (the costliest part): auto = "
                        "bfloat16 where the GPU/CPU computes it natively, else float32")
    p.add_argument("--preload-images", action="store_true", help="read all images into RAM")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--temporal-prior", action="store_true",
                   help="time series (liquid-phase EM): a learnt Gauss-Markov prior ties the "
                        "codes of consecutive frames of a track (columns rlnDynaMightTrack and "
                        "rlnDynaMightTime; tracks kept whole in one half set and in validation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-half-sets", action="store_true",
                   help="split randomly when the STAR file has no rlnRandomSubset")
    p.add_argument("--checkpoint-interval", type=int, default=5)
    p.add_argument("--keep-checkpoints", type=int, default=3, metavar="N",
                   help="keep the newest N epoch checkpoints (NNN.pth), deleting older ones "
                        "once a new one is written; checkpoint_final.pth is always kept; "
                        "0 = keep all (default 3)")
    p.add_argument("--consensus-update-interval", type=int, default=5)
    p.add_argument("--n-map-fit-steps", type=int, default=100)
    p.add_argument("--beta", type=float, default=0.1,
                   help="weight of the KL term (the prior) in each particle's latent posterior; "
                        "below 1 the posteriors are narrower and training learns faster at low "
                        "SNR (measured: README)")
    p.add_argument("--decoder-start", choices=("motion-modes", "zero"), default="motion-modes",
                   help="before the first joint epoch, fit the decoder to the half set's leading "
                        "motion modes, found from the particles' gradients at the consensus "
                        "(motion-modes: learns much faster at low SNR, benchmarks/RESULTS.md), "
                        "or start it at zero displacement (zero, as the reference DynaMight)")
    p.add_argument("--learning-rate", type=float, default=3e-3,
                   help="Adam learning rate of the deformation decoder")
    p.add_argument("--project-directory", default=None,
                   help="RELION project folder image names are relative to (default: cwd)")
    p.add_argument("--pipeline-control", "--pipeline_control", dest="pipeline_control",
                   default=None, metavar="DIR",
                   help="RELION job folder: exit-status files and abort requests")


def _initial_gaussians(args, particles, training=None):
    """Gaussian model fitted to the consensus map, and the movable mask (or None); with
    ``training`` (the particles on the training box) the map and mask are Fourier-cropped to
    it first."""
    if not args.initial_model:
        raise InputError(Path(args.refinement_star_file), "--initial-model",
                         "no consensus map given", "Pass the refinement's map.")
    volume, voxel = read_map(args.initial_model)
    check_map_matches(args.initial_model, voxel, volume.shape[-1], particles)
    full = particles
    if training is not None and training.box_size != particles.box_size:
        volume = fourier_crop_volume(volume, training.box_size)
        voxel, particles = training.pixel_size, training
    generator = torch.Generator().manual_seed(args.seed)
    model, _ = init_gaussians_from_map(volume, voxel, args.n_gaussians, args.initial_threshold,
                                       args.n_gaussian_widths, generator)
    box = particles.box_size

    def render(positions, sigmas, masses):
        return render_gaussians_3d(positions, torch.exp(model.log_sigmas), model.amplitudes[
            model.class_index], model.class_index, box, voxel)

    fit_gaussians_to_map(model, volume, voxel, args.n_map_fit_steps, render)
    movable = None
    if args.mask_file:
        mask, mask_voxel = read_map(args.mask_file)
        check_map_matches(args.mask_file, mask_voxel, mask.shape[-1], full)
        mask = fourier_crop_volume(mask, box)
        zyx = torch.round(model.positions.detach().flip(-1) / voxel + box // 2).long()
        zyx = zyx.clamp(0, box - 1)
        movable = mask[zyx[:, 0], zyx[:, 1], zyx[:, 2]] > 0.5
        logger.info("mask: %d of %d Gaussians may move", int(movable.sum()), movable.shape[0])
    return model, movable


def _trainer_config(args, particles, gaussians, device) -> TrainerConfig:
    return TrainerConfig(
        box_size=particles.box_size, pixel_size=particles.pixel_size,
        n_gaussians=gaussians.n_gaussians, n_classes=gaussians.n_classes,
        latent_dim=args.n_latent_dimensions,
        n_positional_encoding_dimensions=args.n_positional_encoding_dimensions,
        n_linear_layers=args.n_linear_layers, n_neurons_per_layer=args.n_neurons_per_layer,
        n_warmup_epochs=args.n_warmup_epochs,
        regularization_factor=args.regularization_factor,
        regularization_rule=args.regularization_rule, beta=args.beta,
        lambda_smoothing=args.lambda_smoothing,
        consensus_update_interval=args.consensus_update_interval,
        learning_rate=args.learning_rate, seed=args.seed,
        decoder_start=args.decoder_start,
        decoder_precision=resolve_decoder_precision(args.decoder_precision, device))


def _schedule(args) -> Schedule:
    return Schedule(n_epochs=args.n_epochs, batch_size=args.batch_size,
                    checkpoint_interval=args.checkpoint_interval,
                    keep_checkpoints=args.keep_checkpoints,
                    early_stopping_patience=args.early_stopping_patience,
                    early_stopping_min_fraction=args.early_stopping_min_fraction,
                    early_stopping_min_epochs=args.early_stopping_min_epochs)


def _settings(args) -> dict:
    """The command's settings as plain values (stored in every checkpoint)."""
    config = {k: v for k, v in vars(args).items()
              if isinstance(v, (int, float, str, bool)) or v is None}
    config.pop("_module", None)
    return config


def _training_particles(args, particles, state: dict | None):
    """``particles`` on the training box: the checkpoint's when continuing, else
    --training-box, else the automatic choice from the consensus resolution."""
    box = particles.box_size
    if state is not None:
        new = int(state["halves"]["1"]["config"]["box_size"])
    elif args.training_box:
        new = int(args.training_box)
        if not 16 <= new <= box:
            raise InputError(None, "--training-box", f"{new} is not between 16 and the box "
                             f"size {box}", "Give a smaller box than the particles' (or 0).")
    else:
        new = training_box(box, particles.pixel_size,
                           consensus_resolution(args.refinement_star_file))
    if new == box:
        return particles
    cropped = crop_particle_set(particles, new)
    logger.info("training on box %d (%.3f Å/px, Nyquist %.2f Å) Fourier-cropped from box %d; "
                "the deformed backprojection uses the full box", new, cropped.pixel_size,
                2 * cropped.pixel_size, box)
    return cropped


def _checkpoint_to_resume(args, folder: Path) -> tuple[Path, dict] | None:
    """--checkpoint-file (it must be intact), else the latest intact checkpoint of ``folder``
    (a damaged newer one is skipped with a warning), else None."""
    if args.checkpoint_file:
        path = Path(args.checkpoint_file)
        if not path.is_file():
            raise InputError(path, "--checkpoint-file", "does not exist",
                             "Give a checkpoint of optimize-deformations "
                             "(forward_deformations/checkpoints/*.pth).")
        return path, load_checkpoint(path)
    return load_latest_checkpoint(folder)


def _check_resumable(path, state, particles) -> None:
    if state["half_set"].shape[0] != len(particles):
        raise InputError(path, "checkpoint",
                         f"is for {state['half_set'].shape[0]} particles, the particles STAR "
                         f"file has {len(particles)}",
                         "Give the STAR file the checkpoint was trained on, or another "
                         "--output-directory to start afresh.")


# settings fixed by the checkpoint when continuing (the model and its training rule)
_CHECKPOINT_SETTINGS = (
    "refinement_star_file", "initial_model", "initial_threshold", "mask_file", "n_gaussians",
    "n_gaussian_widths", "n_latent_dimensions", "n_positional_encoding_dimensions",
    "n_linear_layers", "n_neurons_per_layer", "n_warmup_epochs", "regularization_factor",
    "regularization_rule", "lambda_smoothing", "training_box",
    "validation_fraction", "seed", "random_half_sets", "consensus_update_interval",
    "n_map_fit_steps", "beta", "learning_rate", "decoder_precision", "temporal_prior",
    "decoder_start")


def _warn_about_changed_settings(args, saved: dict, path) -> None:
    """Name every option that differs from the checkpoint's (ignored ones and batch size)."""
    ignored = [f"--{key.replace('_', '-')} (checkpoint {saved[key]!r}, given {getattr(args, key)!r})"
               for key in _CHECKPOINT_SETTINGS
               if key in saved and getattr(args, key, None) is not None
               and str(getattr(args, key)) != str(saved[key])]
    if ignored:
        logger.warning("continuing from %s: these options differ from the checkpoint and are "
                       "IGNORED (the checkpoint's values are used): %s", path, "; ".join(ignored))
    if "batch_size" in saved and int(saved["batch_size"]) != int(args.batch_size):
        logger.warning("continuing from %s with --batch-size %d instead of %d: training goes "
                       "on with the new batch size, so it will not repeat an uninterrupted run",
                       path, args.batch_size, int(saved["batch_size"]))


def _write_volumes(folder: Path, gaussians: dict, epoch: int, particles) -> None:
    make_folder(folder)
    for half, g in gaussians.items():
        with torch.no_grad():
            vol = render_gaussians_3d(g.positions, torch.exp(g.log_sigmas), g.masses(),
                                      g.class_index, particles.box_size, particles.pixel_size)
        write_map(folder / f"volume_half{half}_{epoch:03d}.mrc", vol.cpu(), particles.pixel_size)


def _log_epoch(fwd: Path, report: EpochReport) -> None:
    stats = report.stats
    mean = {k: 0.5 * (stats[1][k] + stats[2][k]) for k in ("data", "mse", "reg", "kl")}
    lam = [stats[h]["regularization_weight"] for h in (1, 2)]
    logger.info("epoch %d/%d (%s): data %.4g (mse %.4g) reg %.4g KL %.4g lambda %.3g/%.3g "
                "held-out %.6g, %.0f particles/s, %.0f s left", report.epoch, report.n_epochs,
                "warm-up" if report.warmup else "joint", mean["data"], mean["mse"],
                mean["reg"], mean["kl"], lam[0], lam[1], report.residual,
                report.particles_per_s, report.seconds_left)
    append_text(fwd / "loss_log.txt", " ".join(
        [f"epoch {report.epoch}"] + [f"half{h}_{k} {stats[h][k]:.8g}" for h in (1, 2)
                                     for k in ("data", "mse", "reg", "kl",
                                               "regularization_weight")]
        + [f"heldout_residual {report.residual:.8g}"]) + "\n")
    if report.correlation_times is not None:
        logger.info("  temporal prior: correlation time %.3g / %.3g (time units of %s)",
                    report.correlation_times[1], report.correlation_times[2],
                    "rlnDynaMightTime")
    if report.stopped_early:
        stopping = report.stopping
        logger.info("early stopping after epoch %d: the held-out residual has not improved "
                    "for %d epochs (best %.6g at epoch %d)", report.epoch,
                    stopping.stale_epochs, stopping.best, stopping.best_epoch)


def main(args, control) -> None:
    torch.set_num_threads(max(1, int(args.n_threads)))
    out = Path(args.output_directory)
    fwd = out / "forward_deformations"
    device = choose_device(args.gpu_id, local_rank_from_environment())
    layout = join_processes(device)
    particles, star = load_particle_set(args.refinement_star_file,
                                        project_dir=args.project_directory,
                                        random_split=args.random_half_sets, seed=args.seed,
                                        preload=args.preload_images)
    tracks = None
    if args.temporal_prior and any(g.parallel for g in layout.groups.values()):
        raise InputError(None, "--temporal-prior",
                         "trains each half set in one process (a code's prior reads its "
                         "neighbours' codes during the epoch)",
                         "Run with one process per half set (--n-processes 2 or 1).")
    if args.temporal_prior:
        tracks = read_tracks(args.refinement_star_file, star.particles)
        particles = particles.with_half_set(torch.from_numpy(half_sets_by_track(
            args.refinement_star_file, particles.half_set.numpy(), tracks[0])))
        logger.info("temporal prior: %d tracks, %d tracked particles",
                    len(np.unique(tracks[0][tracks[0] >= 0])), int((tracks[0] >= 0).sum()))
    found = _checkpoint_to_resume(args, fwd / "checkpoints")
    if found is not None:
        _check_resumable(*found, particles)
    full, particles = particles, _training_particles(args, particles,
                                                     found[1] if found else None)
    training = DeformationTraining(
        particles, device, _schedule(args), _settings(args), layout=layout,
        checkpoint_folder=fwd / "checkpoints" if layout.is_main else None,
        check_abort=control.check_abort)
    if found is not None:
        path, state = found
        _warn_about_changed_settings(args, state["config"], path)
        logger.info("continuing from %s (epoch %d)", path, int(state["epoch"]))
        training.resume(state)
    else:
        gaussians, movable = _initial_gaussians(args, full, particles)
        training.start(gaussians, _trainer_config(args, particles, gaussians, device),
                       movable=movable, validation_fraction=args.validation_fraction,
                       seed=args.seed, tracks=tracks)
    particles = training.particles
    if layout.is_main:
        make_folder(fwd / "checkpoints")
    validation = training.validation.numpy()
    n_train = [int(((particles.half_set.numpy() == h) & ~validation).sum()) for h in (1, 2)]
    some = next(iter(training.trainers.values()))
    logger.info("training on %s (decoder in %s): %d + %d particles, %d held out for validation, "
                "epochs %d..%d%s", device, some.config.decoder_precision, n_train[0], n_train[1],
                int(validation.sum()), training.epoch + 1, args.n_epochs,
                f" ({layout.world_size} processes)" if layout.parallel else "")
    training.run(on_epoch=lambda report: _log_epoch(fwd, report),
                 on_checkpoint=lambda epoch, gaussians: _write_volumes(
                     fwd / "volumes", gaussians, epoch, particles))
    trainers = training.finish()
    if trainers is not None:
        _write_particles(out, training, star, trainers, tracks)
        if getattr(args, "pipeline_control", None):  # RELION: particles.star becomes an input
            write_output_nodes(args.pipeline_control,
                               [OutputNode(node_name(out, "particles.star"), PARTICLES)])
    leave_processes(layout)


def _write_particles(out, training: DeformationTraining, star, trainers, tracks=None) -> None:
    particles, validation = training.particles, training.validation
    n = len(particles)
    d = trainers[1].config.latent_dim
    latents = np.zeros((n, d))
    half_set = particles.half_set.numpy()
    for half, trainer in trainers.items():
        members = np.flatnonzero(half_set == half)
        latents[members] = trainer.stored_latents(members).cpu().numpy()
    error = np.full(n, -1.0)
    per_particle, idx, per_gaussian = training.validation_error(trainers)
    error[idx] = np.where(np.isfinite(per_particle), per_particle, -1.0)
    if per_particle.size:
        logger.info("validation (%d particles): deformation error |d1 - d2| mean %.3f Å, "
                    "median %.3f Å, worst Gaussian %.3f Å", per_particle.size,
                    float(per_particle.mean()), float(np.median(per_particle)),
                    float(per_gaussian.max()))
    table = star.particles.copy()
    for k in range(d):
        table[f"rlnDynaMightLatent{k + 1}"] = latents[:, k]
    table["rlnDynaMightHalfSet"] = half_set.astype(int)
    table["rlnDynaMightValidation"] = validation.numpy().astype(int)
    table["rlnDynaMightDeformationError"] = error
    write_particles_star(out / "particles.star", (star.optics, table))
    logger.info("wrote %s", out / "particles.star")
    if tracks is not None and trainers[1].temporal is not None:
        plot = write_track_latents_plot(out / "track_latents.png", latents, *tracks, half_set)
        logger.info("wrote %s (latent codes against time, a few tracks per half set)", plot)
