"""Protein-like test structures at atomic density: helical-bundle domains with one continuous
motion, for benchmarks that are as hard as real particles.

Each domain is a bundle of α-helices (Cα on a helix of radius 2.3 Å, rise 1.5 Å and 100° per
residue) joined by short loops, with the heavy atoms of a residue built around its Cα: backbone
N, C, O and a side chain of up to 6 atoms pointing away from the helix axis, each placed where
it keeps 2.5 Å from every atom placed before (about 7 heavy atoms per residue; a real protein
has about 8). Atoms are Gaussians of one width (``sigma_angstrom``, atomic scattering plus a
B-factor of about 60 Å²) with masses of about their electron count.

Two presets, neither modelled on a real protein (adenylate kinase is deliberately not used: a
held-out benchmark uses it):

- ``clamp`` (316 residues, about 2,170 atoms, 70 Å across): a static core (a seven-helix
  bundle) and two four-helix lobes that close and open about their hinges together (±17° and
  ±18°); lobe atoms travel up to 15 Å between the two ends of the motion (median 10 Å).
- ``twist-hinge`` (319 residues, about 2,140 atoms): a static core, a long bundle that twists
  about its own axis (torsion growing from 0 at the core to ±45° at its tip, up to 13 Å) and a
  lobe that hinges with a non-linear profile (``(t + t³) / 2``, ±18°, up to 15 Å): a non-rigid
  motion plus a rigid one, still driven by one coordinate.

``t`` is uniform in [-1, 1] in the simulator; ``t = 0`` is the reference state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .synthetic_structure import DomainMotion, MovingStructure

PRESETS = ("clamp", "twist-hinge")

_RISE, _RADIUS, _TURN = 1.5, 2.3, math.radians(100.0)  # α-helix: Å per residue, Å, per residue
_MASS = {"N": 7.0, "C": 6.0, "O": 8.0, "S": 6.5}  # electrons (S: side-chain average)


@dataclass(frozen=True)
class _Helix:
    start: np.ndarray  # (3,) Å, axis point of the first residue
    direction: np.ndarray  # (3,) unit
    n_residues: int


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _perpendicular_frame(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = _unit(np.cross(u, helper))
    return e1, np.cross(u, e1)


def _helix_ca(h: _Helix, phase: float) -> tuple[np.ndarray, np.ndarray]:
    """Cα positions (n, 3) and their outward unit vectors from the helix axis (n, 3)."""
    e1, e2 = _perpendicular_frame(h.direction)
    i = np.arange(h.n_residues)
    angle = phase + i * _TURN
    radial = np.cos(angle)[:, None] * e1 + np.sin(angle)[:, None] * e2
    axis_points = h.start + (i * _RISE)[:, None] * h.direction
    return axis_points + _RADIUS * radial, radial


def _loop_ca(a: np.ndarray, b: np.ndarray, outward: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cα of a loop from ``a`` to ``b`` (both exclusive): 3.8 Å apart along an arc that bulges
    along ``outward``."""
    control = 0.5 * (a + b) + (3.0 + 0.25 * np.linalg.norm(b - a)) * outward
    s = np.linspace(0, 1, 200)[:, None]
    curve = (1 - s) ** 2 * a + 2 * s * (1 - s) * control + s**2 * b  # quadratic Bézier
    arc = np.r_[0, np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))]
    n = max(1, round(float(arc[-1]) / 3.8) - 1)
    at = np.linspace(0, arc[-1], n + 2)[1:-1]
    points = np.stack([np.interp(at, arc, curve[:, k]) for k in range(3)], axis=1)
    points += rng.normal(0, 0.3, points.shape)
    return points, np.tile(outward, (n, 1))


