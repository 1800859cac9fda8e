"""RELION particles STAR + stacks -> :class:`dynamight_core.particles.ParticleSet`.

Unit conversion only: angles stay degrees until :func:`dynamight_core.rotation.euler_to_matrix`,
shifts become Å, CTF values keep RELION's units. CTF values are taken per particle from
``data_particles`` when the column is there, otherwise from the particle's optics group in
``data_optics``, otherwise RELION's default (as RELION's ``CTF::readByGroup``).
"""

from __future__ import annotations

import logging
import os
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dynamight_core.particles import CTFParams, ParticleSet
from dynamight_core.rotation import euler_to_matrix

from .errors import InputError
from .image_stack import MrcStackImageSource
from .star_io import RelionParticles, read_particles_star

logger = logging.getLogger(__name__)

PARTICLE_COLUMNS = ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                    "rlnOpticsGroup")
OPTICS_COLUMNS = ("rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize")
# CTFParams field <- (RELION label, default or None when the value is required)
CTF_COLUMNS = {
    "defocus_u_angstrom": ("rlnDefocusU", None),
    "defocus_v_angstrom": ("rlnDefocusV", None),
    "defocus_angle_degrees": ("rlnDefocusAngle", None),
    "voltage_kv": ("rlnVoltage", None),
    "spherical_aberration_mm": ("rlnSphericalAberration", None),
    "amplitude_contrast": ("rlnAmplitudeContrast", None),
    "phase_shift_degrees": ("rlnPhaseShift", 0.0),
    "bfactor_angstrom2": ("rlnCtfBfactor", 0.0),
    "scale": ("rlnCtfScalefactor", 1.0),
}
_MAX_ROWS_LISTED = 10


