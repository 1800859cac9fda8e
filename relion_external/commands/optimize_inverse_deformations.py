"""Inverse deformations: map each particle's frame back to the consensus frame, per half set.

Reads the result of optimize-deformations in OUTPUT_DIR (forward_deformations/checkpoints/
checkpoint_final.pth, or --checkpoint-file). Two methods (--method):

  fixed-point  (default) nothing to train: a particle's forward displacement field on a
               coarse grid (built from its Gaussians' displacements, the field and grid the
               deformed backprojection uses) is inverted by the iteration x <- y - F(x),
               started from the splatted inverse field. The command records the method and
               measures its accuracy.
  network      per half set, a network x(y, z) is trained for --n-epochs to send the deformed
               Gaussians of the half's training particles back to their consensus positions.

The default was chosen by measurement: on simulated data the fixed-point inverse came within a
factor 1.5 of a network trained for 50 epochs at the Gaussians (held-out mean 0.27 vs 0.18 Å,
both far below a pixel), was more accurate between Gaussians, needs no training and is exactly
the inverse of the field the deformed backprojection applies.

Both are measured on the held-out validation particles of each half set: mean and 95th
percentile of |x(c + d) - c| (Å) over their Gaussians, printed at the end. The halves never
share networks. Latent codes are computed once (one pass over the images); an epoch then only
decodes them, so it is fast.

Outputs (in OUTPUT_DIR/inverse_deformations): inv_chkpt.pth (plain data, loadable with
torch.load(weights_only=True): method, epoch, settings, the forward checkpoint used, both
halves' network state_dicts and optimiser/generator states (network) and the held-out errors),
loss_log.txt (network: one line per epoch) and with --save-deformations, per half set,
deformations_half<h>.pt (indices (n,), latents (n, d) float32, consensus (n_g, 3) Å) plus
deformations_half<h>.npy (float16 (n, n_g, 3) Å: each particle's Gaussian displacements;
6 · n · n_g bytes, written in batches, memory-mapped to read).

The network method also writes checkpoints/NNN.pth after every epoch (the newest
--keep-checkpoints kept); inv_chkpt.pth is written at the end. Running again continues a network
from the latest of these (--n-epochs is the total); a damaged one (e.g. truncated by a crash) is
skipped with a warning and the previous intact one is used. An inv_chkpt.pth made for another
forward checkpoint is kept as inv_chkpt_stale.pth and training starts afresh (logged). Files are
written under a temporary name and renamed when complete: a full disk or an unwritable folder
ends the run with a one-line error naming the path and leaves no half-written file.

Example (RELION-5's call form):
  dynamight optimize-inverse-deformations DynaMight/job012/ --n-epochs 50 \\
      --checkpoint-file DynaMight/job012/forward_deformations/checkpoints/checkpoint_final.pth
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from dynamight_core.checkpoint_file import CheckpointError
from dynamight_core.checkpoint_folder import (
    epoch_checkpoint_name,
    epoch_checkpoints,
    load_latest,
    prune,
)
from dynamight_core.deformed_backprojection import choose_grid_size
from dynamight_core.device import choose_device
from dynamight_core.inverse_checkpoint import (
    METHODS,
    load_inverse_checkpoint,
    save_inverse_checkpoint,
)
from dynamight_core.inverse_network import InverseTrainerConfig
from dynamight_core.inverse_stage import (
    HalfCodes,
    InverseEpochReport,
    InverseTraining,
    decoded,
    held_out_errors,
    inverse_state,
)

from .._atomic import append_text, atomic_output, make_folder
from ..errors import InputError
from ..forward_run import ForwardRun, load_forward_run

logger = logging.getLogger(__name__)

INVERSE_DIR = "inverse_deformations"
CHECKPOINT_NAME = "inv_chkpt.pth"
EPOCH_CHECKPOINTS = "checkpoints"  # inside INVERSE_DIR: NNN.pth of the network method
DEFAULT_METHOD = "fixed-point"


def add_args(p) -> None:
    p.add_argument("output_directory", metavar="OUTPUT_DIR",
                   help="output directory of optimize-deformations")
    p.add_argument("--n-epochs", type=int, default=50,
                   help="total training epochs of the network method (default 50)")
    p.add_argument("--checkpoint-file", default=None,
                   help="forward checkpoint to invert (default: checkpoint_final.pth of "
                        "OUTPUT_DIR/forward_deformations/checkpoints)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"how to invert (default {DEFAULT_METHOD}; see above)")
    p.add_argument("--keep-checkpoints", type=int, default=3, metavar="N",
                   help="network: keep the newest N epoch checkpoints (checkpoints/NNN.pth), "
                        "deleting older ones once a new one is written; inv_chkpt.pth is "
                        "always kept; 0 = keep all (default 3)")
    p.add_argument("--batch-size", type=int, default=100, help="particles per step")
    p.add_argument("--save-deformations", action="store_true",
                   help="write every particle's latent code and Gaussian displacements")
    p.add_argument("--preload-images", action="store_true", help="read all images into RAM")
    p.add_argument("--gpu-id", default=None, help="GPU to use (default: CPU)")
    p.add_argument("--n-threads", "--data-loader-threads", dest="n_threads", type=int, default=4)
    p.add_argument("--grid-size", type=int, default=0,
                   help="fixed-point: coarse grid nodes per axis (default: the one "
                        "deformable-backprojection chooses)")
    p.add_argument("--n-iterations", type=int, default=5,
                   help="fixed-point: iterations (residual evaluations; 5 bring >99%% of points "
                        "to a residual below 0.05 Å)")
    p.add_argument("--n-neurons-per-layer", type=int, default=64, help="network width")
    p.add_argument("--n-linear-layers", type=int, default=2, help="network hidden layers")
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--points-per-particle", type=int, default=1024,
                   help="network: Gaussians drawn per step, shared by the batch (0: all)")
    p.add_argument("--smoothness-weight", type=float, default=0.1,
                   help="network: weight of the second-difference smoothness term")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipeline-control", "--pipeline_control", dest="pipeline_control",
                   default=None, metavar="DIR",
                   help="RELION job folder: exit-status files and abort requests")


# -- latent codes ---------------------------------------------------------------------------
def _codes(run: ForwardRun, half: int, batch_size: int, control) -> HalfCodes:
    """Mean latent codes of one half's training and validation particles (computed once)."""
    train = run.members(half, include_validation=False)
    validation = np.setdiff1d(run.members(half, include_validation=True), train)
    return HalfCodes(train, validation,
                     lambda indices: (run.latents(half, batch)
                                      for batch in run.batches(indices, batch_size, control)),
                     run.models[half].decoder.latent_dim, run.device)