def _backbone_atoms(ca: np.ndarray, outward: np.ndarray, previous: np.ndarray | None,
                    following: np.ndarray | None) -> tuple[list[np.ndarray], list[str]]:
    """Cα, N, C and O of one residue: N and C off the Cα-Cα lines by 35° on the same side (so
    that C(i) and N(i+1) are about 1.35 Å apart, as in a peptide bond), O on C."""
    back = _unit(previous - ca) if previous is not None else -_unit(following - ca)
    forward = _unit(following - ca) if following is not None else -back
    side_f = _unit(np.cross(forward, outward))  # tangential: leaves ``outward`` to the side chain
    side_b = _unit(np.cross(outward, back))
    cos, sin = math.cos(math.radians(35.0)), math.sin(math.radians(35.0))
    carbonyl = ca + 1.52 * (cos * forward + sin * side_f)
    nitrogen = ca + 1.46 * (cos * back + sin * side_b)
    oxygen = carbonyl + 1.23 * _unit(side_f + 0.3 * forward)
    return [ca, nitrogen, carbonyl, oxygen], ["C", "N", "C", "O"]


class _AtomBox:
    """Placed atoms, for clash checks (brute force: a structure has a few thousand atoms)."""

    def __init__(self, capacity: int) -> None:
        self.xyz = np.full((capacity, 3), 1e6)
        self.n = 0

    def add(self, point: np.ndarray) -> None:
        self.xyz[self.n] = point
        self.n += 1

    def clear_of(self, point: np.ndarray, bonded: np.ndarray, min_distance: float) -> bool:
        d2 = ((self.xyz[: self.n] - point) ** 2).sum(-1)
        d2[bonded] = np.inf
        return bool(d2.min(initial=np.inf) >= min_distance**2)


def _side_chain(ca_index: int, ca: np.ndarray, outward: np.ndarray, placed: _AtomBox,
                rng: np.random.Generator, min_distance: float = 2.5, tries: int = 20
                ) -> list[np.ndarray]:
    """1-6 side-chain atoms, 1.53 Å apart, pointing away from the helix axis; an atom that
    would come closer than ``min_distance`` to any atom placed so far (other than the one it
    bonds to) is tried again in another direction, and the chain ends where none fits."""
    n_side = int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.05, 0.1, 0.2, 0.25, 0.25, 0.15]))
    atoms: list[np.ndarray] = []
    position, bonded = ca, ca_index
    for _ in range(n_side):
        for _ in range(tries):
            direction = _unit(_unit(outward + 0.8 * rng.normal(size=3)) + 0.5 * outward)
            candidate = position + 1.53 * direction
            if placed.clear_of(candidate, np.array([bonded]), min_distance):
                break
        else:
            break
        placed.add(candidate)
        atoms.append(candidate)
        position, bonded = candidate, placed.n - 1
    return atoms


def _bundle(centre, axis, n_helices: int, n_residues: int, spacing: float, phase: float,
            rng: np.random.Generator) -> list[_Helix]:
    """``n_helices`` antiparallel helices around ``centre``, axes along ``axis``, on a ring (or
    a hexagonal patch for 7), ``spacing`` Å apart."""
    u = _unit(np.asarray(axis, float))
    e1, e2 = _perpendicular_frame(u)
    if n_helices == 7:
        offsets = [np.zeros(2)] + [spacing * np.array([math.cos(a), math.sin(a)])
                                   for a in np.arange(6) * math.pi / 3 + phase]
    else:
        ring = spacing / (2 * math.sin(math.pi / n_helices)) if n_helices > 1 else 0.0
        offsets = [ring * np.array([math.cos(a), math.sin(a)])
                   for a in np.arange(n_helices) * 2 * math.pi / n_helices + phase]
    length = (n_residues - 1) * _RISE
    helices = []
    for k, (x, y) in enumerate(offsets):
        tilt = _unit(u + 0.12 * rng.normal(size=3))
        direction = tilt if k % 2 == 0 else -tilt
        mid = np.asarray(centre, float) + x * e1 + y * e2
        helices.append(_Helix(mid - 0.5 * length * direction, direction, n_residues))
    return helices


