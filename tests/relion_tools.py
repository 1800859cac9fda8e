"""Helpers for tests that compare against the RELION command-line programs.

- :data:`requires_relion` skips a test when ``relion_project`` / ``relion_reconstruct`` are absent;
  combine it with ``@pytest.mark.relion`` (``RELION_TESTS = [pytest.mark.relion, requires_relion]``
  does both as ``pytestmark``).
- :func:`make_relion_dataset` writes an angles STAR file (``data_optics`` + ``data_particles``, as
  the fixture ``relion31_sim/angles.star``) and runs ``relion_project --ctf`` on it.
- :func:`read_relion_particles` reads a particles STAR + stack into the core's tensors, on its own
  (deliberately independent of ``relion_external``, so that physics tests do not depend on it).

Everything here is plain numpy/torch/starfile/mrcfile; arrays from mrcfile are copied before they
become tensors (``torch.as_tensor`` of a read-only array warns, and warnings are errors).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation

from dynamight_core.particles import CTFParams

# tests take ``fixtures_dir`` from conftest.py; this constant is for scripts and benchmarks
FIXTURES_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
RELION31_SIM = FIXTURES_DIR / "relion31_sim"

RELION_PROGRAMS = ("relion_project", "relion_reconstruct")


def relion_available() -> bool:
    """True when the RELION programs the tests call are on ``PATH``."""
    return all(shutil.which(p) is not None for p in RELION_PROGRAMS)


requires_relion = pytest.mark.skipif(
    not relion_available(),
    reason=("RELION programs (relion_project, relion_reconstruct) not on PATH: "
            "apt-get install relion"),
)
relion = pytest.mark.relion
RELION_TESTS = [relion, requires_relion]


def run_relion(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a RELION program; on failure raise with its output (RELION reports errors on stdout)."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_map(path: Path) -> tuple[torch.Tensor, float]:
    """``(volume zyx float32, voxel size Å)`` from an MRC file."""
    with mrcfile.open(path, permissive=True) as mrc:
        data = np.array(mrc.data, dtype=np.float32, copy=True)
        voxel = float(mrc.voxel_size.x)
    return torch.from_numpy(data), voxel


def write_map(path: Path, volume: torch.Tensor, voxel_size: float) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume.detach().cpu().numpy().astype(np.float32))
        mrc.voxel_size = voxel_size


@dataclass(frozen=True)
class RelionDataset:
    """What :func:`make_relion_dataset` wrote (all under one directory)."""

    directory: Path
    angles_star: Path  # input poses / CTF
    particles_star: Path  # relion_project's output STAR
    stack: Path  # relion_project's output .mrcs
    n_particles: int


def make_angles_table(n: int, seed: int, box_size: int,
                      pixel_size: float) -> dict[str, pd.DataFrame]:
    """Optics + particles tables exercising every RELION CTF/pose field we model.

    Uniform random poses (``Rotation.random``), origins uniform in ±5 Å, astigmatic defocus with
    ``DefocusU > DefocusV`` except every 3rd particle (``V > U``), random astigmatism angles,
    a 30° phase shift on every 4th particle, B-factor 40 Å² on every 5th, ``rlnRandomSubset``
    alternating 1/2.
    """
    rng = np.random.default_rng(seed)
    euler = Rotation.random(n, random_state=seed).as_euler("ZYZ", degrees=True)  # rot, tilt, psi
    idx = np.arange(n)
    mean_defocus = rng.uniform(8000.0, 20000.0, n)
    half_astig = rng.uniform(200.0, 600.0, n)
    sign = np.where(idx % 3 == 2, -1.0, 1.0)  # every 3rd: DefocusV > DefocusU
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1],
        "rlnImagePixelSize": [pixel_size],
        "rlnImageSize": [box_size],
        "rlnImageDimensionality": [2],
        "rlnCtfDataAreCtfPremultiplied": [0],
    })
    particles = pd.DataFrame({
        "rlnAngleRot": euler[:, 0],
        "rlnAngleTilt": euler[:, 1],
        "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": np.round(rng.uniform(-5.0, 5.0, n), 3),
        "rlnOriginYAngst": np.round(rng.uniform(-5.0, 5.0, n), 3),
        "rlnDefocusU": mean_defocus + sign * half_astig,
        "rlnDefocusV": mean_defocus - sign * half_astig,
        "rlnDefocusAngle": rng.uniform(0.0, 180.0, n),
        "rlnPhaseShift": np.where(idx % 4 == 0, 30.0, 0.0),
        "rlnCtfBfactor": np.where(idx % 5 == 0, 40.0, 0.0),
        "rlnCtfScalefactor": np.ones(n),
        "rlnOpticsGroup": np.ones(n, dtype=int),
        "rlnRandomSubset": 1 + idx % 2,
    })
    return {"optics": optics, "particles": particles}


def make_relion_dataset(
    tmp_path: Path,
    map_path: Path,
    n: int,
    seed: int,
    noise: float | None = None,
    box_size: int | None = None,
    pixel_size: float | None = None,
    name: str = "particles",
) -> RelionDataset:
    """Write ``angles.star`` and run ``relion_project --ctf [--add_noise --white_noise noise]``.

    ``box_size`` / ``pixel_size`` default to the map's; the map must have that box (relion_project
    projects at the map's size).
    """
    tmp_path = Path(tmp_path)
    with mrcfile.open(map_path, permissive=True, header_only=True) as mrc:
        map_box = int(mrc.header.nx)
        map_pixel = float(mrc.voxel_size.x)
    box_size = map_box if box_size is None else box_size
    pixel_size = map_pixel if pixel_size is None else pixel_size
    if box_size != map_box:
        raise ValueError(f"{map_path} has box {map_box}, asked for {box_size}")
    angles = tmp_path / f"{name}_angles.star"
    starfile.write(make_angles_table(n, seed, box_size, pixel_size), angles, overwrite=True)
    args = ["relion_project", "--i", str(Path(map_path).resolve()), "--ang", angles.name,
            "--o", name, "--ctf", "--angpix", f"{pixel_size}"]
    if noise is not None:
        args += ["--add_noise", "--white_noise", f"{noise}"]
    run_relion(args, cwd=tmp_path)
    star, stack = tmp_path / f"{name}.star", tmp_path / f"{name}.mrcs"
    if not (star.exists() and stack.exists()):
        raise RuntimeError(f"relion_project did not write {star} / {stack}")
    return RelionDataset(tmp_path, angles, star, stack, n)


def run_relion_reconstruct(star: Path, out: Path, subset: int | None = None,
                           ctf: bool = True) -> Path:
    """``relion_reconstruct --i star --o out [--ctf] [--subset N]`` (cwd = the STAR's folder)."""
    star = Path(star).resolve()
    args = ["relion_reconstruct", "--i", star.name, "--o", str(Path(out).resolve())]
    if ctf:
        args.append("--ctf")
    if subset is not None:
        args += ["--subset", str(subset)]
    run_relion(args, cwd=star.parent)
    return Path(out)


@dataclass(frozen=True)
class RelionParticles:
    """A particles STAR + stack as the core's tensors."""

    images: torch.Tensor  # (n, box, box)
    rotations: torch.Tensor  # (n, 3, 3) RELION A, float64
    shifts_angstrom: torch.Tensor  # (n, 2)
    ctf: CTFParams
    half_set: torch.Tensor  # (n,)
    pixel_size: float
    box_size: int


def _column(table: pd.DataFrame, optics: pd.DataFrame, name: str, default: float) -> np.ndarray:
    """Per-particle column, else the optics group's value, else ``default``."""
    if name in table:
        return np.array(table[name].to_numpy(dtype=np.float64), copy=True)
    if name in optics:
        by_group = dict(zip(optics["rlnOpticsGroup"], optics[name]))
        groups = table["rlnOpticsGroup"] if "rlnOpticsGroup" in table else [1] * len(table)
        return np.array([by_group[g] for g in groups], dtype=np.float64)
    return np.full(len(table), default)


def read_relion_particles(star: Path, load_images: bool = True) -> RelionParticles:
    """Read a RELION 3.1 particles STAR (poses, origins in Å, CTF) and its image stack.

    Images are read in ``rlnImageName`` order (``N@stack``, 1-based).
    """
    from dynamight_core.rotation import euler_to_matrix

    star = Path(star)
    blocks = starfile.read(star, always_dict=True)
    optics, table = blocks["optics"], blocks["particles"]
    pixel_size = float(optics["rlnImagePixelSize"].iloc[0])
    box = int(optics["rlnImageSize"].iloc[0])
    n = len(table)

    def col(name: str, default: float = 0.0) -> np.ndarray:
        return _column(table, optics, name, default)

    rotations = euler_to_matrix(torch.from_numpy(col("rlnAngleRot")),
                                torch.from_numpy(col("rlnAngleTilt")),
                                torch.from_numpy(col("rlnAnglePsi")))
    shifts = torch.from_numpy(np.stack([col("rlnOriginXAngst"), col("rlnOriginYAngst")], -1))
    ctf = CTFParams.from_values(
        n,
        defocus_u_angstrom=col("rlnDefocusU"),
        defocus_v_angstrom=col("rlnDefocusV"),
        defocus_angle_degrees=col("rlnDefocusAngle"),
        voltage_kv=col("rlnVoltage", 300.0),
        spherical_aberration_mm=col("rlnSphericalAberration", 2.7),
        amplitude_contrast=col("rlnAmplitudeContrast", 0.1),
        phase_shift_degrees=col("rlnPhaseShift"),
        bfactor_angstrom2=col("rlnCtfBfactor"),
        scale=col("rlnCtfScalefactor", 1.0),
    )
    half = torch.from_numpy(col("rlnRandomSubset", 1).astype(np.int64))
    images = torch.empty(0)
    if load_images:
        stacks: dict[str, np.ndarray] = {}
        out = np.empty((n, box, box), dtype=np.float32)
        for i, name in enumerate(table["rlnImageName"]):
            number, path = name.split("@")
            if path not in stacks:
                with mrcfile.open(star.parent / path, permissive=True) as mrc:
                    data = np.array(mrc.data, dtype=np.float32, copy=True)
                stacks[path] = data.reshape(-1, box, box)
            out[i] = stacks[path][int(number) - 1]
        images = torch.from_numpy(out)
    return RelionParticles(images, rotations, shifts.to(torch.float32), ctf, half, pixel_size, box)


def correlation(a: torch.Tensor, b: torch.Tensor, dims=(-2, -1)) -> torch.Tensor:
    """Pearson correlation over ``dims`` (per image for ``(n, h, w)``)."""
    a = a.to(torch.float64) - a.to(torch.float64).mean(dim=dims, keepdim=True)
    b = b.to(torch.float64) - b.to(torch.float64).mean(dim=dims, keepdim=True)
    return (a * b).sum(dim=dims) / torch.sqrt((a * a).sum(dim=dims) * (b * b).sum(dim=dims))


def amplitude_ratio(ours: torch.Tensor, reference: torch.Tensor, dims=(-2, -1)) -> torch.Tensor:
    """Least-squares scale ``<ours, ref> / <ref, ref>`` (1 when the amplitudes agree)."""
    ours, reference = ours.to(torch.float64), reference.to(torch.float64)
    return (ours * reference).sum(dim=dims) / (reference * reference).sum(dim=dims)