# -- checkpoint -------------------------------------------------------------------------------
def _forward_identity(run: ForwardRun) -> dict:
    """The forward checkpoint the inverse belongs to: its path (relative to the output
    directory when inside it, so a moved job folder still matches) and its epoch."""
    path = run.checkpoint_path.resolve()
    try:
        path = path.relative_to(run.output_directory.resolve())
    except ValueError:
        pass
    return {"forward_checkpoint": str(path), "forward_epoch": int(run.epoch)}


def _settings(args, run: ForwardRun, grid_size: int) -> dict:
    return {"method": args.method, "n_epochs": int(args.n_epochs),
            "batch_size": int(args.batch_size), "grid_size": int(grid_size),
            "n_iterations": int(args.n_iterations), **_forward_identity(run)}


def _trainer_config(args, run: ForwardRun) -> InverseTrainerConfig:
    model = run.models[1]
    return InverseTrainerConfig(
        box_size=model.box_size, pixel_size=model.pixel_size,
        latent_dim=model.decoder.latent_dim, n_neurons=args.n_neurons_per_layer,
        n_linear_layers=args.n_linear_layers, n_freqs=model.decoder.n_freqs,
        learning_rate=args.learning_rate, points_per_particle=args.points_per_particle,
        smoothness_weight=args.smoothness_weight, seed=args.seed)


def _identity_of(state: dict) -> dict:
    return {k: state["config"].get(k) for k in ("forward_checkpoint", "forward_epoch")}


