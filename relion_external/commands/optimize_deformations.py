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
import time
from pathlib import Path

import numpy as np
import torch

from dynamight_core.checkpoint import (
    FINAL_NAME,
    epoch_checkpoint_name,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from dynamight_core.deformation_model import deformation_error, make_batch, split_validation
from dynamight_core.device import DECODER_PRECISIONS, choose_device, resolve_decoder_precision
from dynamight_core.early_stopping import EarlyStopping
from dynamight_core.gaussian_model import fit_gaussians_to_map, init_gaussians_from_map
from dynamight_core.gaussian_projection import render_gaussians_3d
from dynamight_core.half_set_trainer import HalfSetTrainer, TrainerConfig

from .._atomic import append_text, make_folder
from ..errors import InputError
from ..map_io import read_map, write_map
from ..output_nodes import PARTICLES, OutputNode, node_name, write_output_nodes
from ..particles_adapter import check_map_matches, load_particle_set
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
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--gpu-id", default=None, help="GPU to use (default: CPU)")
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
    p.add_argument("--learning-rate", type=float, default=3e-3,
                   help="Adam learning rate of the deformation decoder")
    p.add_argument("--project-directory", default=None,
                   help="RELION project folder image names are relative to (default: cwd)")
    p.add_argument("--pipeline-control", "--pipeline_control", dest="pipeline_control",
                   default=None, metavar="DIR",
                   help="RELION job folder: exit-status files and abort requests")


def _initial_gaussians(args, particles):
    """Gaussian model fitted to the consensus map, and the movable mask (or None)."""
    if not args.initial_model:
        raise InputError(Path(args.refinement_star_file), "--initial-model",
                         "no consensus map given", "Pass the refinement's map.")
    volume, voxel = read_map(args.initial_model)
    check_map_matches(args.initial_model, voxel, volume.shape[-1], particles)
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
        check_map_matches(args.mask_file, mask_voxel, mask.shape[-1], particles)
        zyx = torch.round(model.positions.detach().flip(-1) / voxel + box // 2).long()
        zyx = zyx.clamp(0, box - 1)
        movable = mask[zyx[:, 0], zyx[:, 1], zyx[:, 2]] > 0.5
        logger.info("mask: %d of %d Gaussians may move", int(movable.sum()), movable.shape[0])
    return model, movable


def _batches(particles, order, batch_size, device, control):
    for start in range(0, len(order), batch_size):
        control.check_abort()
        yield make_batch(particles, order[start:start + batch_size], device)


def _new_run(args, particles, device, tracks=None):
    validation = split_validation(particles.half_set, args.validation_fraction, args.seed,
                                  groups=None if tracks is None else tracks[0])
    gaussians, movable = _initial_gaussians(args, particles)
    trainers = {}
    for half in (1, 2):
        config = TrainerConfig(
            box_size=particles.box_size, pixel_size=particles.pixel_size,
            n_gaussians=gaussians.n_gaussians, n_classes=gaussians.n_classes,
            latent_dim=args.n_latent_dimensions,
            n_positional_encoding_dimensions=args.n_positional_encoding_dimensions,
            n_linear_layers=args.n_linear_layers, n_neurons_per_layer=args.n_neurons_per_layer,
            n_warmup_epochs=args.n_warmup_epochs,
            regularization_factor=args.regularization_factor, beta=args.beta,
            consensus_update_interval=args.consensus_update_interval,
            learning_rate=args.learning_rate, seed=args.seed,
            decoder_precision=resolve_decoder_precision(args.decoder_precision, device))
        members = particles.half_set.numpy() == half
        train = np.flatnonzero(members & ~validation.numpy())
        held = np.flatnonzero(members & validation.numpy())
        trainer = HalfSetTrainer(half, config, gaussians, train, device, movable, held)
        if tracks is not None:
            trainer.set_tracks(*tracks)
        trainer.initialise_noise(_batches(particles, train[:512], args.batch_size, device,
                                          _NoAbort()))
        trainers[half] = trainer
    return trainers, validation, 0


class _NoAbort:
    def check_abort(self) -> None:
        pass


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


def _resume(path, state, particles, device):
    if state["half_set"].shape[0] != len(particles):
        raise InputError(path, "checkpoint",
                         f"is for {state['half_set'].shape[0]} particles, the particles STAR "
                         f"file has {len(particles)}",
                         "Give the STAR file the checkpoint was trained on, or another "
                         "--output-directory to start afresh.")
    trainers = {int(h): HalfSetTrainer.from_state_dict(s, device)
                for h, s in state["halves"].items()}
    torch.set_rng_state(state["global_rng"])  # unused by training; restored for completeness
    logger.info("continuing from %s (epoch %d)", path, int(state["epoch"]))
    return (trainers, state["validation"].bool(), int(state["epoch"]), state["half_set"].long(),
            state)


# settings fixed by the checkpoint when continuing (the model and its training rule)
_CHECKPOINT_SETTINGS = (
    "refinement_star_file", "initial_model", "initial_threshold", "mask_file", "n_gaussians",
    "n_gaussian_widths", "n_latent_dimensions", "n_positional_encoding_dimensions",
    "n_linear_layers", "n_neurons_per_layer", "n_warmup_epochs", "regularization_factor",
    "validation_fraction", "seed", "random_half_sets", "consensus_update_interval",
    "n_map_fit_steps", "beta", "learning_rate", "decoder_precision", "temporal_prior")


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


def _checkpoint_state(args, trainers, validation, half_set, epoch, stopping: EarlyStopping,
                      stopped_early: bool) -> dict:
    config = {k: v for k, v in vars(args).items()
              if isinstance(v, (int, float, str, bool)) or v is None}
    config.pop("_module", None)
    halves = {str(h): t.state_dict() for h, t in trainers.items()}
    first, second = halves["1"]["initial_positions"], halves["2"]["initial_positions"]
    if torch.equal(first, second):  # the common initial model: saved once
        halves["2"]["initial_positions"] = first
    return {"epoch": epoch, "config": config, "half_set": half_set.to(torch.int8),
            "validation": validation.clone(), "global_rng": torch.get_rng_state(),
            "early_stopping": stopping.state_dict(), "stopped_early": stopped_early,
            "halves": halves}


def _write_volumes(folder: Path, trainers, epoch: int, particles) -> None:
    make_folder(folder)
    for half, trainer in trainers.items():
        g = trainer.model.gaussians
        with torch.no_grad():
            vol = render_gaussians_3d(g.positions, torch.exp(g.log_sigmas), g.masses(),
                                      g.class_index, particles.box_size, particles.pixel_size)
        write_map(folder / f"volume_half{half}_{epoch:03d}.mrc", vol.cpu(), particles.pixel_size)


def main(args, control) -> None:
    torch.set_num_threads(max(1, int(args.n_threads)))
    out = Path(args.output_directory)
    fwd = out / "forward_deformations"
    device = choose_device(args.gpu_id)
    particles, star = load_particle_set(args.refinement_star_file,
                                        project_dir=args.project_directory,
                                        random_split=args.random_half_sets, seed=args.seed,
                                        preload=args.preload_images)
    tracks = None
    if args.temporal_prior:
        tracks = read_tracks(args.refinement_star_file, star.particles)
        particles = particles.with_half_set(torch.from_numpy(half_sets_by_track(
            args.refinement_star_file, particles.half_set.numpy(), tracks[0])))
        logger.info("temporal prior: %d tracks, %d tracked particles",
                    len(np.unique(tracks[0][tracks[0] >= 0])), int((tracks[0] >= 0).sum()))
    found = _checkpoint_to_resume(args, fwd / "checkpoints")
    stopping = EarlyStopping(args.early_stopping_patience, args.early_stopping_min_fraction,
                             args.early_stopping_min_epochs)
    stopped_early = latents_final = False
    if found is not None:
        resume_from = found[0]
        trainers, validation, epoch, half_set, saved = _resume(*found, particles, device)
        particles = particles.with_half_set(half_set)
        _warn_about_changed_settings(args, saved["config"], resume_from)
        if "early_stopping" in saved:
            stopping.load_state_dict({k: v for k, v in saved["early_stopping"].items()
                                      if k not in ("patience", "min_fraction", "min_epochs")})
        stopped_early = bool(saved.get("stopped_early", False)) and args.early_stopping_patience > 0
        # codes finalised for exactly this model (a finished run rerun): keep them
        latents_final = all(t.final_latents is not None for t in trainers.values()) and (
            stopped_early or epoch >= args.n_epochs)
        if stopped_early:
            logger.info("training stopped early at epoch %d (held-out residual best at epoch "
                        "%d); not training further (--early-stopping-patience 0 continues to "
                        "--n-epochs)", epoch, stopping.best_epoch)
    else:
        trainers, validation, epoch = _new_run(args, particles, device, tracks)
    make_folder(fwd / "checkpoints")
    n_train = sum(t.train_indices.shape[0] for t in trainers.values())
    logger.info("training on %s (decoder in %s): %d + %d particles, %d held out for validation, "
                "epochs %d..%d", device, trainers[1].config.decoder_precision,
                trainers[1].train_indices.shape[0], trainers[2].train_indices.shape[0],
                int(validation.sum()), epoch + 1, args.n_epochs)
    t_start = time.time()
    first_epoch = epoch
    held_out = {h: np.flatnonzero(validation.numpy() & (particles.half_set.numpy() == h))
                for h in trainers}
    while epoch < args.n_epochs and not stopped_early:
        t0 = time.time()
        stats = {h: t.train_epoch(_batches(particles, t.epoch_order(), args.batch_size, device,
                                           control))
                 for h, t in trainers.items()}
        epoch += 1
        residual = float("nan")
        if not stats[1]["warmup"]:
            residual = sum(t.evaluate(_batches(particles, held_out[h], args.batch_size, device,
                                               control)) for h, t in trainers.items())
            stopped_early = stopping.update(epoch, residual)
        rate = n_train / max(time.time() - t0, 1e-9)
        left = (time.time() - t_start) / (epoch - first_epoch) * (args.n_epochs - epoch)
        mean = {k: 0.5 * (stats[1][k] + stats[2][k]) for k in ("data", "mse", "reg", "kl")}
        lam = [stats[h]["regularization_weight"] for h in (1, 2)]
        phase = "warm-up" if stats[1]["warmup"] else "joint"
        logger.info("epoch %d/%d (%s): data %.4g (mse %.4g) reg %.4g KL %.4g lambda %.3g/%.3g "
                    "held-out %.6g, %.0f particles/s, %.0f s left", epoch, args.n_epochs,
                    phase, mean["data"], mean["mse"], mean["reg"], mean["kl"], lam[0], lam[1],
                    residual, rate, left)
        append_text(fwd / "loss_log.txt", " ".join(
            [f"epoch {epoch}"] + [f"half{h}_{k} {stats[h][k]:.8g}" for h in (1, 2)
                                  for k in ("data", "mse", "reg", "kl", "regularization_weight")]
            + [f"heldout_residual {residual:.8g}"]) + "\n")
        if trainers[1].temporal is not None:
            logger.info("  temporal prior: correlation time %.3g / %.3g (time units of %s)",
                        trainers[1].temporal.correlation_time,
                        trainers[2].temporal.correlation_time, "rlnDynaMightTime")
        if stopped_early:
            logger.info("early stopping after epoch %d: the held-out residual has not improved "
                        "for %d epochs (best %.6g at epoch %d)", epoch, stopping.stale_epochs,
                        stopping.best, stopping.best_epoch)
        if (epoch % max(1, args.checkpoint_interval) == 0 or epoch == args.n_epochs
                or stopped_early):
            save_checkpoint(fwd / "checkpoints" / epoch_checkpoint_name(epoch),
                            _checkpoint_state(args, trainers, validation, particles.half_set,
                                              epoch, stopping, stopped_early))
            prune_checkpoints(fwd / "checkpoints", args.keep_checkpoints)
            _write_volumes(fwd / "volumes", trainers, epoch, particles)
    if not latents_final:
        _finalise_latents(args, particles, trainers, device, control)
    save_checkpoint(fwd / "checkpoints" / FINAL_NAME,
                    _checkpoint_state(args, trainers, validation, particles.half_set, epoch,
                                      stopping, stopped_early))
    _log_consensus_agreement(trainers)
    _write_particles(out, args, particles, star, trainers, validation, device, control,
                     tracks)
    if getattr(args, "pipeline_control", None):  # RELION: particles.star becomes an input
        write_output_nodes(args.pipeline_control,
                           [OutputNode(node_name(out, "particles.star"), PARTICLES)])


def _finalise_latents(args, particles, trainers, device, control) -> None:
    """Every particle's code under the final model of its half (two damped Gauss-Newton steps
    from its stored code), stored in the trainers: what particles.star, the checkpoint and the
    later stages use."""
    t0 = time.time()
    half_set = particles.half_set.numpy()
    for half, trainer in trainers.items():
        members = np.flatnonzero(half_set == half)
        trainer.finalise_latents(_batches(particles, members, args.batch_size, device, control))
    logger.info("latent codes of all %d particles under the final models (%.0f s)",
                len(particles), time.time() - t0)


def _log_consensus_agreement(trainers) -> None:
    """How far apart the two halves' consensus models are (they start identical and are kept
    in the same conformation by the anchored consensus update)."""
    with torch.no_grad():
        p1, p2 = (trainers[h].model.gaussians.positions.detach().cpu() for h in (1, 2))
        gap = (p1 - p2).norm(dim=-1)
    logger.info("consensus models of the two halves differ by %.3f Å on average "
                "(95th percentile %.3f Å)", float(gap.mean()), float(gap.quantile(0.95)))


def _write_particles(out, args, particles, star, trainers, validation, device, control,
                     tracks=None) -> None:
    n = len(particles)
    d = trainers[1].config.latent_dim
    latents = np.zeros((n, d))
    half_set = particles.half_set.numpy()
    for half, trainer in trainers.items():
        members = np.flatnonzero(half_set == half)
        latents[members] = trainer.stored_latents(members).cpu().numpy()
    error = np.full(n, -1.0)
    held = np.flatnonzero(validation.numpy())
    per_particle, idx, per_gaussian = deformation_error(
        trainers[1].model, trainers[2].model,
        trainers[1].latents_for,
        trainers[2].latents_for,
        _batches(particles, held, args.batch_size, device, control))
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
