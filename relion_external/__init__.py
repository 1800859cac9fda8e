"""RELION side of dynamight-relion: STAR/MRC I/O and conversion to the core data model."""

from .errors import InputError
from .image_stack import MrcStackImageSource
from .map_io import read_map, write_map
from .particles_adapter import check_map_matches, load_particle_set
from .star_io import RelionParticles, read_particles_star, write_particles_star

__all__ = [
    "InputError",
    "MrcStackImageSource",
    "RelionParticles",
    "check_map_matches",
    "load_particle_set",
    "read_map",
    "read_particles_star",
    "write_map",
    "write_particles_star",
]
