"""Checkpoints of the inverse-deformation stage: plain data (tensors, numbers, strings, lists,
dicts) tagged with a format name and version, loadable with ``torch.load(weights_only=True)``;
no pickled modules.
"""

from __future__ import annotations

import os
import uuid
from os import PathLike
from pathlib import Path

import torch

from .inverse_network import InverseDeformationNetwork, InverseTrainerConfig

METHODS = ("network", "fixed-point")
CHECKPOINT_FORMAT = "dynamight-relion inverse deformations"
CHECKPOINT_VERSION = 1


def save_inverse_checkpoint(path: str | PathLike, state: dict) -> None:
    """Write ``state`` (plain data: tensors, numbers, strings, lists, dicts) atomically, tagged
    with :data:`CHECKPOINT_FORMAT`; loadable with ``torch.load(weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_inverse_checkpoint(path: str | PathLike) -> dict:
    """Read an inverse checkpoint (``weights_only=True``, CPU tensors); checks the format tag."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    if int(state.get("version", -1)) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: version {state['version']} is newer than "
                         f"{CHECKPOINT_VERSION}")
    return state


def networks_from_checkpoint(state: dict, device: torch.device | str = "cpu",
                             ) -> dict[int, InverseDeformationNetwork]:
    """Both halves' trained networks (eval mode) from a loaded inverse checkpoint; empty when
    it holds none (method ``fixed-point``)."""
    networks = {}
    for half, half_state in state.get("halves", {}).items():
        if "network" not in half_state:
            continue
        config = InverseTrainerConfig(**half_state["config"])
        net = InverseDeformationNetwork(config.box_size, config.pixel_size, config.latent_dim,
                                        config.n_neurons, config.n_linear_layers,
                                        config.n_freqs)
        net.load_state_dict(half_state["network"])
        networks[int(half)] = net.to(device).eval()
    return networks



__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "METHODS",
    "load_inverse_checkpoint",
    "networks_from_checkpoint",
    "save_inverse_checkpoint",
]