def load_particle_set(
    star_path: str | PathLike,
    *,
    project_dir: str | PathLike | None = None,
    random_split: bool = False,
    seed: int = 0,
    preload: bool = False,
    read_threads: int = 1,
) -> tuple[ParticleSet, RelionParticles]:
    """Read a RELION 3.1+ particles STAR file and its stacks into a :class:`ParticleSet`.

    Stack paths in ``rlnImageName`` (``N@stack.mrcs``, N 1-based) are taken relative to
    ``project_dir`` (default: the working directory, where RELION runs jobs), then to the STAR
    file's folder. Half sets come from ``rlnRandomSubset``; without it ``random_split=True``
    draws balanced random halves from ``seed``. Everything is checked before any image is
    read; bad input raises :class:`InputError` naming the file and the column. ``preload`` and
    ``read_threads`` go to :class:`MrcStackImageSource` (which checks a preload against the
    available memory).
    """
    star_path = Path(star_path)
    star = read_particles_star(star_path)
    particles, optics = star.particles, star.optics
    if len(particles) == 0:
        raise InputError(star_path, "data_particles", "contains no particles",
                         "Select a particles file with at least one particle.")
    _check_columns(star_path, particles, optics)
    group_rows = _optics_rows(star_path, particles, optics)
    used_optics = optics.iloc[np.unique(group_rows)]
    pixel_size, box_size = _image_geometry(star_path, used_optics)
    _check_not_premultiplied(star_path, particles, used_optics)

    table = _ColumnReader(star_path, particles, optics, group_rows)
    angles = [table.particle_column(label)
              for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    shifts = _shifts_angstrom(table, particles, pixel_size)
    ctf = CTFParams.from_values(len(particles), **{
        name: table.ctf_column(label, default) for name, (label, default) in CTF_COLUMNS.items()
    })
    half_set = _half_sets(star_path, particles, random_split, seed)
    images = MrcStackImageSource.from_stack_table(
        *_stack_table(star_path, particles, project_dir), box_size=box_size,
        star_path=star_path, image_names=particles["rlnImageName"], preload=preload,
        read_threads=read_threads)

    rotations = euler_to_matrix(*(torch.from_numpy(a) for a in angles)).to(torch.float32)
    particle_set = ParticleSet(
        images=images, rotations=rotations,
        shifts_angstrom=torch.from_numpy(shifts).to(torch.float32), ctf=ctf,
        half_set=torch.from_numpy(half_set), pixel_size=pixel_size, box_size=box_size)
    logger.info("%s: %d particles (%d / %d in half sets 1 / 2), box %d px, %.4f Å/px",
                star_path, len(particle_set), int((half_set == 1).sum()),
                int((half_set == 2).sum()), box_size, pixel_size)
    return particle_set, star


def check_map_matches(
    map_path: str | PathLike,
    voxel_size: float,
    map_box: int,
    particle_set: ParticleSet,
    *,
    star_path: str | PathLike | None = None,
) -> None:
    """:class:`InputError` unless the map's voxel size (Å, within 0.1 %) and box (voxels)
    equal the particles' pixel size and box."""
    source = f" of the particles in {star_path}" if star_path is not None else " of the particles"
    fix = ("Resample the map onto the particles' grid, e.g. `relion_image_handler --i "
           f"{map_path} --o {Path(map_path).stem}_resampled.mrc --rescale_angpix "
           f"{particle_set.pixel_size:g} --new_box {particle_set.box_size}`, "
           "or select a map from a refinement of these particles.")
    if abs(voxel_size - particle_set.pixel_size) > 1e-3 * particle_set.pixel_size:
        raise InputError(map_path, "MRC voxel size vs rlnImagePixelSize",
                         f"the map has {voxel_size:.4f} Å/voxel but rlnImagePixelSize{source} "
                         f"is {particle_set.pixel_size:.4f} Å/pixel (must agree within 0.1%)",
                         fix)
    if int(map_box) != particle_set.box_size:
        raise InputError(map_path, "MRC box size vs rlnImageSize",
                         f"the map is {map_box}^3 voxels but rlnImageSize{source} is "
                         f"{particle_set.box_size} pixels", fix)


class _ColumnReader:
    """Numeric columns as float64 arrays with one value per particle, checked finite."""

    def __init__(self, star_path: Path, particles: pd.DataFrame, optics: pd.DataFrame,
                 group_rows: np.ndarray):
        self.star_path, self.particles, self.optics = star_path, particles, optics
        self.group_rows = group_rows  # (n,) row of each particle's optics group in optics

    def particle_column(self, label: str) -> np.ndarray:
        return _finite_column(self.star_path, self.particles, label, "data_particles")

    def ctf_column(self, label: str, default: float | None) -> np.ndarray:
        if label in self.particles.columns:
            return self.particle_column(label)
        if label in self.optics.columns:
            used = np.unique(self.group_rows)
            values = np.full(len(self.optics), np.nan)
            values[used] = _finite_column(self.star_path, self.optics.iloc[used], label,
                                          "data_optics", row_numbers=used)
            return values[self.group_rows]
        if default is None:  # _check_columns has already reported it
            raise AssertionError(label)
        return np.full(len(self.particles), default)


def _finite_column(star_path: Path, table: pd.DataFrame, label: str, block: str,
                   row_numbers: np.ndarray | None = None) -> np.ndarray:
    values = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64, copy=True)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        rows = bad if row_numbers is None else np.asarray(row_numbers)[bad]
        examples = table[label].iloc[bad[:3]].tolist()
        raise InputError(star_path, label,
                         f"non-numeric, NaN or infinite values in {block} {_rows_text(rows)} "
                         f"(e.g. {examples})", f"Fix or remove these rows of {block}, e.g. "
                         "with relion_star_handler or by selecting particles in RELION.")
    return values


def _rows_text(rows: np.ndarray) -> str:
    """'rows 3, 7 (1-based, counting data lines)' for 0-based ``rows``."""
    listed = ", ".join(str(int(r) + 1) for r in rows[:_MAX_ROWS_LISTED])
    more = f" and {len(rows) - _MAX_ROWS_LISTED} more" if len(rows) > _MAX_ROWS_LISTED else ""
    return f"row{'s' if len(rows) > 1 else ''} {listed}{more} (1-based, counting data lines)"