def _build(domains: list[list[_Helix]], rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Atoms (m, 3), masses (m,), domain of each atom (m,), and the number of residues of the
    chain that runs through all helices in order, loops included."""
    cas, outs, doms = [], [], []
    previous_end = None
    for d, helices in enumerate(domains):
        for h in helices:
            ca, out = _helix_ca(h, rng.uniform(0, 2 * math.pi))
            if previous_end is not None:
                end, end_out = previous_end
                loop, loop_out = _loop_ca(end, ca[0], _unit(end_out + out[0]), rng)
                cas.append(loop), outs.append(loop_out)
                doms.append(np.full(len(loop), doms[-1][-1]))
            cas.append(ca), outs.append(out), doms.append(np.full(len(ca), d))
            previous_end = (ca[-1], out[-1])
    ca = np.concatenate(cas)
    outward = np.concatenate(outs)
    ca_domain = np.concatenate(doms)
    n_res = len(ca)
    placed = _AtomBox(10 * n_res)
    kinds: list[str] = []
    domain: list[int] = []
    for i in range(n_res):  # the backbone first, so side chains avoid all of it
        atoms, res_kinds = _backbone_atoms(ca[i], outward[i], ca[i - 1] if i else None,
                                           ca[i + 1] if i + 1 < n_res else None)
        for atom in atoms:
            placed.add(atom)
        kinds += res_kinds
        domain += [ca_domain[i]] * len(atoms)
    for i in rng.permutation(n_res):
        side = _side_chain(4 * i, ca[i], outward[i], placed, rng)
        kinds += ["C"] + ["S"] * (len(side) - 1) if side else []
        domain += [ca_domain[i]] * len(side)
    masses = np.array([_MASS[k] for k in kinds])
    return placed.xyz[: placed.n].copy(), masses, np.asarray(domain), n_res


def _centre(atoms: np.ndarray, masses: np.ndarray) -> np.ndarray:
    return (atoms * masses[:, None]).sum(0) / masses.sum()


def protein_like_structure(preset: str = "clamp", seed: int = 0,
                           sigma_angstrom: float = 1.2) -> MovingStructure:
    """One of :data:`PRESETS` (module docstring), centred on its centre of mass."""
    rng = np.random.default_rng(seed + (0 if preset == "clamp" else 1000))
    if preset == "clamp":
        domains = [
            _bundle((-10, 0, 0), (0, 0, 1), 7, 20, 9.5, 0.3, rng),  # static core
            _bundle((15, -16, 1), (0.3, 0, 1), 4, 17, 9.5, 0.7, rng),  # lobe A
            _bundle((13, 18, -1), (-0.2, 0, 1), 4, 17, 9.5, 0.2, rng),  # lobe B
        ]
        motions = (
            DomainMotion(1, np.array([3.0, -8.0, 0.0]), np.array([0.0, 0.0, 1.0]), 17.0),
            DomainMotion(2, np.array([3.0, 9.0, 0.0]), np.array([0.0, 0.0, 1.0]), 18.0),
        )
    elif preset == "twist-hinge":
        domains = [
            _bundle((-12, 0, 0), (0, 0, 1), 7, 19, 9.5, 0.0, rng),  # static core
            _bundle((17, -6, 0), (1, 0, 0), 4, 21, 9.0, 0.4, rng),  # twisting bundle
            _bundle((-9, 23, 0), (0, 0, 1), 4, 17, 9.5, 0.9, rng),  # hinging lobe
        ]
        motions = (
            DomainMotion(1, np.array([2.0, -6.0, 0.0]), np.array([1.0, 0.0, 0.0]), 45.0,
                         kind="twist", reach_angstrom=32.0),
            DomainMotion(2, np.array([-9.0, 11.0, 0.0]), np.array([1.0, 0.0, 0.0]), 18.0,
                         profile="cubic"),
        )
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    atoms, masses, domain, n_residues = _build(domains, rng)
    shift = _centre(atoms, masses)
    motions = tuple(DomainMotion(m.domain, torch.tensor(m.pivot - shift, dtype=torch.float32),
                                 torch.tensor(m.axis, dtype=torch.float32), m.max_angle_degrees,
                                 m.kind, m.reach_angstrom, m.profile) for m in motions)
    return MovingStructure(
        positions=torch.tensor(atoms - shift, dtype=torch.float32),
        masses=torch.tensor(masses, dtype=torch.float32), sigma_angstrom=sigma_angstrom,
        domain=torch.tensor(domain, dtype=torch.long), motions=motions,
        name=f"{preset} ({n_residues} residues)")


__all__ = ["PRESETS", "protein_like_structure"]
