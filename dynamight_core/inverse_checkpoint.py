"""Checkpoints of the inverse-deformation stage: plain data (tensors, numbers, strings, lists,
dicts) tagged with a format name and version, loadable with ``torch.load(weights_only=True)``;
no pickled modules. Written and read through :mod:`.checkpoint_file` (atomic writes, damaged
files refused with a reason).
"""

from __future__ import annotations

from os import PathLike

import torch

from .checkpoint_file import load_tagged, save_atomically
from .inverse_network import InverseDeformationNetwork, InverseTrainerConfig

METHODS = ("network", "fixed-point")
CHECKPOINT_FORMAT = "dynamight-relion inverse deformations"
CHECKPOINT_VERSION = 1


def save_inverse_checkpoint(path: str | PathLike, state: dict) -> None:
    """Write ``state`` (plain data: tensors, numbers, strings, lists, dicts) atomically, tagged
    with :data:`CHECKPOINT_FORMAT`; loadable with ``torch.load(weights_only=True)``.
    :class:`~.checkpoint_file.CheckpointWriteError` naming ``path`` when it cannot be written
    (nothing is left under its name)."""
    save_atomically({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, path)


def load_inverse_checkpoint(path: str | PathLike) -> dict:
    """Read an inverse checkpoint (``weights_only=True``, CPU tensors);
    :class:`~.checkpoint_file.CheckpointError` naming the file when it is damaged, not an
    inverse checkpoint, or of another version."""
    return load_tagged(path, CHECKPOINT_FORMAT, {CHECKPOINT_VERSION})


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
