"""Core data model: a particle set as plain tensors plus an image source.

Conventions (stated once, used everywhere):
- image arrays are ``(b, h, w)`` = ``(b, y, x)``; the image centre is pixel ``(h // 2, w // 2)``;
- vectors are ``xyz`` (shifts are ``xy``) in Ångström unless the name says ``_px``;
- ``rotations`` are RELION's ``A`` matrices (see :mod:`dynamight_core.rotation`): a map point at
  ``r`` lands at image position ``(A @ r)[:2]``;
- ``shifts_angstrom`` are RELION's ``rlnOriginX/YAngst``: the image is the projection shifted by
  ``-shift``.

The core never knows where the data came from (STAR, MRC, memory); the adapter builds these.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class ImageSource(Protocol):
    """Random access to particle images by index, without loading the whole set."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Images ``(b, h, w)`` float32 for ``indices`` (0-based, any order)."""
        ...


class TensorImageSource:
    """An :class:`ImageSource` over an in-memory ``(n, h, w)`` tensor or array."""

    def __init__(self, images: torch.Tensor | np.ndarray):
        self._images = torch.as_tensor(images, dtype=torch.float32)
        if self._images.ndim != 3:
            raise ValueError(f"images must be (n, h, w), got shape {tuple(self._images.shape)}")

    def __len__(self) -> int:
        return self._images.shape[0]

    def read(self, indices: np.ndarray) -> torch.Tensor:
        return self._images[torch.as_tensor(np.asarray(indices), dtype=torch.long)]


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters, each a ``(n,)`` float tensor (RELION's meaning and units)."""

    defocus_u_angstrom: torch.Tensor
    defocus_v_angstrom: torch.Tensor
    defocus_angle_degrees: torch.Tensor
    voltage_kv: torch.Tensor
    spherical_aberration_mm: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift_degrees: torch.Tensor
    bfactor_angstrom2: torch.Tensor
    scale: torch.Tensor

    def __len__(self) -> int:
        return self.defocus_u_angstrom.shape[0]

    def subset(self, indices: torch.Tensor | np.ndarray) -> CTFParams:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return CTFParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device: torch.device | str) -> CTFParams:
        return CTFParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @classmethod
    def from_values(
        cls,
        n: int,
        *,
        defocus_u_angstrom,
        defocus_v_angstrom,
        defocus_angle_degrees=0.0,
        voltage_kv=300.0,
        spherical_aberration_mm=2.7,
        amplitude_contrast=0.1,
        phase_shift_degrees=0.0,
        bfactor_angstrom2=0.0,
        scale=1.0,
    ) -> CTFParams:
        """Build from scalars or length-``n`` sequences (scalars are broadcast)."""
        kwargs = dict(locals())
        del kwargs["cls"], kwargs["n"]
        out = {}
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                t = value.detach().to(torch.float32).clone()
            else:
                t = torch.tensor(np.array(value, dtype=np.float64), dtype=torch.float32)
            out[name] = t.expand(n).clone() if t.ndim == 0 else t
            if out[name].shape != (n,):
                raise ValueError(f"{name} must be a scalar or have length {n}")
        return cls(**out)


@dataclass(frozen=True)
class ParticleSet:
    """Everything the core needs to know about a set of particles."""

    images: ImageSource
    rotations: torch.Tensor  # (n, 3, 3) RELION A matrices
    shifts_angstrom: torch.Tensor  # (n, 2) rlnOriginX/YAngst
    ctf: CTFParams
    half_set: torch.Tensor  # (n,) int64, values 1 or 2
    pixel_size: float  # Å
    box_size: int  # pixels (square images)

    def __post_init__(self) -> None:
        n = len(self.images)
        checks = {
            "rotations": (self.rotations.shape, (n, 3, 3)),
            "shifts_angstrom": (self.shifts_angstrom.shape, (n, 2)),
            "half_set": (self.half_set.shape, (n,)),
        }
        for name, (got, want) in checks.items():
            if tuple(got) != want:
                raise ValueError(f"ParticleSet.{name} has shape {tuple(got)}, expected {want}")
        if len(self.ctf) != n:
            raise ValueError(f"ParticleSet.ctf has {len(self.ctf)} entries, expected {n}")

    def __len__(self) -> int:
        return len(self.images)

    def indices_of_half(self, half: int) -> np.ndarray:
        """0-based indices of the particles in half set ``half`` (1 or 2)."""
        return np.flatnonzero(self.half_set.cpu().numpy() == half)

    def with_half_set(self, half_set: torch.Tensor) -> ParticleSet:
        return replace(self, half_set=torch.as_tensor(half_set, dtype=torch.long))