def _set_aside_if_stale(path: Path, run: ForwardRun) -> None:
    """Rename ``path`` to inv_chkpt_stale.pth when it was made for another forward checkpoint
    (never silently overwritten); a damaged one is left to :func:`_previous_state`."""
    if not path.is_file():
        return
    try:
        saved = _identity_of(load_inverse_checkpoint(path))
    except CheckpointError:
        return
    if saved == _forward_identity(run):
        return
    stale = path.with_name("inv_chkpt_stale.pth")
    os.replace(path, stale)
    logger.warning("%s was made for %s (epoch %s), not for %s (epoch %d): kept as %s, "
                   "starting afresh", path, saved["forward_checkpoint"], saved["forward_epoch"],
                   run.checkpoint_path, run.epoch, stale)


def _previous_state(folder: Path, run: ForwardRun) -> dict | None:
    """The latest intact saved state (inv_chkpt.pth or an epoch checkpoint; a damaged newer
    one is skipped with a warning) when it belongs to this forward checkpoint, else None."""
    final = folder / CHECKPOINT_NAME
    _set_aside_if_stale(final, run)
    found = load_latest(folder / EPOCH_CHECKPOINTS, final, load_inverse_checkpoint)
    if found is None:
        return None
    path, state = found
    if _identity_of(state) == _forward_identity(run):
        return state
    for _, old in epoch_checkpoints(folder / EPOCH_CHECKPOINTS):
        old.unlink()
    logger.warning("%s was made for another forward checkpoint (%s): the epoch checkpoints of "
                   "that run are deleted, starting afresh", path,
                   _identity_of(state)["forward_checkpoint"])
    return None


def _has_networks(state: dict | None) -> bool:
    halves = (state or {}).get("halves", {})
    return bool(halves) and all("network" in h for h in halves.values())


def _training(args, run: ForwardRun, codes: dict, state: dict | None) -> InverseTraining:
    if _has_networks(state):
        assert state is not None
        try:
            training = InverseTraining.from_state(run.models, codes, state, run.device)
        except ValueError as err:
            raise InputError(args.output_directory, f"{INVERSE_DIR}/{CHECKPOINT_NAME}",
                             str(err),
                             "Delete it to train the inverse deformations afresh.") from err
        logger.info("continuing the inverse networks from %s (epoch %d)",
                    run.output_directory / INVERSE_DIR / CHECKPOINT_NAME, training.epoch)
        return training
    if state is not None:
        logger.info("%s holds no networks (method %s): training starts at epoch 0",
                    CHECKPOINT_NAME, state.get("method"))
    return InverseTraining.new(run.models, codes, _trainer_config(args, run), run.device)


def _save(path: Path, args, run, grid_size, epoch, trainers, held_out) -> None:
    save_inverse_checkpoint(path, inverse_state(
        args.method, epoch, _settings(args, run, grid_size), trainers, grid_size,
        args.n_iterations, held_out))


# -- training ---------------------------------------------------------------------------------
def _train(args, run, training: InverseTraining, path, grid_size, control) -> int:
    trainers = training.trainers
    if training.epoch >= args.n_epochs:
        logger.info("the inverse networks already have %d epochs (--n-epochs %d): no training",
                    training.epoch, args.n_epochs)
        return training.epoch
    logger.info("training the inverse networks on %s: %d + %d particles, epochs %d..%d",
                run.device, trainers[1].train_indices.shape[0],
                trainers[2].train_indices.shape[0], training.epoch + 1, args.n_epochs)
    log = path.parent / "loss_log.txt"

    def on_epoch(report: InverseEpochReport) -> None:
        stats = report.stats
        logger.info("inverse epoch %d/%d: half 1 loss %.4g Å² (rms %.3f Å, smooth %.3g), "
                    "half 2 loss %.4g Å² (rms %.3f Å, smooth %.3g), %.0f particles/s, "
                    "%.0f s left", report.epoch, report.n_epochs, stats[1]["data"],
                    stats[1]["rms"], stats[1]["smooth"], stats[2]["data"], stats[2]["rms"],
                    stats[2]["smooth"], report.particles_per_s, report.seconds_left)
        append_text(log, " ".join([f"epoch {report.epoch}"]
                                  + [f"half{h}_{k} {stats[h][k]:.8g}" for h in (1, 2)
                                     for k in ("data", "smooth")]) + "\n")
        _save(path.parent / EPOCH_CHECKPOINTS / epoch_checkpoint_name(report.epoch), args, run,
              grid_size, report.epoch, trainers, {})
        prune(path.parent / EPOCH_CHECKPOINTS, args.keep_checkpoints)

    return training.run(args.n_epochs, args.batch_size, on_epoch=on_epoch,
                        check_abort=control.check_abort)


