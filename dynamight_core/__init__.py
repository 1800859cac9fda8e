"""dynamight_core: the torch core of dynamight-relion (no STAR files, no RELION folders, no Qt).

Conventions: arrays ``(z, y, x)``, vectors ``(x, y, z)``, Å unless a name says ``_px``, the box
centre at index ``N // 2``, rotations are RELION ``A`` matrices (:mod:`.rotation`).
"""

from ._version import __version__
from .ctf import ctf_2d_rfft, electron_wavelength_angstrom
from .deformed_backprojection import DeformedBackprojector
from .fixed_point_inverse import FixedPointInverse
from .fsc import fsc, resolution_at_threshold
from .gaussian_projection import project_gaussians_rfft, render_gaussians_3d
from .inverse_network import InverseDeformationNetwork
from .map_projection import project_map, simulate_particle_images
from .particles import CTFParams, ImageSource, ParticleSet, TensorImageSource
from .reconstruction import FourierAccumulator
from .rotation import euler_to_matrix, matrix_to_euler, random_rotations
from .volume_warp import warp_volume_to_latent

__all__ = [
    "CTFParams",
    "DeformedBackprojector",
    "FixedPointInverse",
    "FourierAccumulator",
    "ImageSource",
    "InverseDeformationNetwork",
    "ParticleSet",
    "TensorImageSource",
    "__version__",
    "ctf_2d_rfft",
    "electron_wavelength_angstrom",
    "euler_to_matrix",
    "fsc",
    "matrix_to_euler",
    "project_gaussians_rfft",
    "project_map",
    "random_rotations",
    "render_gaussians_3d",
    "resolution_at_threshold",
    "simulate_particle_images",
    "warp_volume_to_latent",
]