def _check_columns(star_path: Path, particles: pd.DataFrame, optics: pd.DataFrame) -> None:
    missing = [f"{label} (data_particles)" for label in PARTICLE_COLUMNS
               if label not in particles.columns]
    missing += [f"{label} (data_optics)" for label in OPTICS_COLUMNS
                if label not in optics.columns]
    missing += [f"{label} (data_particles or data_optics)"
                for label, default in CTF_COLUMNS.values()
                if default is None and label not in particles.columns
                and label not in optics.columns]
    has_angst = {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(particles.columns)
    has_pixels = {"rlnOriginX", "rlnOriginY"} <= set(particles.columns)
    if not (has_angst or has_pixels):
        missing += ["rlnOriginXAngst (data_particles)", "rlnOriginYAngst (data_particles)"]
    if missing:
        raise InputError(star_path, ", ".join(missing), "required column(s) missing",
                         "DynaMight needs particles with poses and CTF parameters: use the "
                         "particles.star (_data.star) of a RELION 3.1+ 3D auto-refine.")


def _optics_rows(star_path: Path, particles: pd.DataFrame, optics: pd.DataFrame) -> np.ndarray:
    """``(n,)`` row in ``optics`` of each particle's optics group."""
    groups = _finite_column(star_path, particles, "rlnOpticsGroup", "data_particles")
    known = _finite_column(star_path, optics, "rlnOpticsGroup", "data_optics")
    lookup = pd.Series(np.arange(len(known)), index=known)
    if lookup.index.has_duplicates:
        raise InputError(star_path, "rlnOpticsGroup", "data_optics lists an optics group twice",
                         "Each optics group must appear once in data_optics.")
    rows = lookup.reindex(groups).to_numpy()
    unknown = np.flatnonzero(np.isnan(rows))
    if len(unknown):
        raise InputError(star_path, "rlnOpticsGroup",
                         f"data_particles {_rows_text(unknown)} name optics group(s) "
                         f"{sorted(set(groups[unknown].astype(int).tolist()))} that are not "
                         f"in data_optics (which has {known.astype(int).tolist()})",
                         "Use the particles file as RELION wrote it, with its data_optics.")
    return rows.astype(np.int64)


def _image_geometry(star_path: Path, used_optics: pd.DataFrame) -> tuple[float, int]:
    """Pixel size (Å) and box (pixels) shared by the optics groups in use."""
    pixel_sizes = _finite_column(star_path, used_optics, "rlnImagePixelSize", "data_optics")
    boxes = _finite_column(star_path, used_optics, "rlnImageSize", "data_optics")
    fix = ("DynaMight needs one pixel size and box for all particles: re-extract or rescale "
           "the particles (e.g. RELION's Particle extraction with rescaling) so they match.")
    if not np.allclose(pixel_sizes, pixel_sizes[0], rtol=1e-5, atol=0):
        raise InputError(star_path, "rlnImagePixelSize",
                         f"optics groups differ in pixel size: {pixel_sizes.tolist()} Å", fix)
    if np.any(boxes != boxes[0]):
        raise InputError(star_path, "rlnImageSize",
                         f"optics groups differ in box size: {boxes.astype(int).tolist()}", fix)
    if pixel_sizes[0] <= 0 or boxes[0] < 2 or boxes[0] != round(boxes[0]):
        raise InputError(star_path, "rlnImagePixelSize, rlnImageSize",
                         f"invalid pixel size {pixel_sizes[0]} Å or box size {boxes[0]}",
                         "Fix data_optics (positive pixel size, integer box).")
    if "rlnImageDimensionality" in used_optics.columns:
        dims = _finite_column(star_path, used_optics, "rlnImageDimensionality", "data_optics")
        if np.any(dims != 2):
            raise InputError(star_path, "rlnImageDimensionality",
                             f"is {dims.astype(int).tolist()}; only 2D particle images are "
                             "supported", "Use 2D particles (not subtomograms).")
    return float(pixel_sizes[0]), int(boxes[0])


def _check_not_premultiplied(star_path: Path, particles: pd.DataFrame,
                             used_optics: pd.DataFrame) -> None:
    label = "rlnCtfDataAreCtfPremultiplied"
    for block, table in (("data_optics", used_optics), ("data_particles", particles)):
        if label in table.columns and np.any(_finite_column(star_path, table, label, block) != 0):
            raise InputError(star_path, label,
                             f"is 1 in {block}: CTF-premultiplied images are not supported",
                             "Re-extract the particles without CTF premultiplication "
                             "(RELION's default).")


def _shifts_angstrom(table: _ColumnReader, particles: pd.DataFrame,
                     pixel_size: float) -> np.ndarray:
    """``(n, 2)`` rlnOriginX/YAngst in Å (old files: rlnOriginX/Y in pixels x pixel size)."""
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(particles.columns):
        return np.stack([table.particle_column("rlnOriginXAngst"),
                         table.particle_column("rlnOriginYAngst")], axis=-1)
    logger.info("%s: no rlnOriginX/YAngst, using rlnOriginX/Y (pixels) x %.4f Å",
                table.star_path, pixel_size)
    return np.stack([table.particle_column("rlnOriginX"),
                     table.particle_column("rlnOriginY")], axis=-1) * pixel_size


def _half_sets(star_path: Path, particles: pd.DataFrame, random_split: bool,
               seed: int) -> np.ndarray:
    """``(n,)`` int64 half set (1 or 2) of each particle."""
    n = len(particles)
    if "rlnRandomSubset" in particles.columns:
        if random_split:
            logger.info("%s: keeping the gold-standard half sets of rlnRandomSubset; "
                        "random_split is ignored", star_path)
        values = _finite_column(star_path, particles, "rlnRandomSubset", "data_particles")
        bad = np.flatnonzero((values != 1) & (values != 2))
        if len(bad):
            raise InputError(star_path, "rlnRandomSubset",
                             "values must be 1 or 2, found "
                             f"{', '.join(f'{v:g}' for v in sorted(set(values[bad])))} "
                             f"in {_rows_text(bad)}",
                             "Use the particles.star of a RELION 3D auto-refine, which assigns "
                             "the gold-standard half sets.")
        half_set = values.astype(np.int64)
    elif random_split:
        half_set = np.ones(n, dtype=np.int64)
        half_set[np.random.default_rng(seed).permutation(n)[n // 2:]] = 2
        logger.warning("%s has no rlnRandomSubset: split the %d particles randomly into two "
                       "half sets (seed %d); they are not the half sets of the consensus "
                       "refinement, so the half maps are not gold-standard independent of it.",
                       star_path, n, seed)
    else:
        raise InputError(star_path, "rlnRandomSubset",
                         "column missing: gold-standard half sets come from a RELION 3D "
                         "auto-refine (its particles.star / run_data.star has them)",
                         "Select the particles.star of a 3D auto-refine job, or pass "
                         "--random-half-sets (random_split=True) to split them randomly.")
    for half in (1, 2):
        if not np.any(half_set == half):
            raise InputError(star_path, "rlnRandomSubset", f"half set {half} is empty",
                             "Both half sets need particles; use the particles of a 3D "
                             "auto-refine or more particles.")
    return half_set


def _stack_table(star_path: Path, particles: pd.DataFrame, project_dir: str | PathLike | None
                 ) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """From ``N@stack`` names (N 1-based): the distinct stacks (found on disk), and per
    particle the stack's number in that list and the 0-based image index in it."""
    names = particles["rlnImageName"].astype(str)
    parts = names.str.partition("@")
    numbers = pd.to_numeric(parts[0], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero((parts[1] != "@").to_numpy() | ~np.isfinite(numbers)
                         | (numbers < 1) | (numbers != np.round(numbers)))
    if len(bad):
        raise InputError(star_path, "rlnImageName",
                         f"{names.iloc[bad[0]]!r} in {_rows_text(bad)} is not of the form "
                         "N@stack.mrcs with a 1-based image number N >= 1",
                         "Use particles extracted by RELION (image numbers start at 1).")
    project = Path(project_dir).absolute() if project_dir is not None else Path(os.getcwd())
    stack_ids, stack_names = pd.factorize(parts[2], sort=False)
    first_rows = np.full(len(stack_names), len(names), dtype=np.int64)
    np.minimum.at(first_rows, stack_ids, np.arange(len(names)))
    stacks = [_find_stack(star_path, stack, names.iloc[row], int(row), project)
              for stack, row in zip(stack_names, first_rows)]
    return stacks, stack_ids.astype(np.int64), numbers.astype(np.int64) - 1


def _find_stack(star_path: Path, stack: str, name: str, row: int, project: Path) -> Path:
    relative = Path(stack)
    candidates = [relative] if relative.is_absolute() else list(dict.fromkeys(
        [project / relative, star_path.parent.absolute() / relative]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = " and ".join(str(c) for c in candidates)
    raise InputError(star_path, "rlnImageName",
                     f"{name!r} (particle row {row + 1}): stack not found; looked for {looked}",
                     "Run from the RELION project directory (or give the project directory), "
                     "and check that the stack was not moved or deleted.")


__all__ = [
    "CTF_COLUMNS",
    "OPTICS_COLUMNS",
    "PARTICLE_COLUMNS",
    "check_map_matches",
    "load_particle_set",
]