# -- saved deformations -----------------------------------------------------------------------
def _save_deformations(args, run, codes, folder: Path, control) -> None:
    for half in (1, 2):
        lat = codes[half]
        model = run.models[half]
        n, n_g = lat.indices.shape[0], model.gaussians.n_gaussians
        order = np.sort(lat.indices)
        npy = folder / f"deformations_half{half}.npy"
        with atomic_output(npy) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                              shape=(n, n_g, 3))
            row = 0
            for _, d, _, idx in decoded(model, lat, order, args.batch_size,
                                        control.check_abort):
                array[row:row + len(idx)] = d.cpu().numpy().astype(np.float16)
                row += len(idx)
            array.flush()
            del array
        with (atomic_output(folder / f"deformations_half{half}.pt") as tmp,
              open(tmp, "wb") as f):
            torch.save({"format": "dynamight-relion deformations", "version": 1,
                        "half": half, "indices": torch.from_numpy(order),
                        "latents": lat.of(order).float().cpu(),
                        "consensus": model.gaussians.positions.detach().float().cpu(),
                        "displacements_file": npy.name, "displacements_dtype": "float16",
                        "units": "angstrom"}, f)
        logger.info("wrote %s (%d particles x %d Gaussians, %.1f MiB) and its index file", npy,
                    n, n_g, npy.stat().st_size / 2**20)


# -- entry point ------------------------------------------------------------------------------
def main(args, control) -> None:
    torch.set_num_threads(max(1, int(args.n_threads)))
    out = Path(args.output_directory)
    if not out.is_dir():
        raise InputError(out, "OUTPUT_DIR", "is not a directory",
                         "Give the output directory of `dynamight optimize-deformations`.")
    device = choose_device(args.gpu_id)
    run = load_forward_run(out, checkpoint_file=args.checkpoint_file, device=device,
                           preload_images=args.preload_images)
    folder = make_folder(out / INVERSE_DIR)
    path = folder / CHECKPOINT_NAME
    consensus = run.models[1].gaussians.positions.detach()
    grid_size = args.grid_size or choose_grid_size(consensus, run.models[1].box_size,
                                                   run.models[1].pixel_size)
    logger.info("method %s; fixed-point grid %d^3 nodes", args.method, grid_size)
    t0 = time.time()
    codes = {h: _codes(run, h, args.batch_size, control) for h in (1, 2)}
    logger.info("latent codes of %d particles in %.1f s",
                sum(c.indices.shape[0] for c in codes.values()), time.time() - t0)
    state = _previous_state(folder, run)
    trainers: dict = {}
    epoch = 0
    if args.method == "network":
        training = _training(args, run, codes, state)
        trainers = training.trainers
        epoch = _train(args, run, training, path, grid_size, control)
    else:
        logger.info("fixed-point: nothing to train (--n-epochs %d not used)", args.n_epochs)
        if _has_networks(state):  # keep (and measure) networks trained by an earlier run
            training = _training(args, run, codes, state)
            trainers, epoch = training.trainers, training.epoch
    held_out = held_out_errors(run.models, codes, trainers, grid_size=grid_size,
                               n_iterations=args.n_iterations, batch_size=args.batch_size,
                               check_abort=control.check_abort)
    _save(path, args, run, grid_size, epoch, trainers, held_out)
    logger.info("wrote %s", path)
    if args.save_deformations:
        _save_deformations(args, run, codes, folder, control)
